"""End to end on the embedded SmolLM2-135M: nnsight's documented examples with SmolLM2's module
paths, each value checked against plain forwards with hand-written hooks."""

from __future__ import annotations

import pytest
import torch
from helpers import run_with_hooks
from torch.testing import assert_close

from interp_dsl import CheckError

pytestmark = pytest.mark.e2e
PROMPT = "The Eiffel Tower is in the city of"


def ids(model, text=PROMPT):
    return model.tokenizer(text, return_tensors="pt")


def test_paris(smollm):
    with smollm.trace(PROMPT):
        hidden = smollm.model.layers[-1].output.save()
        logits = smollm.lm_head.output.save()
    assert smollm.tokenizer.decode(logits[0, -1].argmax()) == " Paris"
    assert hidden.shape == (1, 9, 576)
    with torch.no_grad():
        assert_close(logits.value, smollm.module(**ids(smollm)).logits, atol=1e-4, rtol=1e-4)


def test_model_output_record_and_operations(smollm):
    with smollm.trace(PROMPT):
        h = smollm.model.layers[-1].output.save()
        hs_sum = torch.sum(h).save()
        hs_edited = (h + hs_sum).save()
        output = smollm.output.save()
    assert_close(hs_edited.value, h.value + h.value.sum())
    assert smollm.tokenizer.decode(output["logits"][0, -1].argmax()) == " Paris"
    assert smollm.tokenizer.decode(output.logits[0, -1].argmax()) == " Paris"


def test_tutorial_last_logits_item(smollm):
    with smollm.trace(PROMPT):
        logits = smollm.lm_head.output[0, -1].save()
    assert logits.shape == (49152,)
    assert smollm.tokenizer.decode(logits.argmax().item()) == " Paris"


def test_zero_ablation_of_last_mlp_with_invokes(smollm):
    with smollm.trace() as tracer:
        with tracer.invoke(PROMPT):
            smollm.model.layers[-1].mlp.output[:] = 0
            modified = smollm.lm_head.output.argmax(dim=-1).save()
        with tracer.invoke(PROMPT):
            original = smollm.lm_head.output.argmax(dim=-1).save()
    ref = run_with_hooks(smollm.module, ids(smollm), [
        (smollm.module.model.layers[-1].mlp, lambda m, i, o: torch.zeros_like(o))])
    assert torch.equal(modified.value, ref.logits.argmax(-1))
    assert smollm.tokenizer.decode(original[0][-1]) == " Paris"


def test_custom_vector_at_last_position(smollm):
    torch.manual_seed(0)
    vector = torch.randn(576)
    with smollm.trace(PROMPT):
        smollm.model.layers[5].output[:, -1, :] = vector
        logits = smollm.lm_head.output.save()

    def replace(m, i, o):
        o = o.clone()
        o[:, -1, :] = vector
        return o

    ref = run_with_hooks(smollm.module, ids(smollm), [(smollm.module.model.layers[5], replace)])
    assert_close(logits.value, ref.logits, atol=1e-4, rtol=1e-4)


def test_noise_injection(smollm):
    torch.manual_seed(1)
    with smollm.trace(PROMPT):
        noise = 0.1 * torch.randn_like(smollm.model.layers[5].output)
        smollm.model.layers[5].output = smollm.model.layers[5].output + noise
        noise_saved = noise.save()
        logits = smollm.lm_head.output.save()
    ref = run_with_hooks(smollm.module, ids(smollm), [
        (smollm.module.model.layers[5], lambda m, i, o: o + noise_saved.value)])
    assert_close(logits.value, ref.logits, atol=1e-4, rtol=1e-4)


def test_barrier_cross_prompt_embeddings(smollm):
    with smollm.trace() as tracer:
        barrier = tracer.barrier(2)
        with tracer.invoke(PROMPT):
            embeddings = smollm.model.embed_tokens.output
            barrier()
        with tracer.invoke("_ _ _ _ _ _ _ _ _"):
            barrier()
            smollm.model.embed_tokens.output = embeddings
            output = smollm.lm_head.output.save()
    assert smollm.tokenizer.decode(output[0, -1].argmax()) == " Paris"


def test_saved_value_feeds_a_later_trace(smollm):
    with smollm.trace("The Eiffel Tower is located in the city of"):
        hs = smollm.model.layers[25].output[:, -1, :].save()
    with smollm.trace("The Colosseum is located in the city of"):
        smollm.model.layers[25].output[:, -1, :] = hs.value
        patched = smollm.lm_head.output[0, -1].argmax().save()
    with smollm.trace("The Colosseum is located in the city of"):
        plain = smollm.lm_head.output[0, -1].argmax().save()
    assert smollm.tokenizer.decode(plain.value) == " Rome"
    assert smollm.tokenizer.decode(patched.value) == " Paris"


def test_scan_and_check_catch_errors_before_running(smollm):
    with smollm.scan(PROMPT):
        dim = smollm.model.layers[-1].mlp.output.shape[-1]
    assert dim == 576
    with pytest.raises(CheckError, match=r"index 9 on dim 1 of size 9"):
        with smollm.trace(PROMPT):
            smollm.model.layers[0].output[:, 9, :] = 0


def test_attention_inputs_by_keyword(smollm):
    attn = smollm.model.layers[0].self_attn
    with smollm.trace(PROMPT):
        normed = smollm.model.layers[0].input_layernorm.output.save()
        hidden = attn.input.save()
        kwargs = attn.inputs[1]
        cos, sin = kwargs["position_embeddings"]
        cos = cos.save()
    assert_close(hidden.value, normed.value)
    assert cos.shape == (1, 9, 64)
