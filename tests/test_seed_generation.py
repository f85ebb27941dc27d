"""The seeds' generation examples (../shared/seeds/), with SmolLM2's module paths, checked for values.

Changes from the documents: `model.transformer.h` is `model.model.layers`, `wte` is `embed_tokens`,
`ln_f` is `norm`; a decoder layer returns a tensor (no `[0]`); `list().save()` is spelled
`nnsight.list().save()` (a plain Python list cannot be saved); saves the examples only print are
checked here. `import interp_dsl as nnsight` is the only import change.
"""

from __future__ import annotations

import pytest
import torch

import interp_dsl as nnsight

pytestmark = pytest.mark.e2e
EIFFEL = "The Eiffel Tower is in the city of"


def hf_generate(model, prompt, steps, hooks=()):
    """HF's own `generate` (KV cache) with hand-written forward hooks: the independent reference."""
    handles = [m.register_forward_hook(fn) for m, fn in hooks]
    try:
        enc = model.tokenizer(prompt, return_tensors="pt")
        return model.module.generate(**enc, max_new_tokens=steps, do_sample=False,
                                     pad_token_id=model.tokenizer.pad_token_id)
    finally:
        for h in handles:
            h.remove()


def test_walkthrough_next_predicts_paris_then_continues(smollm):
    """004, cell [31]: `.next()` on lm_head walks the steps; generator.output is every id."""
    llm = smollm
    with llm.generate(EIFFEL, max_new_tokens=3):
        token_ids_1 = llm.lm_head.output.argmax(dim=-1).save()
        token_ids_2 = llm.lm_head.next().output.argmax(dim=-1).save()
        token_ids_3 = llm.lm_head.next().output.argmax(dim=-1).save()
        output = llm.generator.output.save()
    assert llm.tokenizer.decode(token_ids_1[0][-1]) == " Paris"
    assert [int(t[0][-1]) for t in (token_ids_1, token_ids_2, token_ids_3)] == output.value[0, -3:].tolist()
    assert llm.tokenizer.batch_decode(output.value)[0].startswith(EIFFEL + " Paris")
    assert torch.equal(output.value, hf_generate(llm, EIFFEL, 3))


def test_readme_next_saves_one_hidden_state_per_step(smollm):
    """001, Multiple Token Generation (`invoker.next()` there names no object; `.next()` suffices)."""
    model = smollm
    with model.generate(EIFFEL, max_new_tokens=3):
        hidden_states1 = model.model.layers[-1].output[0].save()
        hidden_states2 = model.model.layers[-1].next().output[0].save()
        hidden_states3 = model.model.layers[-1].next().output[0].save()
    prompt = len(model.tokenizer(EIFFEL)["input_ids"])
    assert hidden_states1.shape == (prompt, 576)
    assert hidden_states2.shape == hidden_states3.shape == (1, 576)
    assert not torch.equal(hidden_states2.value, hidden_states3.value)


def test_skill_sheet_generator_output(smollm):
    """003: the full generated output."""
    model = smollm
    with model.generate("Hello", max_new_tokens=5):
        output = model.generator.output.save()
    assert torch.equal(output.value, hf_generate(model, "Hello", 5))
    assert model.tokenizer.decode(output[0]).startswith("Hello")


def test_skill_sheet_all_steps(smollm):
    """003: scale layer 5's newest position at every step and collect the last layer's output."""
    model = smollm
    with model.generate("Hello", max_new_tokens=5) as tracer:
        hidden_states = nnsight.list().save()
        with tracer.all():
            model.model.layers[5].output[:, -1, :] *= 0.9
            hidden_states.append(model.model.layers[-1].output)
        output = model.generator.output.save()

    captured = []

    def scale(module, args, out):
        out = out.clone()
        out[:, -1, :] *= 0.9
        return out

    layers = model.module.model.layers
    expected = hf_generate(model, "Hello", 5, [(layers[5], scale),
                                               (layers[-1], lambda m, a, o: captured.append(o.clone()))])
    assert torch.equal(output.value, expected)
    assert len(hidden_states) == 5
    for ours, theirs in zip(hidden_states, captured, strict=True):
        torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


def test_skill_sheet_chosen_steps(smollm):
    """003: zero layer 5's output at iterations 2, 3 and 4 only."""
    model = smollm
    with model.generate("Hello", max_new_tokens=10) as tracer:
        with tracer.iter[2:5]:
            model.model.layers[5].output[:] = 0
        output = model.generator.output.save()

    calls = []

    def zero_some(module, args, out):
        calls.append(None)
        return torch.zeros_like(out) if len(calls) - 1 in (2, 3, 4) else None

    expected = hf_generate(model, "Hello", 10, [(model.module.model.layers[5], zero_some)])
    assert torch.equal(output.value, expected)
    assert not torch.equal(output.value, hf_generate(model, "Hello", 10))


def test_readme_cross_prompt_generation(smollm):
    """001, Cross Prompt Intervention: the second prompt continues the first. (001 reads
    `model.generator.output` once, as the whole batch; as in nnsight 0.8 it is each invoke's rows.)"""
    model = smollm
    with model.generate(max_new_tokens=3) as tracer:
        with tracer.invoke("Madison square garden is located in the city of New"):
            embeddings = model.model.embed_tokens.output
            mine = model.generator.output.save()
        with tracer.invoke("_ _ _ _ _ _ _ _ _ _"):
            model.model.embed_tokens.output = embeddings
            output = model.generator.output.save()
    assert mine.shape[0] == output.shape[0] == 1
    first, second = model.tokenizer.decode(mine[0]), model.tokenizer.decode(output[0])
    assert first.endswith(" York, and") and second.startswith("_ _ _")
    assert mine[0][-3:].tolist() == output[0][-3:].tolist()

    # the same with a pre-saved embedding, in two generations
    with model.generate(max_new_tokens=3) as tracer:
        with tracer.invoke("Madison square garden is located in the city of New"):
            embeddings = model.model.embed_tokens.output.save()
    with model.generate(max_new_tokens=3) as tracer:
        with tracer.invoke("_ _ _ _ _ _ _ _ _ _"):
            model.model.embed_tokens.output = embeddings.value
            again = model.generator.output.save()
    assert again[0][-3:].tolist() == output[0][-3:].tolist()


def test_readme_ad_hoc_module_in_generate(smollm):
    """001, Ad-hoc Module: decode the last layer with the final norm and the head."""
    model = smollm
    with model.generate(EIFFEL):
        hidden_states = model.model.layers[-1].output
        hidden_states = model.lm_head(model.model.norm(hidden_states)).save()
        tokens = torch.softmax(hidden_states, dim=2).argmax(dim=2).save()
    prompt = len(model.tokenizer(EIFFEL)["input_ids"])
    assert hidden_states.shape == (1, prompt, 49152)
    assert model.tokenizer.decode(tokens[0][-1]) == " Paris"


def test_compiled_seed_generation_equals_reference(smollm):
    """003's every-step example, compiled: one graph for every decode step, the same tokens."""
    vector = torch.randn(576, generator=torch.Generator().manual_seed(0))

    def experiment(compile):
        with smollm.generate(["Hello", EIFFEL], max_new_tokens=6, compile=compile) as tracer:
            with tracer.all():
                smollm.model.layers[5].output[:, -1, :] += 0.5 * vector
                last = smollm.model.layers[-1].output[:, -1, :].save()
            output = smollm.generator.output.save()
        return output.value, last.value

    before = smollm.compile_stats().compilations
    ids, states = experiment("off")
    compiled_ids, compiled_states = experiment("graph")
    assert torch.equal(ids, compiled_ids)
    for ours, theirs in zip(compiled_states, states, strict=True):
        torch.testing.assert_close(ours, theirs, atol=1e-3, rtol=1e-4)
    assert smollm.compile_stats().compilations - before == 1
