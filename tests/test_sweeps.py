"""Sweeps: results equal one trace per prompt and point, whatever the batching, bucketing,
vectorising, passes, interruption or resumption."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from helpers import dataset, layers, patch_one, tiny_llama, wait_for_shards, word_tokenizer

from interp_dsl import LanguageModel, PromptFile, load_results
from interp_dsl.cli import main

PROMPTS = ["the eiffel tower is in", "paris is a city", "rome", "the colosseum is in the city of rome",
           "new york", "madison square garden is located in new york", "a city"]


def steer_one(model, prompt, coef, vec):
    with model.trace(prompt, compile="off"):
        layers(model)[1].output[:, -1, :] += coef * vec
        logits = model.lm_head.output[:, -1].save()
    return logits.value[0]


@pytest.mark.parametrize("mode", ["off", "graph"])
def test_steering_grid_equals_one_trace_per_prompt_and_coefficient(lm, mode):
    vec = torch.randn(32)
    with lm.sweep(PROMPTS, batch_size=3, compile=mode) as sweep:
        coef = sweep.param("coef", [0.0, 1.5, -2.0])
        layers(lm)[1].output[:, -1, :] += coef * vec
        lm.lm_head.output[:, -1].save("logits")
    results = sweep.results
    assert results.dims == [("coef", 3)] and results.grid("logits").shape == (7, 3, 64)
    assert results.index["prompt"].tolist() == [i for i in range(7) for _ in range(3)]  # order restored
    assert results.index["coef"].tolist()[:3] == [0.0, 1.5, -2.0]
    for i, prompt in enumerate(PROMPTS):
        for j, c in enumerate([0.0, 1.5, -2.0]):
            torch.testing.assert_close(results.grid("logits")[i, j], steer_one(lm, prompt, c, vec), atol=1e-4, rtol=1e-4)
    if mode == "graph":  # one graph for every coefficient, batch and length (per shape bucket)
        assert lm.compile_stats().artefacts == 1 and lm.compile_stats().fallbacks == 0


@pytest.mark.parametrize("mode", ["off", "graph"])
def test_patching_every_layer_is_vectorised_into_one_graph(lm, mode):
    pairs = {"clean": PROMPTS, "corrupt": PROMPTS[::-1]}
    with lm.sweep(pairs, batch_size=4, compile=mode) as sweep:
        layer = sweep.param("layer", range(3))
        with sweep.invoke("clean"):
            h = layers(lm)[layer].output[:, -1, :]
        with sweep.invoke("corrupt"):
            layers(lm)[layer].output[:, -1, :] = h
            lm.lm_head.output[:, -1].softmax(-1)[:, 5].save("p")
    # the clean invoke runs once per batch; the corrupt one carries a row per layer
    assert sweep.fan.expanded == {1}
    grid = sweep.results.grid("p")
    assert grid.shape == (7, 3)
    for i in range(7):
        for layer_index in range(3):
            torch.testing.assert_close(grid[i, layer_index], patch_one(lm, PROMPTS[i], PROMPTS[::-1][i], layer_index))
    if mode == "graph":
        stats = lm.compile_stats()
        # not one per layer, nor one per length: the two batches' lengths differ, one capture serves both
        assert (stats.artefacts, stats.compilations, stats.fallbacks) == (1, 1, 0)


def test_fanned_saves_and_zipped_parameters(llama):
    vec = torch.randn(32)
    with llama.sweep(PROMPTS[:3], batch_size=2, compile="off") as sweep:
        layer = sweep.param("layer", [0, 2])
        coef, shift = sweep.zip(coef=[1.0, 2.0], shift=[0.0, 0.5])
        llama.model.layers[1].output[:, -1, :] *= coef
        llama.model.layers[1].output[:, -1, :] += shift * vec
        llama.model.layers[layer].output[:, -1, :].save("h")
    results = sweep.results
    assert results.dims == [("coef+shift", 2), ("layer", 2)]
    grid = results.grid("h")
    assert grid.shape == (3, 2, 2, 32)
    for i, prompt in enumerate(PROMPTS[:3]):
        for j, (c, s) in enumerate([(1.0, 0.0), (2.0, 0.5)]):
            for k, layer_index in enumerate([0, 2]):
                with llama.trace(prompt, compile="off"):
                    llama.model.layers[1].output[:, -1, :] *= c
                    llama.model.layers[1].output[:, -1, :] += s * vec
                    h = llama.model.layers[layer_index].output[:, -1, :].save()
                torch.testing.assert_close(grid[i, j, k], h.value[0], atol=1e-5, rtol=1e-5)
    assert results.index["layer"].tolist()[:4] == [0, 2, 0, 2]


def test_passes_stop_early_and_compute_the_head_at_the_last_position_only(llama):
    seen = {"late": 0, "head": []}  # real runs only: checking runs the model on fake tensors

    def count(m, i, o):
        seen["late"] += type(o) is torch.Tensor

    def shape(m, i, o):
        if type(o) is torch.Tensor:
            seen["head"].append(tuple(o.shape))
    late = llama.model.norm.register_forward_hook(count)
    head = llama.lm_head.register_forward_hook(shape)
    try:
        with llama.sweep(PROMPTS, batch_size=4, compile="off") as probe:
            llama.model.layers[1].output[:, -1, :].save("h")
        assert seen["late"] == 0 and not seen["head"]  # nothing after layer 1 ran
        with llama.sweep(PROMPTS, batch_size=4, compile="off") as read:
            llama.lm_head.output[:, -1, :].save("logits")
        assert seen["head"] and all(shape[1] == 1 for shape in seen["head"])
        assert read.results.manifest["passes"] == ["stop_after_last_site", "logits_to_keep=1"]
    finally:
        late.remove()
        head.remove()
    for i, prompt in enumerate(PROMPTS):
        with llama.trace(prompt, compile="off"):
            h = llama.model.layers[1].output[:, -1, :].save()
            logits = llama.lm_head.output.save()
        torch.testing.assert_close(probe.results["h"][i], h.value[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(read.results["logits"][i], logits.value[0, -1], atol=1e-5, rtol=1e-5)


def test_saves_must_be_per_prompt(llama):
    from runtime.sweep_runner import SweepError
    with pytest.raises(SweepError, match=r"must not depend on prompt length") as err:
        with llama.sweep(PROMPTS, batch_size=2, compile="off"):
            llama.model.layers[0].output.save("h")
    assert err.value.diagnostics[0].span.file == __file__
    with pytest.raises(SweepError, match="keeps the batch dimension"):
        with llama.sweep(PROMPTS, batch_size=2, compile="off"):
            llama.model.layers[0].output.mean().save("m")


def test_prompt_files_stream_with_located_errors(tmp_path, llama):
    (tmp_path / "p.csv").write_text("id,text\n1,the eiffel tower\n2,rome\n")
    assert list(PromptFile.of(tmp_path / "p.csv").rows()) == ["the eiffel tower", "rome"]
    (tmp_path / "bad.jsonl").write_text('{"text": "rome"}\n{"txt": "paris"}\n')
    from runtime.datasets import DatasetError
    with pytest.raises(DatasetError, match="no field 'text'") as err:
        with llama.sweep(PromptFile.of(tmp_path / "bad.jsonl"), batch_size=1, shard_size=1,
                         out=tmp_path / "out", compile="off"):
            llama.lm_head.output[:, -1].save("logits")
    assert str(err.value.diagnostics[0].span) == f"{tmp_path / 'bad.jsonl'}:2"
    assert load_results(tmp_path / "out").n_prompts == 1  # the row before the error is kept


EXPERIMENT = """model "{model}"
prompt text
sweep layer in 0..3
sweep coef in [0.0, 2.0]
invoke text {{
    model.model.layers[layer].output[:, -1, :] *= coef
    save p = softmax(model.lm_head.output[:, -1, :], dim=-1)[:, 5]
}}
"""


def test_cli_sweep_equals_python_and_refuses_another_experiment(tmp_path, tiny_dir, capsys):
    data = dataset(tmp_path / "p.jsonl", 50)
    exp = tmp_path / "exp.ivx"
    exp.write_text(EXPERIMENT.format(model=tiny_dir))
    args = ["run", str(exp), "--prompts", str(data), "--batch-size", "8", "--shard-size", "20", "--quiet"]
    assert main([*args, "--out", str(tmp_path / "a")]) == 0
    results = load_results(tmp_path / "a")
    assert [s["prompts"] for s in results.manifest["shards"]] == [[0, 20], [20, 40], [40, 50]]
    assert results.manifest["complete"] and results.manifest["text"] == exp.read_text()
    assert results.grid("p").shape == (50, 2, 3)
    model = LanguageModel(str(tiny_dir))
    texts = list(PromptFile.of(data).rows())
    with model.sweep(texts, batch_size=8, compile="off") as sweep:
        layer = sweep.param("layer", range(3))
        coef = sweep.param("coef", [0.0, 2.0])
        model.model.layers[layer].output[:, -1, :] *= coef
        model.lm_head.output[:, -1, :].softmax(-1)[:, 5].save("p")
    torch.testing.assert_close(results.grid("p"), sweep.results.grid("p"))

    exp.write_text(EXPERIMENT.format(model=tiny_dir).replace("[:, 5]", "[:, 6]"))
    assert main([*args, "--out", str(tmp_path / "a")]) == 1
    err = capsys.readouterr().err
    assert "holds results of a different experiment: the program differs" in err and "use another --out" in err
    assert main(["show", str(tmp_path / "a")]) == 0
    shown = capsys.readouterr().out
    assert "(complete)" in shown and "axis layer (3): [0, 1, 2]" in shown and "p: float32[rows]" in shown
    assert main(["plot", str(tmp_path / "a"), "p"]) == 0 and (tmp_path / "a" / "p.png").stat().st_size > 1000
    assert main(["plot", str(tmp_path / "a"), "q"]) == 1
    assert "hint: saves: p" in capsys.readouterr().err


def test_killed_sweep_resumes_to_the_uninterrupted_result(tmp_path, tiny_dir):
    data = dataset(tmp_path / "p.jsonl", 600, seed=1)
    exp = tmp_path / "exp.ivx"
    exp.write_text(EXPERIMENT.format(model=tiny_dir))
    command = [sys.executable, "-m", "interp_dsl.cli", "run", str(exp), "--prompts", str(data),
               "--batch-size", "4", "--shard-size", "40", "--quiet", "--compile", "off"]
    out = tmp_path / "killed"
    process = subprocess.Popen([*command, "--out", str(out)])
    wait_for_shards(out, 2, process)
    assert process.poll() is None, "the sweep finished before it could be killed"
    process.send_signal(signal.SIGKILL)
    process.wait()
    partial = load_results(out)  # every listed shard is whole; the manifest is valid
    assert not partial.manifest["complete"] and 2 <= len(partial.manifest["shards"]) < 15
    assert subprocess.run([*command, "--out", str(out)]).returncode == 0
    assert subprocess.run([*command, "--out", str(tmp_path / "whole")]).returncode == 0
    resumed, whole = load_results(out), load_results(tmp_path / "whole")
    assert resumed.manifest["complete"] and resumed.n_prompts == 600
    assert torch.equal(resumed.index["prompt"], whole.index["prompt"])
    torch.testing.assert_close(resumed["p"], whole["p"], atol=0, rtol=0)


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss(run) -> int:
    peak, done = [_rss()], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak.append(_rss())
            time.sleep(0.01)

    thread = threading.Thread(target=sample)
    thread.start()
    try:
        run()
    finally:
        done.set()
        thread.join()
    return max(peak)


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="reads RSS from /proc")
def test_memory_stays_flat_over_5000_prompts(tmp_path):
    model = LanguageModel(tiny_llama(), tokenizer=word_tokenizer())

    def sweep(n: int) -> None:
        data = dataset(tmp_path / f"p{n}.jsonl", n, seed=n)
        with model.sweep(PromptFile.of(data), batch_size=64, shard_size=512, out=tmp_path / f"out{n}",
                         compile="off"):
            model.model.layers[1].output[:, -1, :].save("h")

    sweep(500)  # warm: site tables for every length, allocator pools
    small = _peak_rss(lambda: sweep(1000))
    large = _peak_rss(lambda: sweep(5000))
    assert load_results(tmp_path / "out5000").n_prompts == 5000
    assert large - small < 40 * 2**20, f"peak RSS grew by {(large - small) / 2**20:.1f} MiB"


def test_unbatchable_names_what_reaches_past_a_programs_own_rows():
    """`passes.unbatchable`: ending the forward, generating, back-propagating, in-place ops, and
    (given the shared batch's sites) writes into tensors that are not one row per batch row."""
    from compiler.ir import Const, Generation, Op, Program, Ref, Site
    from compiler.passes import unbatchable
    from compiler.signatures import SiteTable
    rotary = Site("model.rotary_emb", "output")
    write = Program((Op("read", result=0, site=rotary), Op("write", site=rotary, path=(Const(0),), args=(Ref(0),))))
    per_row = SiteTable(None, 2, values={("model.rotary_emb", "post", 0): (torch.zeros(2, 4, 8), torch.zeros(2, 4, 8))})
    shared = SiteTable(None, 2, values={("model.rotary_emb", "post", 0): (torch.zeros(1, 4, 8), torch.zeros(1, 4, 8))})
    assert unbatchable(write) is None and unbatchable(write, per_row) is None
    assert unbatchable(write, shared) == "it writes model.rotary_emb.output, a value the rows share"
    dynamic = Program((Op("read", result=0, site=rotary), Op("write", site=rotary, path=(Ref(0),), args=(Ref(0),))))
    assert unbatchable(dynamic, per_row) is not None  # a path it cannot follow is not proved private
    read = Op("read", result=0, site=Site("model.layers.0", "output"))
    assert unbatchable(Program((read, Op("stop")))) == "it ends the forward early"
    assert unbatchable(Program((read, Op("call", result=1, target="Tensor.mul_", args=(Ref(0), Const(2)))))) \
        == "it changes a value in place (Tensor.mul_)"
    assert unbatchable(Program((read, Op("backward", args=(Ref(0),))))) == "it back-propagates"
    assert unbatchable(Program((read,), generation=Generation(max_new_tokens=2))) == "it generates"


def test_auto_compiles_a_sweep_only_when_the_capture_pays(llama):
    from runtime.compiled import AUTO_SWEEP_RUNS_CPU, sweep_mode
    cpu = llama.module
    assert sweep_mode("auto", cpu, AUTO_SWEEP_RUNS_CPU - 1) == "off"
    assert sweep_mode("auto", cpu, AUTO_SWEEP_RUNS_CPU) == "graph"
    assert sweep_mode("off", cpu, 10 ** 6) == "off" and sweep_mode("graph", cpu, 1) == "graph"
    with llama.sweep(PROMPTS, batch_size=2, compile="auto") as sweep:  # 4 batches x 2 points: 8 forwards
        coef = sweep.param("coef", [1.0, 2.0])
        llama.model.layers[1].output[:, -1, :] *= coef
        llama.lm_head.output[:, -1].save("logits")
    assert sweep.results.manifest["compile"] == {"auto": "off"}
    assert llama.compile_stats().artefacts == 0
