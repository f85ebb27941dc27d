"""Run directories you can trust: a run's identity covers everything that determines its numbers,
shards are verified (a damaged one is named, skipped by readers and recomputed by a rerun), one
process writes a directory, and a run killed at any moment resumes to the uninterrupted result."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
from helpers import dataset, tiny_llama, wait_for_shards, word_tokenizer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

import runtime.shards
from interp_dsl import LanguageModel, load_results
from interp_dsl.cli import main
from runtime.shards import DamagedResultsWarning

STEER = """model "{model}"
prompt text
tensor v = load("{vector}")
invoke text {{
    model.model.layers[1].output[:, -1, :] += {coef} * v
    save h = model.model.layers[2].output[:, -1, :]
}}
"""


def ivx(capsys, *args) -> tuple[int, str]:
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


@pytest.fixture
def steer(tmp_path, tiny_dir):
    """An .ivx steering experiment over a 30-prompt jsonl; returns (write(coef), run args)."""
    vector = tmp_path / "v.safetensors"
    save_file({"v": torch.randn(32, generator=torch.Generator().manual_seed(0))}, str(vector))
    exp, data = tmp_path / "steer.ivx", dataset(tmp_path / "p.jsonl", 30)

    def write(coef: str = "0.5") -> None:
        exp.write_text(STEER.format(model=tiny_dir, vector=vector, coef=coef))
    write()
    return write, ["run", exp, "--prompts", data, "--batch-size", "4", "--shard-size", "10", "--quiet",
                   "--compile", "off", "--out", tmp_path / "out"]


def test_a_changed_value_is_refused_and_restart_recomputes(steer, tmp_path, capsys):
    write, args = steer
    assert ivx(capsys, *args)[0] == 0
    before = load_results(tmp_path / "out")["h"]
    write("40.0")
    code, err = ivx(capsys, *args)
    assert code == 1 and "holds results of a different experiment: parameter values differ (" in err, err
    assert "--restart" in err and "already complete" not in err
    assert torch.equal(load_results(tmp_path / "out")["h"], before)  # nothing was touched
    assert ivx(capsys, *args, "--restart")[0] == 0
    after = load_results(tmp_path / "out")["h"]
    assert after.shape == before.shape and not torch.allclose(after, before)
    write("0.5")
    assert ivx(capsys, *args, "--restart")[0] == 0
    torch.testing.assert_close(load_results(tmp_path / "out")["h"], before, atol=0, rtol=0)


def test_a_changed_tensor_file_is_refused(steer, tmp_path, capsys):
    _, args = steer
    assert ivx(capsys, *args)[0] == 0
    save_file({"v": torch.randn(32, generator=torch.Generator().manual_seed(1))}, str(tmp_path / "v.safetensors"))
    code, err = ivx(capsys, *args)
    assert code == 1 and "parameter values differ" in err, err


def test_changed_or_appended_prompts_are_refused(steer, tmp_path, capsys):
    _, args = steer
    assert ivx(capsys, *args)[0] == 0
    data = tmp_path / "p.jsonl"
    lines = data.read_text().splitlines()
    lines[13] = json.dumps({"text": "rome is a city"})  # a line of the second shard (prompts 10..19)
    data.write_text("\n".join(lines) + "\n")
    code, err = ivx(capsys, *args)
    assert code == 1 and f"prompts 10..19 ({data}) differ from those shard-00001.safetensors" in err, err
    data.write_text("\n".join([*lines, json.dumps({"text": "paris"})]) + "\n")
    code, err = ivx(capsys, *args)
    assert code == 1 and "the number of prompts: 30 there, 31 now" in err, err


def test_other_weights_are_refused(tmp_path):
    module = tiny_llama()
    model = LanguageModel(module, tokenizer=word_tokenizer())

    def run() -> None:
        with model.sweep(["the eiffel tower", "rome"], out=tmp_path / "w", compile="off"):
            model.model.layers[1].output[:, -1, :].save("h")
    run()
    with torch.no_grad():
        module.model.layers[0].mlp.down_proj.weight[3, 5] += 0.01  # one weight, not among the sampled
    with pytest.raises(runtime.shards.ResultsDirError, match="the model's weights differs"):
        run()


def test_the_weight_fingerprint_samples_inside_a_large_tensor():
    """2**24 + 4 elements: float32 spacing there is 2, so a float sample position would round past
    the last element (SmolLM2's 49152 x 576 embedding hit this)."""
    from runtime.fingerprints import weights_fingerprint

    module = torch.nn.Module()
    module.register_buffer("w", torch.zeros(2**24 + 4, dtype=torch.uint8))
    before = weights_fingerprint(module)
    module.w[-1] = 1  # the last element is always sampled
    assert weights_fingerprint(module) != before


@pytest.mark.parametrize("dtype, view", [(torch.float32, "<i4"), (torch.bfloat16, "<i2"), (torch.int64, "<i8")])
def test_the_weight_fingerprint_sums_bit_patterns_exactly_and_leaves_the_tensor_alone(dtype, view):
    """Across chunk boundaries (2 * 65536 + 5 elements), against Python integers over the raw bytes;
    an int64 tensor is its own bit pattern, and squaring it must not square the weights."""
    import numpy as np

    from runtime.fingerprints import _bit_sums
    torch.manual_seed(0)
    n = 2 * 65536 + 5
    flat = (torch.randint(-2**62, 2**62, (n,)) if dtype == torch.int64 else torch.randn(n) * 1e4).to(dtype)
    before = flat.clone()
    patterns = [int(v) for v in np.frombuffer(flat.view(torch.uint8).numpy().tobytes(), dtype=view)]
    assert _bit_sums(flat) == (sum(patterns) % 2**64, sum(v * v for v in patterns) % 2**64)
    assert torch.equal(flat, before)


def test_a_tied_weight_is_fingerprinted_like_two_equal_ones():
    """A tied weight is read once (it appears under each of its names); the fingerprint is the one
    of a model whose two weights are equal copies."""
    from runtime.fingerprints import weights_fingerprint

    torch.manual_seed(0)
    tied, untied = torch.nn.Module(), torch.nn.Module()
    tied.a = torch.nn.Linear(8, 16)
    tied.b = torch.nn.Linear(8, 16)
    tied.b.weight = tied.a.weight
    untied.a, untied.b = torch.nn.Linear(8, 16), torch.nn.Linear(8, 16)
    untied.load_state_dict(tied.state_dict())
    assert untied.a.weight.data_ptr() != untied.b.weight.data_ptr()
    assert weights_fingerprint(tied) == weights_fingerprint(untied)
    with torch.no_grad():
        untied.b.weight[3, 3] += 1.0
    assert weights_fingerprint(tied) != weights_fingerprint(untied)


def test_the_weight_fingerprint_does_not_depend_on_the_thread_count():
    """A float64 sum of 16M elements differs between 1 and 2 threads here; the fingerprint must not
    (a Ray worker or a resumed run uses other thread counts than the process that wrote the manifest)."""
    from runtime.fingerprints import weights_fingerprint

    torch.manual_seed(0)
    module = torch.nn.Linear(4096, 4096)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = weights_fingerprint(module)
        torch.set_num_threads(2)
        two = weights_fingerprint(module)
    finally:
        torch.set_num_threads(threads)
    assert one == two
    with torch.no_grad():
        module.weight[1000, 7] += 1e-3  # not a sampled element
    assert weights_fingerprint(module) != one


def test_a_damaged_shard_is_named_skipped_by_readers_and_recomputed(steer, tmp_path, capsys):
    _, args = steer
    assert ivx(capsys, *args)[0] == 0
    out = tmp_path / "out"
    whole = load_results(out)
    files = {p.name: p.read_bytes() for p in out.glob("shard-*.safetensors")}
    assert sorted(files) == ["shard-00000.safetensors", "shard-00001.safetensors", "shard-00002.safetensors"]
    (out / "shard-00001.safetensors").write_bytes(files["shard-00001.safetensors"][:-4])
    with pytest.warns(DamagedResultsWarning, match=r"shard-00001.safetensors \(prompts 10..19\) was changed"):
        partial = load_results(out)
    assert [d["file"] for d in partial.missing] == ["shard-00001.safetensors"] and not partial.complete
    assert partial.n_prompts == 20 and partial.index["prompt"].tolist() == [*range(10), *range(20, 30)]
    torch.testing.assert_close(partial["h"], torch.cat([whole["h"][:10], whole["h"][20:]]), atol=0, rtol=0)
    code, text = ivx(capsys, "show", out)
    assert code == 1 and "damaged: shard-00001.safetensors (prompts 10..19)" in text
    (out / "shard-00002.safetensors").unlink()
    before = {n: (out / n).stat().st_mtime_ns for n in ("shard-00000.safetensors",)}
    with pytest.warns(DamagedResultsWarning, match="recomputing shard-00001.safetensors .*; shard-00002"):
        assert ivx(capsys, *args)[0] == 0
    assert (out / "shard-00000.safetensors").stat().st_mtime_ns == before["shard-00000.safetensors"]
    assert {p.name: p.read_bytes() for p in out.glob("shard-*.safetensors")} == files
    resumed = load_results(out)
    assert resumed.complete and not resumed.missing
    torch.testing.assert_close(resumed["h"], whole["h"], atol=0, rtol=0)


def test_one_writer_and_a_stale_lock_is_taken(steer, tmp_path, capsys):
    _, args = steer
    out = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from pathlib import Path; from runtime.files import DirectoryLock\n"
        f"with DirectoryLock(Path({str(out)!r})):\n    print('held', flush=True); time.sleep(60)")],
        stdout=subprocess.PIPE, text=True, cwd=Path(__file__).parent.parent)
    try:
        assert holder.stdout.readline().strip() == "held"
        code, err = ivx(capsys, *args)
        assert code == 1 and f"{out} is being written by pid {holder.pid} on " in err, err
        assert not (out / "manifest.json").exists()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert ivx(capsys, *args)[0] == 0  # the lock of a killed process is taken over
    assert load_results(out).complete


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_files_follow_the_umask(steer, tmp_path, capsys, umask):
    _, args = steer
    old = os.umask(umask)
    try:
        assert ivx(capsys, *args)[0] == 0
    finally:
        os.umask(old)
    for path in (tmp_path / "out").iterdir():
        if path.name != ".ivx-lock":
            assert path.stat().st_mode & 0o777 == 0o666 & ~umask, path


# ------------------------------------------------------------------------------ interruption
PROMPTS = 48


def _sweep(model, data: Path, out: Path) -> None:
    with model.sweep(data, batch_size=4, shard_size=8, out=out, compile="off") as sweep:
        coef = sweep.param("coef", [0.0, 3.0])
        model.model.layers[1].output[:, -1, :] *= coef
        model.lm_head.output[:, -1, :5].save("logits")


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory, tiny_dir):
    """The model, a dataset, and the uninterrupted results of `_sweep` over it."""
    root = tmp_path_factory.mktemp("interrupted")
    model = LanguageModel(str(tiny_dir))
    data = dataset(root / "p.jsonl", PROMPTS, seed=3)
    _sweep(model, data, root / "whole")
    return model, data, load_results(root / "whole")


class _Killed(BaseException):
    pass


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(write=st.integers(0, 2 * PROMPTS // 8 + 1), partial=st.booleans())
def test_a_stop_at_any_write_resumes_bit_identical(interrupted, monkeypatch, write, partial):
    """Stop the sweep at its n-th file write (a manifest or a shard), before or after the
    temporary file is written: a rerun gives exactly the uninterrupted rows."""
    model, data, whole = interrupted
    out = Path(tempfile.mkdtemp(prefix="ivx-stop-"))
    real, calls = runtime.shards.atomic_write, []

    def dying(path: Path, write_file) -> None:
        calls.append(path)
        if len(calls) == write + 1:
            if partial:  # killed half way through the temporary file
                (path.parent / f".{path.name}.dead").write_bytes(b"\0" * 10)
            raise _Killed
        real(path, write_file)
    monkeypatch.setattr(runtime.shards, "atomic_write", dying)
    with pytest.raises(_Killed):
        _sweep(model, data, out)
    monkeypatch.setattr(runtime.shards, "atomic_write", real)
    _sweep(model, data, out)
    resumed = load_results(out)
    assert resumed.complete and not list(out.glob(".*.dead"))
    assert torch.equal(resumed.index["prompt"], whole.index["prompt"])
    torch.testing.assert_close(resumed["logits"], whole["logits"], atol=0, rtol=0)
    shutil.rmtree(out)


SCRIPT = """
import sys
from pathlib import Path
from interp_dsl import LanguageModel
sys.path.insert(0, {tests!r})
from test_run_dirs import _sweep
_sweep(LanguageModel({model!r}), Path({data!r}), Path({out!r}))
"""


@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(shards=st.integers(0, 4), delay=st.floats(0, 0.05))
def test_kill_9_at_any_moment_resumes_bit_identical(interrupted, tiny_dir, shards, delay):
    """A real SIGKILL, once `shards` shards are listed and `delay` seconds later."""
    model, data, whole = interrupted
    out = Path(tempfile.mkdtemp(prefix="ivx-stop-"))
    script = SCRIPT.format(tests=str(Path(__file__).parent), model=str(tiny_dir), data=str(data), out=str(out))
    process = subprocess.Popen([sys.executable, "-c", script], cwd=Path(__file__).parent.parent)
    wait_for_shards(out, shards, process)
    time.sleep(delay)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL, "the sweep ended before it was killed"
    _sweep(model, data, out)
    resumed = load_results(out)
    assert resumed.complete
    torch.testing.assert_close(resumed["logits"], whole["logits"], atol=0, rtol=0)
    shutil.rmtree(out)
