"""LanguageModel on tiny random GPT-2 and Llama: values against separate runs and hand hooks."""

from __future__ import annotations

import einops
import pytest
import torch
from helpers import layers_of, run_with_hooks
from torch.testing import assert_close

from interp_dsl import CheckError, ExecutionError, InterventionError, UnknownModuleError

A = "the eiffel tower is in the city of"
B = "_ _ _ _ _ _ _ _"
SHORT = "rome is in"


def tokens(lm, text):
    return lm.tokenizer(text, return_tensors="pt")


def layers(lm):
    return lm.transformer.h if hasattr(lm.module, "transformer") else lm.model.layers


def final_norm(lm):
    return lm.transformer.ln_f if hasattr(lm.module, "transformer") else lm.model.norm


def test_invokes_equal_separate_runs(lm):
    with lm.trace() as tracer:
        with tracer.invoke(A):
            h_a = layers(lm)[1].output.save()
            logits_a = lm.lm_head.output.save()
        with tracer.invoke(SHORT):
            h_s = layers(lm)[1].output.save()
            logits_s = lm.lm_head.output.save()
    for text, h, logits in ((A, h_a, logits_a), (SHORT, h_s, logits_s)):
        captured = {}
        ref = run_with_hooks(lm.module, tokens(lm, text), [
            (layers_of(lm.module)[1], lambda m, i, o, c=captured: c.__setitem__("h", o))])
        n = ref.logits.shape[1]
        assert logits.shape[0] == 1 and h.shape[1] == logits_a.shape[1]  # one padded batch
        assert_close(logits[:, -n:], ref.logits, atol=1e-4, rtol=1e-4)
        assert_close(h[:, -n:], captured["h"], atol=1e-4, rtol=1e-4)


def test_activation_patching_matches_hand_hooks(lm):
    with lm.trace() as tracer:
        with tracer.invoke(A):
            clean = layers(lm)[1].output[:, -1, :]
        with tracer.invoke(B):
            layers(lm)[1].output[:, -1, :] = clean
            patched = lm.lm_head.output[:, -1].save()
    cache = {}
    run_with_hooks(lm.module, tokens(lm, A), [
        (layers_of(lm.module)[1], lambda m, i, o: cache.__setitem__("h", o[:, -1, :].clone()))])

    def patch(m, i, o):
        o = o.clone()
        o[:, -1, :] = cache["h"]
        return o

    ref = run_with_hooks(lm.module, tokens(lm, B), [(layers_of(lm.module)[1], patch)])
    assert_close(patched.value, ref.logits[:, -1], atol=1e-4, rtol=1e-4)


def test_cross_prompt_embedding_transplant(lm):
    embed = lm.transformer.wte if hasattr(lm.module, "transformer") else lm.model.embed_tokens
    with lm.trace() as tracer:
        with tracer.invoke(A):
            embeddings = embed.output
            original = lm.lm_head.output.save()
        with tracer.invoke(B):
            embed.output = embeddings
            transplanted = lm.lm_head.output.save()
    assert_close(transplanted.value, original.value, atol=1e-5, rtol=1e-5)


def test_reads_and_writes_are_scheduled_in_forward_order(lm):
    with lm.trace(A):
        logits = lm.lm_head.output.save()  # written first, runs last
        layers(lm)[0].output[:] = 0
    ref = run_with_hooks(lm.module, tokens(lm, A), [
        (layers_of(lm.module)[0], lambda m, i, o: torch.zeros_like(o))])
    assert_close(logits.value, ref.logits, atol=1e-5, rtol=1e-5)


def test_write_depending_on_later_site_is_located_error(lm):
    with pytest.raises(CheckError, match="runs later in the forward") as err:
        with lm.trace(A):
            layers(lm)[0].output = layers(lm)[2].output
    assert f"{__file__}:" in str(err.value)


def test_logit_lens_adhoc_call(lm):
    with lm.trace(A):
        h = layers(lm)[-1].output
        lens = lm.lm_head(final_norm(lm)(h)).save()
        logits = lm.lm_head.output.save()
    assert_close(lens.value, logits.value, atol=1e-5, rtol=1e-5)  # last layer + norm + head = logits


def test_logit_lens_at_middle_layer_matches_manual(lm):
    with lm.trace(A):
        lens = lm.lm_head(final_norm(lm)(layers(lm)[0].output)).save()
    cache = {}
    run_with_hooks(lm.module, tokens(lm, A), [
        (layers_of(lm.module)[0], lambda m, i, o: cache.__setitem__("h", o))])
    norm = lm.module.transformer.ln_f if hasattr(lm.module, "transformer") else lm.module.model.norm
    with torch.no_grad():
        expected = lm.module.lm_head(norm(cache["h"]))
    assert_close(lens.value, expected)


def test_input_is_first_positional_or_keyword_argument(llama):
    attn = llama.model.layers[0].self_attn  # called with hidden_states=... as a keyword
    with llama.trace(A):
        normed = llama.model.layers[0].input_layernorm.output.save()
        attn_in = attn.input.save()
        args, kwargs = attn.inputs
        kw_hidden = kwargs["hidden_states"].save()
    assert_close(attn_in.value, normed.value)
    assert_close(kw_hidden.value, normed.value)


def test_writing_an_input_changes_the_module(llama):
    with llama.trace(A):
        llama.model.layers[1].mlp.input = torch.zeros(1, 8, 32)
        mlp_out = llama.model.layers[1].mlp.output.save()
    assert torch.count_nonzero(mlp_out.value) == 0  # SwiGLU without bias maps 0 to 0


def test_in_place_operator_on_site(lm):
    with lm.trace(A):
        before = layers(lm)[1].output.save()
        h = layers(lm)[1].output
        h *= 2
        after = layers(lm)[1].output.save()
    assert_close(after.value, before.value * 2)


def test_einops_on_proxies(lm):
    with lm.trace(A):
        h = layers(lm)[0].output
        heads = einops.rearrange(h, "b s (h d) -> b h s d", h=4).save()
    assert heads.shape == (1, 4, 8, 8)
    assert_close(heads.value, einops.rearrange(heads.value.transpose(1, 2).reshape(1, 8, 32),
                                               "b s (h d) -> b h s d", h=4))


def test_parameter_values_do_not_change_the_program(lm):
    programs = []
    for coefficient in (0.5, 2.0):
        with lm.trace(A) as tracer:
            layers(lm)[1].output[:, -1, :] *= coefficient
            lm.lm_head.output.save()
        programs.append(tracer.program())
    assert programs[0] == programs[1]
    assert programs[0].structural_hash() == programs[1].structural_hash()


def test_several_errors_reported_together_in_line_order(lm):
    with pytest.raises(CheckError) as err:
        with lm.trace(A):
            layers(lm)[0].output = torch.zeros(1, 8, 5)
            layers(lm)[1].output[:, 20] = 0
            layers(lm)[2].output = torch.zeros(1, 8, 32, dtype=torch.float64)
    text = str(err.value)
    assert len(err.value.diagnostics) == 3
    lines = [d.span.line for d in err.value.diagnostics]
    assert lines == sorted(lines)
    assert "shape mismatch" in text and "found f32[1, 8, 5]" in text
    assert "index 20 on dim 1 of size 8" in text
    assert "dtype clash" in text and ".to(torch.float32)" in text


def test_tuple_arity_error(lm):
    attn = layers(lm)[0].attn if hasattr(lm.module, "transformer") else layers(lm)[0].self_attn
    with pytest.raises(CheckError, match="out of range for a tuple of 2"):
        with lm.trace(A):
            attn.output[2].save()


def test_broadcast_failure_in_op(lm):
    with pytest.raises(CheckError, match=r"shapes do not broadcast in `\+`: f32\[1, 8, 32\] and f32\[7\] \(dim -1: 32 vs 7\)"):
        with lm.trace(A):
            (layers(lm)[0].output + torch.ones(7)).save()


def test_call_index_past_the_calls(lm):
    with pytest.raises(CheckError, match="called 1 time"):
        with lm.trace(A):
            layers(lm)[0].next().output.save()


def test_unknown_module_path(lm):
    with pytest.raises(UnknownModuleError, match="did you mean") as err:
        with lm.trace(A):
            lm.lm_haed.output
    assert f"{__file__}:" in str(err.value)


def test_layer_index_out_of_range(lm):
    with pytest.raises(UnknownModuleError, match="index 3 is out of range"):
        layers(lm)[3]


@pytest.mark.reference_only
def test_runtime_failure_is_located_and_model_unchanged(lm):
    with pytest.raises(ExecutionError) as err:
        with lm.trace(A):
            h = layers(lm)[0].output[0, :4, :4]
            torch.linalg.cholesky(-h @ h.mT).save()  # negative definite: fails only on real data
    assert f"{__file__}:" in str(err.value)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in lm.module.modules())
    with lm.trace(A):
        logits = lm.lm_head.output.save()
    with torch.no_grad():
        assert_close(logits.value, lm.module(**tokens(lm, A)).logits)


def test_site_outside_invoke_is_an_error(lm):
    with pytest.raises(InterventionError, match="outside an invoke"):
        with lm.trace() as tracer:
            with tracer.invoke(A):
                pass
            lm.lm_head.output.save()


@pytest.mark.reference_only
def test_stop_skips_later_layers(lm):
    from torch._subclasses.fake_tensor import FakeTensor
    ran = []
    handle = layers_of(lm.module)[2].register_forward_hook(
        lambda m, i, o: ran.append(1) if not isinstance(o, FakeTensor) else None)
    try:
        with lm.trace(A) as tracer:
            h = layers(lm)[0].output.save()
            tracer.stop()
    finally:
        handle.remove()
    assert ran == []
    cache = {}
    run_with_hooks(lm.module, tokens(lm, A), [
        (layers_of(lm.module)[0], lambda m, i, o: cache.__setitem__("h", o))])
    assert_close(h.value, cache["h"])
