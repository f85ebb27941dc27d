"""Sweeps on Ray (a local instance, two workers): the same results as a local run, bit for bit
(computed, like each worker, on one thread: float sums may round differently on two);
a worker killed mid-run and a driver killed mid-run lose nothing; an error in the experiment stops
the run at the user's line with the shards already written kept."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from helpers import dataset, layers, wait_for_shards

from interp_dsl import InterventionError, LanguageModel, load_results, ray_cluster
from interp_dsl.cli import main

ROOT = Path(__file__).parent.parent


@pytest.fixture(scope="module")
def ray_instance():
    import ray
    ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.ERROR, log_to_driver=False)
    yield ray
    ray.shutdown()


@contextlib.contextmanager
def worker_threads():
    """Compute a local reference on the torch threads of each worker here (2 CPUs, 2 workers)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def patch_sweep(model, prompts, out=None, **options):
    """Patch layer L (a vectorised axis) of the corrupt prompt with the clean one's residual,
    at two strengths (a parameter axis); keep the last position's logits."""
    with model.sweep(prompts, batch_size=4, shard_size=12, out=out, compile="off", **options) as sweep:
        layer = sweep.param("layer", [0, 1])
        alpha = sweep.param("alpha", [0.5, 1.0])
        with sweep.invoke("clean"):
            clean = model.model.layers[layer].output[:, -1, :]
        with sweep.invoke("corrupt"):
            model.model.layers[layer].output[:, -1, :] = alpha * clean
            model.lm_head.output[:, -1, :].save("logits")
    return sweep.results


def pairs(path: Path, n: int) -> dict[str, Path]:
    return {"clean": dataset(path / "clean.jsonl", n, seed=1), "corrupt": dataset(path / "corrupt.jsonl", n, seed=2)}


def test_two_workers_give_the_local_results_bit_for_bit(ray_instance, tiny_dir, tmp_path):
    model = LanguageModel(str(tiny_dir))
    prompts = pairs(tmp_path, 40)
    with worker_threads():
        local = patch_sweep(model, prompts)
    on_ray = patch_sweep(model, prompts, tmp_path / "out", executor=ray_cluster(workers=2))
    assert on_ray.complete and on_ray.n_prompts == 40 and len(on_ray.manifest["shards"]) == 4
    assert on_ray.manifest["executor"] == {"kind": "ray", "workers": 2}
    in_memory = patch_sweep(model, prompts, executor=ray_cluster(workers=2))
    for results in (on_ray, in_memory):
        assert torch.equal(results["logits"], local["logits"])
        for axis in ("prompt", "layer", "alpha"):
            assert torch.equal(results.index[axis], local.index[axis])
    deadline = time.monotonic() + 30  # the workers are killed (Ray frees their CPUs soon after)
    while ray_instance.available_resources().get("CPU") != 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert ray_instance.available_resources().get("CPU") == 2


def test_shards_kept_in_memory_are_read_in_prompt_order_whatever_order_they_arrive_in():
    from runtime.shards import MemorySink
    sink = MemorySink({"points": [{}], "fan_axes": {}, "dims": []})
    for index in (2, 0, 1):
        rows = torch.arange(index * 3, index * 3 + 3)
        sink.write(index, {"__prompt__": rows, "__point__": torch.zeros(3, dtype=torch.long),
                           "__fan__": torch.zeros(3, dtype=torch.long), "x": rows.float()},
                   index * 3, index * 3 + 3, [{}] * 3)
    results = sink.results()
    assert results["x"].tolist() == list(range(9)) and results.index["prompt"].tolist() == list(range(9))
    assert [s["index"] for s in results.manifest["shards"]] == [0, 1, 2]


def test_a_model_held_only_in_memory_is_shipped_to_the_workers(ray_instance, lm, tmp_path):
    """The fixture models (GPT-2 and Llama shapes) have no directory to load from: the workers
    receive the module itself."""
    prompts = [f"the city of {w}" for w in ("paris", "rome", "new york", "madison")] * 3
    with lm.sweep(prompts, batch_size=4, shard_size=4, compile="off") as local:
        lm.lm_head.output[:, -1, :].argmax(-1).save("top")
        layers(lm)[1].output[:, -1, :].save("h")
    with lm.sweep(prompts, batch_size=4, shard_size=4, compile="off", executor="ray") as on_ray:
        lm.lm_head.output[:, -1, :].argmax(-1).save("top")
        layers(lm)[1].output[:, -1, :].save("h")
    assert torch.equal(on_ray.results["h"], local.results["h"])
    assert torch.equal(on_ray.results["top"], local.results["top"])


def test_a_generation_sweep_on_ray_keeps_ids_and_texts(ray_instance, tiny_dir):
    model = LanguageModel(str(tiny_dir))
    prompts = [f"the city of {w} is" for w in ("paris", "rome", "new york")] * 3

    def generate(**options):
        with model.sweep(prompts, batch_size=2, shard_size=4, compile="off", generate={"max_new_tokens": 3},
                         **options) as sweep:
            coef = sweep.param("coef", [0.0, 3.0])
            with sweep.all():
                model.model.layers[1].output[:, -1, :] *= coef
                model.lm_head.output[:, -1, :].argmax(-1).save("top")
        return sweep.results
    local, on_ray = generate(), generate(executor=ray_cluster(workers=2))
    assert on_ray["top"].shape == (18, 3)
    assert torch.equal(on_ray["top"], local["top"])
    assert torch.equal(on_ray["__ids__:prompts"], local["__ids__:prompts"])
    assert on_ray.texts == local.texts and len(on_ray.texts["prompts"]) == 18


def shard_workers() -> list[int]:
    """The pids of the Ray workers of sweeps (their process title names the actor), those running a
    shard first (a worker of an earlier test may still be exiting)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            title = (entry / "cmdline").read_bytes() if entry.name.isdigit() else b""
        except OSError:
            continue
        if b"ray::ShardWorker" in title:
            found.append((b"ShardWorker.run" not in title, int(entry.name)))
    return [pid for _, pid in sorted(found)]


def test_a_worker_killed_mid_run_has_its_shard_retried_and_nothing_is_lost(ray_instance, tiny_dir, tmp_path):
    model = LanguageModel(str(tiny_dir))
    prompts = pairs(tmp_path, 360)
    out = tmp_path / "out"
    finished: dict[str, object] = {}

    def run() -> None:
        try:
            finished["results"] = patch_sweep(model, prompts, out, executor=ray_cluster(workers=2))
        except BaseException as e:  # reported by the assertion below
            finished["error"] = e
    sweep = threading.Thread(target=run)
    sweep.start()
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and sweep.is_alive():
        manifest = out / "manifest.json"
        if manifest.exists() and len(json.loads(manifest.read_text())["shards"]) >= 2:
            break
        time.sleep(0.01)
    victims = shard_workers()
    assert sweep.is_alive() and len(victims) >= 2, "the sweep ended before a worker could be killed"
    os.kill(victims[0], signal.SIGKILL)
    sweep.join(600)
    assert "error" not in finished, finished.get("error")
    results = finished["results"]
    assert victims[0] not in shard_workers()
    indexes = [s["index"] for s in results.manifest["shards"]]
    assert indexes == list(range(30)) and results.complete  # each shard once, none lost
    with worker_threads():
        assert torch.equal(results["logits"], patch_sweep(model, prompts)["logits"])


def test_an_error_in_the_experiment_stops_the_run_at_the_users_line(ray_instance, tiny_dir, tmp_path):
    """A prompt longer than the model's context (64 tokens) in the third shard: the same on every
    worker, so it is reported once, not retried; shards already written stay."""
    model = LanguageModel(str(tiny_dir))
    rows = [f"the city of paris {i % 7}" for i in range(60)]
    rows[30] = " ".join(["rome"] * 80)
    out = tmp_path / "out"
    line = sys._getframe().f_lineno + 2
    with pytest.raises(InterventionError) as caught:
        with model.sweep(rows, batch_size=4, shard_size=12, out=out, compile="off", executor="ray") as sweep:
            model.lm_head.output[:, -1, :].save("logits")
    assert f"{__file__}:{line}" in str(caught.value)
    assert "is 80 tokens long; the model's context is 64 tokens" in str(caught.value)
    assert sweep.results is None
    manifest = json.loads((out / "manifest.json").read_text())
    assert not manifest["complete"] and 2 not in [s["index"] for s in manifest["shards"]]


def test_a_failure_inside_a_worker_stops_the_run_with_its_prompts_and_reason(ray_instance, tmp_path):
    """Not an error of the experiment: the model itself raises on one prompt (shipped by value, as
    its class exists only here). The run stops with a located error naming the prompts, no traceback."""
    from helpers import tiny_llama, word_tokenizer
    from torch._subclasses.fake_tensor import is_fake
    from transformers import LlamaForCausalLM

    class Fragile(LlamaForCausalLM):
        def forward(self, input_ids=None, attention_mask=None, position_ids=None, **kwargs):
            if not is_fake(input_ids) and ((input_ids == 11).sum(-1) >= 2).any():  # "rome rome"
                raise RuntimeError("the model broke on a prompt")
            return super().forward(input_ids=input_ids, attention_mask=attention_mask,
                                   position_ids=position_ids, **kwargs)

    source = tiny_llama()
    fragile = Fragile(source.config).eval()
    fragile.load_state_dict(source.state_dict())
    model = LanguageModel(fragile, tokenizer=word_tokenizer())
    rows = [f"the city of paris {i % 7}" for i in range(30)]
    rows[20] = "rome rome"
    with pytest.raises(InterventionError) as caught:
        with model.sweep(rows, batch_size=4, shard_size=12, compile="off", out=tmp_path / "out",
                         executor="ray") as sweep:
            model.lm_head.output[:, -1, :].save("logits")
    message = str(caught.value)
    assert "a Ray worker failed on prompts 12..23: the model broke on a prompt" in message
    assert f"{__file__}:" in message and "Traceback" not in message
    assert sweep.results is None


def test_a_process_joined_to_one_cluster_refuses_another_address(ray_instance, tiny_dir):
    model = LanguageModel(str(tiny_dir))
    with pytest.raises(InterventionError, match="already joined the Ray cluster at .*; it cannot join 10.0.0.1:6379"):
        with model.sweep(["paris"], compile="off", executor=ray_cluster("10.0.0.1:6379")):
            model.lm_head.output[:, -1, :].save("logits")


def test_a_directory_of_another_experiment_is_refused_before_any_worker_starts(tiny_dir, tmp_path, monkeypatch):
    from interp_dsl import cluster
    from runtime.shards import ResultsDirError

    model = LanguageModel(str(tiny_dir))
    with model.sweep(["paris", "rome"], batch_size=2, compile="off", out=tmp_path / "out"):
        model.lm_head.output[:, -1, :].save("logits")
    monkeypatch.setattr(cluster.Pool, "__init__", lambda *a, **k: pytest.fail("a Ray worker was started"))
    with pytest.raises(ResultsDirError, match="holds results of a different experiment: the program differs"):
        with model.sweep(["paris", "rome"], batch_size=2, compile="off", out=tmp_path / "out", executor="ray"):
            model.model.norm.output[:, -1, :].save("logits")


EXPERIMENT = """model "{model}"
prompt text
sweep coef in [0.5, 2.0]
invoke text {{
    model.model.layers[1].output[:, -1, :] *= coef
    save logits = model.lm_head.output[:, -1, :]
}}
"""


def test_a_killed_driver_resumes_to_the_local_result(tiny_dir, tmp_path):
    """`ivx run --executor ray` killed (with its local Ray instance) after two shards; the same
    command finishes the run; it equals a local `ivx run`."""
    exp = tmp_path / "exp.ivx"
    exp.write_text(EXPERIMENT.format(model=tiny_dir))
    data = dataset(tmp_path / "p.jsonl", 2000, seed=3)
    args = ["run", str(exp), "--prompts", str(data), "--batch-size", "4", "--shard-size", "40", "--quiet",
            "--compile", "off"]
    command = [sys.executable, "-m", "interp_dsl.cli", *args, "--executor", "ray", "--workers", "2"]
    out = tmp_path / "killed"
    driver = subprocess.Popen([*command, "--out", str(out)], cwd=ROOT, start_new_session=True)
    wait_for_shards(out, 2, driver, timeout=240)
    assert driver.poll() is None, "the run ended before it was killed"
    os.killpg(driver.pid, signal.SIGKILL)  # the driver, and the Ray instance it started
    driver.wait()
    partial = load_results(out)
    assert not partial.complete and 2 <= len(partial.manifest["shards"]) < 50
    resumed = subprocess.run([*command, "--out", str(out)], cwd=ROOT, capture_output=True, text=True,
                             start_new_session=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    with worker_threads():
        assert main([*args, "--out", str(tmp_path / "local")]) == 0
    whole, local = load_results(out), load_results(tmp_path / "local")
    assert whole.complete and whole.n_prompts == 2000
    assert torch.equal(whole["logits"], local["logits"])


@pytest.mark.parametrize("flags, message", [
    (["--workers", "2"], "--ray-address and --workers go with --executor ray"),
    (["--executor", "ray", "--workers", "0"], "--workers is at least 1, got 0"),
    (["--executor", "ray", "--remote", "http://127.0.0.1:9"], "--remote and --executor ray"),
])
def test_ray_flags_are_checked(tiny_dir, tmp_path, capsys, flags, message):
    exp = tmp_path / "exp.ivx"
    exp.write_text(EXPERIMENT.format(model=tiny_dir).replace("prompt text", 'prompt text = "paris"'))
    assert main(["run", str(exp), "--out", str(tmp_path / "o"), *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_an_address_nothing_answers_at_is_an_error_in_seconds(tiny_dir, tmp_path):
    exp = tmp_path / "exp.ivx"
    exp.write_text(EXPERIMENT.format(model=tiny_dir).replace("prompt text", 'prompt text = "paris"'))
    done = subprocess.run([sys.executable, "-m", "interp_dsl.cli", "run", str(exp), "--out", str(tmp_path / "o"),
                           "--executor", "ray", "--ray-address", "127.0.0.1:1"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 1
    assert "--ray-address 127.0.0.1:1: error: cannot join the Ray cluster at 127.0.0.1:1: nothing answers" \
        in done.stderr and "Traceback" not in done.stderr
