"""Compiled graphs kept on disk (runtime/graph_cache.py): a second model (or process) runs the
graph the first captured, with the same values as the reference interpreter; a call the kept
graph does not fit, a changed model, a hostile or damaged file each capture afresh."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from helpers import DIFF_PROMPTS, edits, layers, patch_one, tiny_gpt2, tiny_llama, traced, word_tokenizer
from hypothesis import given, settings
from hypothesis import strategies as st

from interp_dsl import LanguageModel

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ("the eiffel tower is in", "the colosseum is in the city of rome and")


@pytest.fixture
def kept(tmp_path, monkeypatch):
    """A fresh graph directory, used by the models made after it."""
    root = tmp_path / "graphs"
    monkeypatch.setenv("IVX_GRAPH_CACHE", str(root))
    return root


def fresh(kind: str) -> LanguageModel:
    return LanguageModel(tiny_llama() if kind == "llama" else tiny_gpt2(), word_tokenizer())


def steer_and_read(model: LanguageModel, prompt: str, coef: float, compile: str):
    layers = model.model.layers if hasattr(model.module, "model") else model.transformer.h
    with model.trace(prompt, compile=compile):
        h = layers[1].output.save()
        layers[2].output[:, -1] *= coef
        top = model.lm_head.output[0, -1].save()
    return h.value, top.value


def two_invokes(model: LanguageModel, compile: str, prompts: tuple[str, str] = PROMPTS):
    layers = model.model.layers if hasattr(model.module, "model") else model.transformer.h
    with model.trace(compile=compile) as tracer:
        with tracer.invoke(prompts[0]):
            a = layers[0].output.save()
        with tracer.invoke(prompts[1]):
            layers[1].output[:] = 0.0
            logits = model.lm_head.output.save()
    return a.value, logits.value


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_a_second_model_runs_the_kept_graphs(kept, kind):
    first = fresh(kind)
    steer_and_read(first, PROMPTS[0], 2.0, "graph")
    two_invokes(first, "graph")
    assert first.compile_stats().compilations == 2
    assert len(list(kept.glob("*.json"))) == 2

    second = fresh(kind)
    for prompt, coef in zip(PROMPTS, (0.5, 3.0), strict=True):  # other lengths and coefficients
        got = steer_and_read(second, prompt, coef, "graph")
        want = steer_and_read(second, prompt, coef, "off")
        assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True))
    longer = ("the eiffel tower", "madison square garden is in the city of new york and the tower is in paris")
    for prompts in (PROMPTS, longer):  # two invokes: the kept graph serves other lengths too
        got, want = two_invokes(second, "graph", prompts), two_invokes(second, "off", prompts)
        assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True))
    assert got[1].shape[1] == len(longer[1].split())
    stats = second.compile_stats()
    assert (stats.compilations, stats.loaded, stats.calls, stats.fallbacks) == (0, 2, 4, 0)


@settings(max_examples=6, deadline=None)
@given(st.lists(edits, min_size=1, max_size=5).map(lambda xs: [tuple(x) for x in xs]),
       st.sampled_from(DIFF_PROMPTS))
def test_generated_programs_run_the_same_from_a_kept_graph(tmp_path_factory, program, prompt):
    os.environ["IVX_GRAPH_CACHE"] = str(tmp_path_factory.mktemp("graphs"))
    try:
        first = fresh("llama")
        traced(first, program, prompt, "graph")
        second = fresh("llama")
        saves, logits = traced(second, program, prompt, "graph")
        ref_saves, ref_logits = traced(second, program, prompt, "off")
    finally:
        os.environ["IVX_GRAPH_CACHE"] = "off"
    assert second.compile_stats().loaded == 1 and second.compile_stats().compilations == 0
    assert torch.equal(logits, ref_logits)
    assert all(torch.equal(s, r) for s, r in zip(saves, ref_saves, strict=True))


def test_a_second_process_starts_from_the_kept_graph(kept, tiny_dir):
    script = textwrap.dedent(f"""
        import json, torch
        from interp_dsl import LanguageModel
        model = LanguageModel({str(tiny_dir)!r})
        with model.trace("the eiffel tower is in", compile="graph"):
            model.model.layers[1].output[:, -1] *= 2.0
            top = model.lm_head.output[0, -1].save()
        s = model.compile_stats()
        print(json.dumps({{"top": top.value.tolist(), "compilations": s.compilations, "loaded": s.loaded}}))
    """)
    env = {**os.environ, "IVX_GRAPH_CACHE": str(kept), "PYTHONPATH": str(ROOT)}
    runs = [json.loads(subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                                      text=True, check=True).stdout.splitlines()[-1]) for _ in range(2)]
    assert [(r["compilations"], r["loaded"]) for r in runs] == [(1, 0), (0, 1)]
    assert runs[0]["top"] == runs[1]["top"]


def test_a_call_outside_the_kept_shape_conditions_captures_afresh(kept):
    steer_and_read(fresh("llama"), PROMPTS[0], 2.0, "graph")
    (path,) = kept.glob("*.json")
    data = json.loads(path.read_text())
    data["ranges"] = {s: [2, 6] for s in data["ranges"]}  # as if captured for prompts of <= 6 tokens
    path.write_text(json.dumps(data))
    model = fresh("llama")
    short = steer_and_read(model, PROMPTS[0], 2.0, "graph")  # 6 tokens: fits
    long = steer_and_read(model, PROMPTS[1], 2.0, "graph")  # 10 tokens: does not
    assert (model.compile_stats().loaded, model.compile_stats().compilations) == (1, 1)
    assert torch.equal(short[1], steer_and_read(model, PROMPTS[0], 2.0, "off")[1])
    assert torch.equal(long[1], steer_and_read(model, PROMPTS[1], 2.0, "off")[1])


@pytest.mark.parametrize("tamper", ["os.system", "dunder", "garbage", "deep", "other key"])
def test_a_hostile_or_damaged_file_is_not_run(kept, tamper):
    steer_and_read(fresh("llama"), PROMPTS[0], 2.0, "graph")
    (path,) = kept.glob("*.json")
    data = json.loads(path.read_text())
    node = next(n for n in data["graph"] if n["op"] == "call_function")
    if tamper == "os.system":
        node["target"] = {"fn": ["os", "system"]}
    elif tamper == "dunder":
        node["target"] = {"fn": ["torch", "__import__"]}
    elif tamper == "other key":
        data["key"] = "0" * 64
    path.write_text({"garbage": "{", "deep": "[" * 100_000 + "]" * 100_000}.get(tamper) or json.dumps(data))
    model = fresh("llama")
    got = steer_and_read(model, PROMPTS[0], 2.0, "graph")
    assert (model.compile_stats().loaded, model.compile_stats().compilations) == (0, 1)
    assert torch.equal(got[1], steer_and_read(model, PROMPTS[0], 2.0, "off")[1])


def one_call(op: str, target, *args) -> list[dict]:
    """A graph file's nodes: `y = target(x, *args)`, returned."""
    return [{"op": "placeholder", "name": "x", "target": "x", "args": {"tuple": []}, "kwargs": {"dict": []}},
            {"op": op, "name": "y", "target": target, "args": {"tuple": [{"node": "x"}, *args]},
             "kwargs": {"dict": []}},
            {"op": "output", "name": "output", "target": "output", "args": {"tuple": [{"node": "y"}]},
             "kwargs": {"dict": []}}]


@pytest.mark.parametrize("op, target", [
    ("call_function", {"fn": ["torch", "save"]}),  # writes a file
    ("call_function", {"fn": ["torch", "load"]}),
    ("call_function", {"fn": ["torch", "from_file"]}),  # reads one
    ("call_function", {"fn": ["torch", "set_num_threads"]}),  # process state
    ("call_function", {"fn": ["operator", "call"]}),
    ("call_function", {"fn": ["torch._C", "_jit_pass_inline"]}),
    ("call_function", {"op": ["aten", "from_file", None]}),
    ("call_function", {"fn": ["compiler.ops", "functions"]}),  # the op table: writable
    ("call_function", {"fn": ["torch", "autocast"]}),  # a class
    ("call_method", "numpy"),  # leaves tensors: an array's tofile writes files
    ("call_method", "tofile"),
    ("call_method", "storage_type"),
    ("call_method", "type"),
    ("call_method", "const_data_ptr"),
    ("call_method", "requires_grad_"),
    ("call_method", "__reduce_ex__"),
])
def test_a_graph_file_names_only_tensor_math(op, target):
    from compiler import graph_json
    x = torch.arange(4.0)
    assert torch.equal(graph_json.load(one_call("call_function", {"fn": ["torch", "add"]}, 1.0))(x), x + 1)
    assert torch.equal(graph_json.load(one_call("call_method", "mul", 2.0))(x), x * 2)
    with pytest.raises(graph_json.GraphFormatError, match="may not name|bad target"):
        graph_json.load(one_call(op, target, "/tmp/ivx-hostile"))


@pytest.mark.parametrize("nodes", [
    one_call("call_method", "zero_"),  # the input may be a weight of the model
    one_call("call_function", {"fn": ["operator", "setitem"]}, 0, 5.0),
    one_call("call_function", {"fn": ["torch.Tensor", "add_"]}, 1.0),
    [*one_call("call_method", "view", -1)[:2],
     {"op": "call_method", "name": "z", "target": "add_", "args": {"tuple": [{"node": "y"}, 1.0]},
      "kwargs": {"dict": []}}, *one_call("call_method", "view", -1)[2:]],  # through a view
])
def test_a_graph_file_writes_only_to_memory_it_allocated(nodes):
    from compiler import graph_json
    with pytest.raises(graph_json.GraphFormatError, match="writes in place"):
        graph_json.load(nodes)
    copy = one_call("call_function", {"fn": ["torch", "clone"]})  # a clone of the input may be written
    copy[2:2] = [{"op": "call_function", "name": "w", "target": {"fn": ["operator", "setitem"]},
                  "args": {"tuple": [{"node": "y"}, 0, 5.0]}, "kwargs": {"dict": []}}]
    x = torch.arange(4.0)
    assert torch.equal(graph_json.load(copy)(x), torch.tensor([5.0, 1.0, 2.0, 3.0]))
    assert torch.equal(x, torch.arange(4.0))


def test_a_method_runs_on_tensors_only():
    """A method name is torch.Tensor's: on a list (`[5, 1].index(1)`) it does not run."""
    from compiler import graph_json
    nodes = one_call("call_method", "index")
    nodes[1]["args"] = {"tuple": [{"list": [5, 1]}, 1]}
    with pytest.raises(TypeError):
        graph_json.load(nodes)(torch.arange(2.0))


def test_a_directory_others_can_write_is_not_used(kept):
    kept.mkdir(parents=True)
    kept.chmod(0o777)
    model = fresh("llama")
    with pytest.warns(RuntimeWarning, match="may be written by other users"):
        steer_and_read(model, PROMPTS[0], 2.0, "graph")
    assert list(kept.iterdir()) == []


def test_a_changed_model_does_not_use_the_kept_graph(kept):
    steer_and_read(fresh("llama"), PROMPTS[0], 2.0, "graph")
    model = fresh("llama")
    model.module.model.layers[0].self_attn.scaling *= 0.5  # a plain attribute the forward reads
    got = steer_and_read(model, PROMPTS[0], 2.0, "graph")
    assert (model.compile_stats().loaded, model.compile_stats().compilations) == (0, 1)
    assert torch.equal(got[1], steer_and_read(model, PROMPTS[0], 2.0, "off")[1])


def small_net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(OrderedDict([("layer1", torch.nn.Linear(5, 10)),
                                            ("layer2", torch.nn.Linear(10, 2))])).requires_grad_(False)


def test_hooks_that_are_not_ours_and_side_effects_keep_nothing(kept):
    model = fresh("llama")
    model.module.model.layers[0].register_forward_hook(lambda m, a, o: o * 1.0)
    steer_and_read(model, PROMPTS[0], 2.0, "graph")
    assert model.compile_stats().compilations == 1 and not kept.exists()

    class Counting(torch.nn.Module):  # a forward that changes the module: dynamo replays it, a graph would not
        def __init__(self):
            super().__init__()
            self.inner, self.calls = small_net(), 0

        def forward(self, x):
            self.calls += 1
            return self.inner(x)

    from interp_dsl import Model
    counting = Model(Counting())
    with counting.trace(torch.ones(2, 5), compile="graph"):
        out = counting.inner.layer1.output.save()
    assert counting.compile_stats().compilations == 1 and out.value.shape == (2, 10)
    assert not kept.exists()

    for loaded in (0, 1):  # the same model without the counter: kept, then loaded by a copy
        plain = Model(small_net())
        with plain.trace(torch.ones(2, 5), compile="graph"):
            again = plain.layer1.output.save()
        assert torch.equal(again.value, out.value)
        assert (plain.compile_stats().compilations, plain.compile_stats().loaded) == (1 - loaded, loaded)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_a_shared_prefix_sweep_runs_from_kept_graphs(kept, kind):
    """The growth of the shared-prefix schedule is in the kept graph; its layout tensors are
    inputs found on each batch's layout."""
    prompts = ["the eiffel tower is in", "paris is a city", "rome", "the colosseum is in the city of rome",
               "new york"]
    corrupt = prompts[::-1]

    def sweep(model):
        with model.sweep({"clean": prompts, "corrupt": corrupt}, batch_size=2, compile="graph") as s:
            layer = s.param("layer", [0, 2])
            with s.invoke("clean"):
                h = layers(model)[layer].output[:, -1, :]
            with s.invoke("corrupt"):
                layers(model)[layer].output[:, -1, :] = h
                model.lm_head.output[:, -1].softmax(-1)[:, 5].save("p")
        assert s.results.manifest["schedule"]["name"] == "shared-prefix"
        return s.results.grid("p")

    first = fresh(kind)
    captured = sweep(first)
    second = fresh(kind)
    loaded = sweep(second)
    assert first.compile_stats().compilations >= 1 and first.compile_stats().loaded == 0
    stats = second.compile_stats()
    assert (stats.compilations, stats.fallbacks) == (0, 0) and stats.loaded == len(list(kept.glob("*.json")))
    assert torch.equal(loaded, captured)
    for i in range(len(prompts)):
        for j, layer in enumerate([0, 2]):
            torch.testing.assert_close(loaded[i, j], patch_one(second, prompts[i], corrupt[i], layer))


def test_the_directory_keeps_the_most_recently_used_entries(tmp_path):
    from runtime.graph_cache import GraphCache
    root = tmp_path / "graphs"
    cache = GraphCache(root, limit=2)
    a, b, c, d = (ch * 64 for ch in "abcd")
    (root / "notes.json").parent.mkdir(mode=0o700)
    (root / "notes.json").write_text("{}")  # not a kept graph: never pruned
    os.utime(root / "notes.json", ns=(0, 0))
    for i, name in enumerate([a, b, c]):
        cache.save(name, {"graph": []})
        os.utime(root / f"{name}.json", ns=((i + 1) * 10**9, (i + 1) * 10**9))
    assert sorted(p.stem for p in root.glob("*.json")) == [b, c, "notes"]
    (root / f"{b}.json").touch()  # as a load does
    cache.save(d, {"graph": []})
    assert sorted(p.stem for p in root.glob("*.json")) == [b, d, "notes"]
