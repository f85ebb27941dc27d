"""The shared-prefix schedule (runtime/shared_prefix.py): a point's rows join the batch at the layer
it writes; values equal one trace per prompt and point, and the rows each layer runs are exactly
the shared ones plus those of the points written at or before it."""

from __future__ import annotations

import pytest
import torch
from helpers import layers, patch_one, tiny_gpt2, tiny_llama, word_tokenizer
from hypothesis import given, settings
from hypothesis import strategies as st

from interp_dsl import LanguageModel

PROMPTS = ["the eiffel tower is in", "paris is a city", "rome", "the colosseum is in the city of rome",
           "new york", "madison square garden is located in new york", "a city"]
CORRUPT = PROMPTS[::-1]


def rows_per_layer(model):
    """Record how many rows enter each decoder layer in real runs (checks run on fake tensors);
    the hooks are registered before the sweep's, so they see a layer's input before it grows."""
    seen: list[int] = []

    def record(module, args):
        if type(args[0]) is torch.Tensor:
            seen.append(args[0].shape[0])
    handles = [m.register_forward_pre_hook(record) for m in layers(model)]
    return seen, handles


@pytest.mark.parametrize("mode", ["off", "graph"])
def test_patching_rows_join_at_the_layer_they_are_written_at(lm, mode):
    seen, handles = rows_per_layer(lm) if mode == "off" else ([], [])  # dynamo would guard on `seen`
    try:
        with lm.sweep({"clean": PROMPTS, "corrupt": CORRUPT}, batch_size=4, compile=mode) as sweep:
            layer = sweep.param("layer", [1, 2])
            with sweep.invoke("clean"):
                h = layers(lm)[layer].output[:, -1, :]
            with sweep.invoke("corrupt"):
                layers(lm)[layer].output[:, -1, :] = h
                lm.lm_head.output[:, -1].softmax(-1)[:, 5].save("p")
    finally:
        for h in handles:
            h.remove()
    schedule = sweep.results.manifest["schedule"]
    prefix = "transformer.h" if hasattr(lm.module, "transformer") else "model.layers"
    assert schedule["name"] == "shared-prefix"
    assert schedule["points_joining"] == {f"{prefix}.1.output": [0], f"{prefix}.2.output": [1]}
    if mode == "off":  # two batches of 4 prompts: clean 4 + shared 4, then point 0's 4 rows join after layer 1
        assert seen == [8, 8, 12] * 2  # vectorised rows would be 4 + 2 x 4 = 12 at every layer
    grid = sweep.results.grid("p")
    assert grid.shape == (7, 2)
    for i in range(7):
        for j, layer_index in enumerate([1, 2]):
            torch.testing.assert_close(grid[i, j], patch_one(lm, PROMPTS[i], CORRUPT[i], layer_index))
    if mode == "graph":
        stats = lm.compile_stats()
        assert (stats.fallbacks, stats.artefacts, stats.compilations) == (0, 1, 1)  # both lengths: one capture
        lm.release_compiled()  # the growth hooks come off with the marker hooks
        assert not any(m._forward_hooks or m._forward_pre_hooks for m in lm.module.modules())


def test_prompts_without_padding_share_too(llama):
    """With nothing padded the real forward passes no attention mask where the recorded one had
    a tensor: the schedule still runs (rows per layer), with the same values."""
    pairs = {"clean": ["the eiffel tower is", "paris is a city"], "corrupt": ["new york is a", "the colosseum is in"]}
    seen, handles = rows_per_layer(llama)
    try:
        with llama.sweep(pairs, batch_size=2, compile="off") as sweep:
            layer = sweep.param("layer", [0, 2])
            with sweep.invoke("clean"):
                h = llama.model.layers[layer].output[:, -1, :]
            with sweep.invoke("corrupt"):
                llama.model.layers[layer].output[:, -1, :] = h
                llama.lm_head.output[:, -1].softmax(-1)[:, 5].save("p")
    finally:
        for h in handles:
            h.remove()
    assert seen == [4, 6, 6]  # clean 2 + shared 2; point 0 joins after layer 0, point 1 takes the shared rows
    for i in range(2):
        for j, layer_index in enumerate([0, 2]):
            torch.testing.assert_close(sweep.results.grid("p")[i, j],
                                       patch_one(llama, pairs["clean"][i], pairs["corrupt"][i], layer_index))


def test_a_program_that_calls_a_decoder_layer_itself_is_not_shared():
    gpt2 = LanguageModel(tiny_gpt2(), tokenizer=word_tokenizer())
    with gpt2.sweep({"clean": PROMPTS[:2], "corrupt": CORRUPT[:2]}, batch_size=2, compile="off") as sweep:
        layer = sweep.param("layer", [0, 1])
        with sweep.invoke("clean"):
            h = gpt2.transformer.h[layer].output[:, -1, :]
        with sweep.invoke("corrupt"):
            gpt2.transformer.h[layer].output[:, -1, :] = h
            again = gpt2.transformer.h[0](gpt2.transformer.h[2].output)
            again[:, -1, :4].save("again")
    assert sweep.results.manifest["schedule"]["why_not_shared_prefix"] == \
        "it calls transformer.h.0 itself, which runs decoder layers"
    assert sweep.results.grid("again").shape == (2, 2, 4)


# ------------------------------------------------------------------ generated sweep programs
WRITES = ("patch", "add", "scale")


def site(model, place, layer):
    """A layer's output, or a place inside the layer (its MLP's output)."""
    return layers(model)[layer] if place[0] == "output" else layers(model)[layer].mlp


def intervene(model, kind, place, layer, h, vec):
    """One point's write at `site`, at the last position or at all: the clean value `h` (read at
    the same site), a vector added, or a scale."""
    module = site(model, place, layer)
    index = (slice(None), -1, slice(None)) if place[1] == "last" else (slice(None), slice(None), slice(None))
    if kind == "patch":
        module.output[index] = h if place[1] == "last" else h[:, None, :]
    elif kind == "add":
        module.output[index] += vec
    else:
        module.output[index] *= 0.5


def one_point(model, kind, place, layer, read_at, clean, corrupt, vec):
    with model.trace(compile="off") as tracer:
        with tracer.invoke(clean):
            h = site(model, place, layer).output[:, -1, :]
        with tracer.invoke(corrupt):
            intervene(model, kind, place, layer, h, vec)
            early = layers(model)[read_at].output[:, -1, :].save()
            logits = model.lm_head.output[:, -1].save()
    return early.value[0], logits.value[0]


MODELS = {"gpt2": tiny_gpt2, "llama": tiny_llama}


@settings(max_examples=12, deadline=None)
@given(arch=st.sampled_from(sorted(MODELS)), kind=st.sampled_from(WRITES),
       place=st.tuples(st.sampled_from(["output", "mlp"]), st.sampled_from(["last", "all"])),
       axis=st.lists(st.integers(0, 2), min_size=2, max_size=3, unique=True),
       read_at=st.integers(0, 2), batch=st.integers(1, 3))
def test_generated_layer_sweeps_equal_one_trace_per_point(arch, kind, place, axis, read_at, batch):
    """Any order of layers, writes at a layer's output or inside it, and a read of the written
    invoke at a fixed layer (rows of points that have not joined yet are read from the shared rows)."""
    model = LanguageModel(MODELS[arch](), tokenizer=word_tokenizer())
    vec = torch.randn(32, generator=torch.Generator().manual_seed(1))
    prompts = PROMPTS[:3]
    with model.sweep({"clean": prompts, "corrupt": CORRUPT[:3]}, batch_size=batch, compile="off") as sweep:
        layer = sweep.param("layer", axis)
        with sweep.invoke("clean"):
            h = site(model, place, layer).output[:, -1, :]
        with sweep.invoke("corrupt"):
            intervene(model, kind, place, layer, h, vec)
            layers(model)[read_at].output[:, -1, :].save("early")
            model.lm_head.output[:, -1].save("logits")
    assert sweep.results.manifest["schedule"]["name"] == "shared-prefix"
    for i in range(3):
        for j, layer_index in enumerate(axis):
            early, logits = one_point(model, kind, place, layer_index, read_at, prompts[i], CORRUPT[i], vec)
            torch.testing.assert_close(sweep.results.grid("early")[i, j], early, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(sweep.results.grid("logits")[i, j], logits, atol=1e-5, rtol=1e-5)


def test_programs_the_schedule_cannot_share_run_every_row_and_say_why(llama):
    seen, handles = rows_per_layer(llama)
    try:
        with llama.sweep({"clean": PROMPTS[:2], "corrupt": CORRUPT[:2]}, batch_size=2, compile="off") as sweep:
            layer = sweep.param("layer", [0, 2])
            with sweep.invoke("clean"):
                h = llama.model.layers[layer].output[:, -1, :]
            with sweep.invoke("corrupt"):
                llama.model.layers[layer].output[:, -1, :] = h
                llama.model.layers[1].output[:, 0, :] = 0.0  # the same write for every point: not one point's rows
                llama.lm_head.output[:, -1].save("logits")
    finally:
        for h in handles:
            h.remove()
    schedule = sweep.results.manifest["schedule"]
    assert schedule == {"name": "vectorised",
                        "why_not_shared_prefix": "a write at model.layers.1.output changes rows of more than one point"}
    assert seen == [2 + 2 * 2] * 3  # every point's rows from the start
    for i in range(2):
        for j, layer_index in enumerate([0, 2]):
            with llama.trace(compile="off") as tracer:
                with tracer.invoke(PROMPTS[i]):
                    h = llama.model.layers[layer_index].output[:, -1, :]
                with tracer.invoke(CORRUPT[i]):
                    llama.model.layers[layer_index].output[:, -1, :] = h
                    llama.model.layers[1].output[:, 0, :] = 0.0
                    logits = llama.lm_head.output[:, -1].save()
            torch.testing.assert_close(sweep.results.grid("logits")[i, j], logits.value[0], atol=1e-5, rtol=1e-5)


def test_writes_that_reach_other_points_rows_are_not_shared(llama):
    """The schedule trusts a write only when it provably changes its own point's rows: a mask
    indexed other than `[:, None, ...]` (a hand-made program; here `[..., None]`, which happens
    to be harmless) keeps the vectorised rows."""
    import dataclasses

    from compiler.ir import Const, EllipsisArg, SliceArg, TupleArg
    from runtime.shared_prefix import plan

    with llama.sweep({"clean": PROMPTS[:2], "corrupt": CORRUPT[:2]}, batch_size=2, compile="off") as sweep:
        layer = sweep.param("layer", [0, 2])
        with sweep.invoke("clean"):
            h = llama.model.layers[layer].output[:, -1, :]
        with sweep.invoke("corrupt"):
            llama.model.layers[layer].output[:, -1, :] = h
            llama.lm_head.output[:, -1].save("logits")
    program, engine, batch = sweep.tracer.program(), sweep.tracer.engine, sweep.tracer.batch()
    params = {**sweep.tracer.params}

    def schedule(prog):
        typed = engine.run(prog, batch, params, execute=False)[0]
        return plan(typed, engine.site_table(batch), batch, "layer", 2, 1)

    assert schedule(program).joins == {("model.layers.0", "post", 0): (0,), ("model.layers.2", "post", 0): (1,)}
    other_index = TupleArg((EllipsisArg(), Const(None)))
    masks = [op for op in program.ops if op.target == "getitem" and op.args[1] == TupleArg(
        (SliceArg(Const(None), Const(None), Const(None)), Const(None)))]
    assert len(masks) == 2
    flipped = dataclasses.replace(program, ops=tuple(
        dataclasses.replace(op, args=(op.args[0], other_index)) if op is masks[0] else op for op in program.ops))
    assert schedule(flipped) == "a write at model.layers.0.output changes rows of more than one point"
