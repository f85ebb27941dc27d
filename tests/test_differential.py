"""Hypothesis-generated intervention programs: the reference interpreter against hand-written
hooks that apply the same edits, layer by layer, in program order."""

from __future__ import annotations

import pytest
import torch
from helpers import DIFF_PROMPTS as PROMPTS
from helpers import LAYERS, edits, tiny_llama, traced, vector, word_tokenizer
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.testing import assert_close

from interp_dsl import LanguageModel


@pytest.fixture(scope="module")
def model():
    return LanguageModel(tiny_llama(), tokenizer=word_tokenizer())


def hooked(model, program, prompt):
    """Each layer's hook applies that layer's primitive events in program order."""
    events: dict[int, list] = {i: [] for i in range(LAYERS)}
    for edit in program:
        if edit[0] == "patch":
            if edit[1] < edit[2]:
                events[edit[1]].append(("read_src", edit))
                events[edit[2]].append(("write_dst", edit))
        else:
            events[edit[1]].append((edit[0], edit))
    saves, sources = [], {}

    def hook_for(layer):
        def hook(module, args, output):
            out = output
            for kind, edit in events[layer]:
                if kind == "zero":
                    out = out.clone()
                    out[:, edit[2], :] = 0
                elif kind == "scale":
                    out = out * edit[2]
                elif kind == "add":
                    out = out + vector(edit[2])
                elif kind == "read_src":
                    sources[id(edit)] = out[:, 0, :].clone()
                elif kind == "write_dst":
                    out = out.clone()
                    out[:, -1, :] = sources[id(edit)]
                elif kind == "save":
                    saves.append((program.index(edit), out.clone()))
            return out
        return hook

    handles = [model.module.model.layers[i].register_forward_hook(hook_for(i)) for i in range(LAYERS)]
    try:
        with torch.no_grad():
            logits = model.module(**model.tokenizer(prompt, return_tensors="pt")).logits
    finally:
        for h in handles:
            h.remove()
    return [v for _, v in sorted(saves, key=lambda s: s[0])], logits


@settings(max_examples=40, deadline=None)
@given(st.lists(edits, min_size=1, max_size=6).map(lambda xs: [tuple(x) for x in xs]),
       st.sampled_from(PROMPTS))
def test_reference_interpreter_equals_hand_hooks(model, program, prompt):
    program = list(dict.fromkeys(program))  # identical edits twice would alias in `events`
    n = len(model.tokenizer(prompt)["input_ids"])
    program = [e for e in program if not (e[0] == "zero" and not -n <= e[2] < n)]
    saves, logits = traced(model, program, prompt)
    ref_saves, ref_logits = hooked(model, program, prompt)
    assert_close(logits, ref_logits, atol=1e-4, rtol=1e-4)
    assert len(saves) == len(ref_saves)
    for got, want in zip(saves, ref_saves, strict=True):
        assert_close(got, want, atol=1e-4, rtol=1e-4)
