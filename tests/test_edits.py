"""Persistent edits (`model.edit()`, `inplace=True`, `clear_edits()`): every later trace on the
edited model equals the same trace with the edit written inline, in each invoke, at every
generation step, compiled too; the original model is untouched."""

from __future__ import annotations

import warnings

import pytest
import torch
from helpers import layers

from interp_dsl import InterventionError

PROMPT, OTHER = "the eiffel tower is in the city of", "rome is in"


def steer(lm):
    return torch.randn(32, generator=torch.Generator().manual_seed(1))


def logits(lm, prompt=PROMPT, inline=None, compile="off"):
    with lm.trace(prompt, compile=compile):
        if inline is not None:
            inline()
        out = lm.lm_head.output.save()
    return out.value


def test_an_edited_model_runs_the_edit_in_every_trace_and_the_original_does_not(lm):
    vector = steer(lm)
    original = logits(lm)
    with lm.edit() as edited:
        layers(lm)[1].output[:, -1, :] += vector

    def inline():
        layers(lm)[1].output[:, -1, :] += vector
    want = logits(lm, inline=inline)
    assert not torch.allclose(want, original)
    for _ in range(2):  # persistent: every later trace
        torch.testing.assert_close(logits(edited), want, rtol=0, atol=0)
    torch.testing.assert_close(logits(lm), original, rtol=0, atol=0)


def test_the_edit_applies_to_each_invoke_and_before_the_traces_own_interventions(llama):
    with llama.edit() as edited:
        llama.model.layers[0].output[:, 0] = 0
    with edited.trace() as tracer:
        with tracer.invoke(PROMPT):
            first = llama.model.layers[0].output.save()
        with tracer.invoke(OTHER):
            second = llama.model.layers[0].output.save()
            llama.model.layers[0].output[:, 1] = 1  # the trace's own write comes after the edit
            after = llama.model.layers[0].output.save()
    assert first.value[:, 0].abs().sum() == 0 and second.value[:, 0].abs().sum() == 0
    assert first.value[:, 1].abs().sum() > 0
    assert torch.all(after.value[:, 1] == 1) and after.value[:, 0].abs().sum() == 0


def test_nnsight_0_8_spelling_unpacks_the_tracer_and_the_edited_model(llama):
    original = logits(llama)
    with llama.edit() as (tracer, edited):
        edited.model.layers[2].mlp.output[:] = 0
    assert not torch.equal(logits(edited), original) and torch.equal(logits(llama), original)
    with llama.edit() as copy:  # seed 004's spelling: the edited model itself
        llama.model.layers[2].mlp.output[:] = 0
    assert torch.equal(logits(copy), logits(edited))


def test_inplace_edits_accumulate_and_clear_edits_removes_them(llama):
    original = logits(llama)
    with llama.edit(inplace=True) as same:
        llama.model.layers[2].mlp.output[:] = 0
    assert same is llama
    with llama.edit(inplace=True):
        llama.model.layers[1].output *= 2

    def inline():
        llama.model.layers[2].mlp.output[:] = 0
        llama.model.layers[1].output *= 2
    with llama.edit() as copy:  # an edited copy of an edited model keeps the edits it was made from
        llama.model.layers[0].output *= 1
    edited_logits = logits(llama)
    llama.clear_edits()
    assert torch.equal(logits(llama), original)
    torch.testing.assert_close(edited_logits, logits(llama, inline=inline), rtol=0, atol=0)
    torch.testing.assert_close(logits(copy), edited_logits, rtol=0, atol=0)


def test_an_edit_applies_at_every_generation_step(llama):
    vector = steer(llama)
    with llama.edit() as edited:
        llama.model.layers[1].output[:, -1, :] += 3 * vector
    with edited.generate(PROMPT, max_new_tokens=4):
        ids = llama.generator.output.save()
    with llama.generate(PROMPT, max_new_tokens=4) as tracer:
        with tracer.all():
            llama.model.layers[1].output[:, -1, :] += 3 * vector
        want = llama.generator.output.save()
    with llama.generate(PROMPT, max_new_tokens=4):
        plain = llama.generator.output.save()
    assert torch.equal(ids.value, want.value) and not torch.equal(ids.value, plain.value)


def test_an_edit_is_spliced_into_the_compiled_graph(llama):
    vector = steer(llama)
    with llama.edit() as edited:
        llama.model.layers[1].output[:, -1, :] += vector
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback: the edit is part of the graph
        compiled = logits(edited, compile="graph")
    torch.testing.assert_close(compiled, logits(edited), rtol=1e-5, atol=1e-5)


def test_an_edited_sweep_equals_edited_traces(llama):
    vector = steer(llama)
    with llama.edit() as edited:
        llama.model.layers[1].output[:, -1, :] += vector
    prompts = [PROMPT, OTHER, "the colosseum is in"]
    with edited.sweep(prompts, batch_size=2, progress=False) as sweep:
        llama.lm_head.output[:, -1, :].save("last")
    rows = sweep.results.saves["last"]
    for i, prompt in enumerate(prompts):
        torch.testing.assert_close(rows[i], logits(edited, prompt)[0, -1], rtol=1e-5, atol=1e-5)
        assert not torch.allclose(rows[i], logits(llama, prompt)[0, -1])


def test_an_edit_refuses_saves_and_edits_that_write_nothing(llama):
    with pytest.raises(InterventionError, match="an edit changes the forward; a save belongs in a trace"):
        with llama.edit():
            llama.model.layers[0].output.save()
    with pytest.raises(InterventionError, match="this edit writes no module value"):
        with llama.edit():
            llama.model.layers[0].output * 2
    with pytest.raises(InterventionError, match="shapes are not known here: there is no input yet"):
        with llama.edit():
            llama.model.layers[0].output.shape
    assert llama._edits == ()
