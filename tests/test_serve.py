"""`ivx serve` and `remote=`: a real server in a subprocess on 127.0.0.1, checked against local runs."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch
from helpers import wait_for_shards, word_tokenizer

from compiler.errors import ExecutionError, InterventionError
from interp_dsl import LanguageModel
from interp_dsl.client import Remote, RemoteError, remote
from interp_dsl.keys import KeyFileError, digest, new_key, read_keys
from interp_dsl.wire import encode_job

ROOT = Path(__file__).resolve().parent.parent
TIGHT_KEY = "tight-key-for-tests"
MAX_REQUEST = 4 * 2**20


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`ivx serve` in a subprocess; stopped by its pid."""

    def __init__(self, model_dir: Path, keys: Path):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "interp_dsl.cli", "serve", "--model", str(model_dir), "--port", str(self.port),
             "--keys", str(keys), "--max-request-bytes", str(MAX_REQUEST)],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ivx serve exited: {self.proc.communicate()[1]}")
            try:
                self.health()
                return
            except OSError:
                time.sleep(0.2)
        self.stop()
        raise RuntimeError("ivx serve did not start in 120 s")

    def health(self) -> dict:
        with urllib.request.urlopen(f"{self.url}/v1/health", timeout=5) as r:
            return json.loads(r.read())

    def post(self, body: bytes, key: str | None) -> tuple[int, dict]:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        request = urllib.request.Request(f"{self.url}/v1/jobs", data=body, method="POST", headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=30) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    def get(self, path: str, key: str) -> tuple[int, bytes]:
        request = urllib.request.Request(f"{self.url}{path}", headers={"Authorization": f"Bearer {key}"})
        try:
            with urllib.request.urlopen(request, timeout=30) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def stop(self, sig: int = signal.SIGTERM) -> tuple[int, str]:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, sig)
        _, err = self.proc.communicate(timeout=60)
        return self.proc.returncode, err


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> tuple[Path, str]:
    path = tmp_path_factory.mktemp("keys") / "keys.txt"
    alice = new_key(path, "alice")
    with path.open("a") as f:
        f.write(f"tight sha256:{digest(TIGHT_KEY)} max_jobs=1 max_seconds=1 max_tokens=20 max_result_bytes=4096\n")
    return path, alice


@pytest.fixture(scope="module")
def server(tiny_dir, keys):
    running = Server(tiny_dir, keys[0])
    yield running
    running.stop()


@pytest.fixture(scope="module")
def local(tiny_dir):
    return LanguageModel(tiny_dir)


@pytest.fixture(scope="module")
def fake(tiny_dir):
    """The client's model: built from the config beside the weights, no weight memory."""
    return LanguageModel(tiny_dir / "config.json", weights="fake")


def patching(model, where=False):
    """Saves and writes across two invokes (three rows), values flowing between them."""
    with model.trace(remote=where) as tracer:
        with tracer.invoke("the eiffel tower is in the city of"):
            h = model.model.layers[0].output[:, -1].save()
            mlp = model.model.layers[1].mlp.output.save()
        with tracer.invoke(["madison square garden is in", "rome"]):
            model.model.layers[1].output[:, -1] = h * 2.0
            model.model.layers[2].mlp.output[:] = 0
            logits = model.lm_head.output.save()
            top = logits[:, -1].topk(3)
            ids = top.indices.save()
    return {"h": h.value, "mlp": mlp.value, "logits": logits.value, "ids": ids.value}


def slow(model, where, matmuls: int = 40):
    """A trace whose ops take seconds on a CPU (a chain of 1000x1000 matmuls)."""
    with model.trace("the eiffel tower", remote=where):
        x = model.model.layers[0].output[0, :1, :1].expand(1000, 1000) * 0 + 1e-3
        for _ in range(matmuls):
            x = x @ x
        y = x[0, 0].save()
    return y.value


def test_remote_equals_local(server, keys, local, fake, tiny_dir, capsys):
    expected = patching(local)
    for client in (local, fake, LanguageModel(tiny_dir, weights="fake")):
        got = patching(client, remote(server.url, keys[1]))
        assert got.keys() == expected.keys()
        for name in expected:
            torch.testing.assert_close(got[name], expected[name], msg=name)
    progress = capsys.readouterr().err
    assert "] RECEIVED" in progress and "] RUNNING" in progress and "] COMPLETED" in progress
    patching(fake, remote(server.url, keys[1], quiet=True))
    assert capsys.readouterr().err == ""


def test_remote_generate_equals_local(server, keys, local, fake, monkeypatch):
    monkeypatch.setenv("IVX_REMOTE_URL", server.url)
    monkeypatch.setenv("IVX_API_KEY", keys[1])

    def run(model, where):
        with model.generate("the eiffel tower is in", max_new_tokens=3, remote=where) as tracer:
            with tracer.all():
                model.model.layers[1].output[:, -1] *= 0.5
                top = model.lm_head.output[:, -1].argmax(-1).save()
            ids = model.generator.output.save()
        return ids.value, top.value

    ids, tops = run(local, False)
    remote_ids, remote_tops = run(fake, True)
    torch.testing.assert_close(remote_ids, ids)
    assert len(remote_tops) == len(tops) == 3
    for a, b in zip(remote_tops, tops, strict=True):
        torch.testing.assert_close(a, b)


def test_a_remote_session_equals_a_local_one(server, keys, local, fake, capsys):
    """Values flow between the session's traces without .save(), each trace a job."""
    def run(model, where):
        with model.session(remote=where):
            with model.trace("the eiffel tower is in the city of"):
                hidden = model.model.layers[2].output[:, -1, :]
            with model.trace("rome is in"):
                model.model.layers[0].output[:, -1, :] = hidden
                logits = model.lm_head.output.save()
        return hidden.value, logits.value

    want = run(local, False)
    capsys.readouterr()
    got = run(fake, remote(server.url, keys[1]))
    assert capsys.readouterr().err.count("] COMPLETED") == 2
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b)


def test_a_remote_job_does_not_train_tensors(server, keys, fake):
    delta = torch.zeros(32, requires_grad=True)
    with pytest.raises(RemoteError, match="cannot give your tensors their gradients"):
        with fake.trace("the eiffel tower", remote=remote(server.url, keys[1])):
            fake.model.layers[1].output[:, -1] += delta
            fake.lm_head.output[0, -1, 3].backward()


def _job_body(tracer) -> bytes:
    """The body `remote=` would send for a trace that ran locally (its program, token ids, params)."""
    from compiler.ir import dumps
    batch = tracer.batch()
    return encode_job(dumps(tracer.program()), batch.kwargs["input_ids"], batch.kwargs["attention_mask"],
                      list(batch.rows), batch.pad_id, tracer.params)


def _queued(model, submitted, batch_rows=32) -> list[tuple[dict, int]]:
    """Submit every (key, body) to an in-process queue before its worker starts, then run them:
    each job's values, and how many jobs its forward ran."""
    from interp_dsl.jobs import JobQueue
    from interp_dsl.wire import decode_result
    queue = JobQueue(model, batch_rows=batch_rows)
    out = []
    try:
        records = [queue.submit(body, key) for key, body in submitted]
        queue.start()
        for record, (key, _) in zip(records, submitted, strict=True):
            while queue.status(record.id, key)["status"] not in ("COMPLETED", "ERROR"):
                time.sleep(0.02)
            shared = queue.status(record.id, key)["batched_jobs"]
            out.append((decode_result(queue.result(record.id, key))[0], shared))
    finally:
        queue.close()
    return out


def test_a_job_reading_only_the_last_logits_runs_the_head_on_the_last_position(tiny_dir, tmp_path):
    """The server decides it (a job sends token ids only), as a local sweep does: in process."""
    from interp_dsl.jobs import JobQueue
    from interp_dsl.wire import decode_result
    model = LanguageModel(tiny_dir)
    new_key(tmp_path / "keys.txt", "bob")
    key = read_keys(tmp_path / "keys.txt")[0]
    with model.trace("the eiffel tower is in the city of") as tracer:
        last = model.lm_head.output[:, -1, :].save()
    program, body = tracer.program(), _job_body(tracer)
    shapes = []
    from torch._subclasses.fake_tensor import FakeTensor
    handle = model.module.lm_head.register_forward_hook(
        lambda m, a, o: None if isinstance(o, FakeTensor) else shapes.append(tuple(o.shape)))
    queue = JobQueue(model)
    queue.start()
    try:
        record = queue.submit(body, key)
        while queue.status(record.id, key)["status"] not in ("COMPLETED", "ERROR"):
            time.sleep(0.02)
        values, _, _ = decode_result(queue.result(record.id, key))
    finally:
        handle.remove()
        queue.close()
    assert shapes == [(1, 1, 64)]  # the head ran once, on one position
    torch.testing.assert_close(values[program.saves()["save0"]], last.value, rtol=1e-5, atol=1e-6)  # other sums


def _scaled_job(model, prompt, scale, stop=False):
    """A job body that scales layer 1's last position by `scale` and saves logits and a hidden
    state, with the values the same trace gives run alone, locally."""
    with model.trace(prompt) as tracer:
        model.model.layers[1].output[:, -1] *= scale
        hidden = model.model.layers[2].output.save()
        logits = model.lm_head.output.save()
        if stop:
            model.model.layers[2].output.stop()
    program, body = tracer.program(), _job_body(tracer)
    saves = program.saves()
    return body, {saves["save0"]: hidden.value, **({} if stop else {saves["save1"]: logits.value})}


def test_jobs_with_one_program_share_a_forward_and_each_gets_its_own_rows(tiny_dir, tmp_path):
    """Queued jobs of several keys (one program, other prompts of the same length, other scales)
    run as one batch; each result equals its job run alone. A job of another length, another
    program, or one that ends the forward early runs alone."""
    model = LanguageModel(tiny_dir)
    for name in ("bob", "carol"):
        new_key(tmp_path / "keys.txt", name)
    bob, carol = read_keys(tmp_path / "keys.txt")
    jobs = [(bob, "the eiffel tower is", 0.0), (carol, "madison square garden is", 1.0),
            (bob, "rome is a city", 3.0), (carol, "the eiffel tower is in the city of", 2.0),
            (carol, "new york is a", 0.5)]
    made = [(key, *_scaled_job(model, prompt, scale)) for key, prompt, scale in jobs]
    made.append((bob, *_scaled_job(model, "paris is a city", 1.0, stop=True)))
    from torch._subclasses.fake_tensor import FakeTensor
    forwards = []  # rows of each real forward
    handle = model.module.register_forward_pre_hook(
        lambda m, a, k: None if isinstance(k["input_ids"], FakeTensor) else forwards.append(k["input_ids"].shape[0]),
        with_kwargs=True)
    try:
        ran = _queued(model, [(key, body) for key, body, _ in made], batch_rows=3)
    finally:
        handle.remove()
    for (values, _), (_, _, expected) in zip(ran, made, strict=True):
        assert values.keys() == expected.keys()
        for i, value in expected.items():
            torch.testing.assert_close(values[i], value, rtol=1e-5, atol=1e-6)
    # 4-token prompts: jobs 0, 1, 2, 4 (3 rows at most: 0+1+2, then 4 alone); 8 tokens: job 3; stop: alone
    assert [shared for _, shared in ran] == [3, 3, 3, 1, 1, 1]
    assert forwards == [3, 1, 1, 1]


def test_jobs_queued_behind_a_running_one_share_the_next_forward_over_http(server, keys, local, fake):
    """Three users' jobs (one program, other prompts and scales) wait while a slow job runs; they
    then run as one forward, and each gets its own values."""
    from interp_dsl.wire import decode_result
    slow_one = threading.Thread(target=slow, args=(fake, remote(server.url, keys[1], quiet=True)))
    slow_one.start()
    deadline = time.monotonic() + 60
    while server.health()["running"] == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    made = [_scaled_job(local, prompt, scale) for prompt, scale in
            (("the eiffel tower is", 0.0), ("madison square garden is", 2.0), ("rome is a city", -1.0))]
    posted = [server.post(body, keys[1]) for body, _ in made]
    assert [code for code, _ in posted] == [202, 202, 202]
    slow_one.join()
    for (_, job), (_, expected) in zip(posted, made, strict=True):
        while json.loads(server.get(f"/v1/jobs/{job['id']}", keys[1])[1])["status"] not in ("COMPLETED", "ERROR"):
            time.sleep(0.02)
        status = json.loads(server.get(f"/v1/jobs/{job['id']}", keys[1])[1])
        assert status["status"] == "COMPLETED" and status["batched_jobs"] == 3, status
        code, body = server.get(f"/v1/jobs/{job['id']}/result", keys[1])
        values, _, _ = decode_result(body)
        for i, value in expected.items():
            torch.testing.assert_close(values[i], value, rtol=1e-4, atol=1e-5)  # other thread counts


def test_jobs_working_in_place_run_alone_and_writes_to_per_row_tensors_stay_private(tiny_dir, tmp_path):
    """An in-place op could change a tensor the rows share: such jobs run alone. Writes into the
    rotary embedding's (cos, sin), one row per batch row here (the batch carries position ids),
    share a forward and stay in their own rows."""
    model = LanguageModel(tiny_dir)
    new_key(tmp_path / "keys.txt", "bob")
    (bob,) = read_keys(tmp_path / "keys.txt")

    def job(prompt, scale, in_place):
        with model.trace(prompt) as tracer:
            if in_place:
                model.model.layers[0].output.mul_(scale)
            else:
                model.model.rotary_emb.output[0][:] = model.model.rotary_emb.output[0] * scale
            logits = model.lm_head.output.save()
        program, body = tracer.program(), _job_body(tracer)
        return body, program.saves()["save0"], logits.value

    made = [job("the eiffel tower is", 0.0, False), job("madison square garden is", 1.0, False),
            job("the eiffel tower is", 0.5, True), job("madison square garden is", 2.0, True)]
    ran = _queued(model, [(bob, body) for body, _, _ in made])
    for (values, _), (_, save, expected) in zip(ran, made, strict=True):
        torch.testing.assert_close(values[save], expected, rtol=1e-5, atol=1e-6)
    assert [shared for _, shared in ran] == [2, 2, 1, 1]
    assert not torch.allclose(made[0][2][:, -1], made[1][2][:, -1])


def test_a_padded_job_and_an_unpadded_one_do_not_share_a_forward(tiny_dir, tmp_path):
    """Padding changes what the layers are passed (a mask, or none): whether another user's job
    is padded must not show in a job's values, so such jobs run apart."""
    model = LanguageModel(tiny_dir)
    new_key(tmp_path / "keys.txt", "bob")
    (bob,) = read_keys(tmp_path / "keys.txt")

    def job(prompts):
        with model.trace() as tracer:
            with tracer.invoke(prompts):
                mask = model.model.layers[0].inputs[1]["attention_mask"].save()
        program, body = tracer.program(), _job_body(tracer)
        return body, program.saves()["save0"], mask.value

    made = [job(["the eiffel tower is", "paris is"]), job(["rome is a city"]), job(["new york is a"])]
    assert made[0][2] is not None and made[1][2] is None  # padded: a mask; not padded: none
    ran = _queued(model, [(bob, body) for body, _, _ in made])
    for (values, _), (_, save, expected) in zip(ran, made, strict=True):
        assert (values[save] is None) == (expected is None)
    assert [shared for _, shared in ran] == [1, 2, 2]


SWEEP_PROMPTS = ["the eiffel tower is in", "rome", "new york is a city of", "paris", "the colosseum is in the city"]


def test_a_remote_sweep_equals_local_and_resumes(server, keys, local, fake, tmp_path):
    vec = torch.randn(32, generator=torch.Generator().manual_seed(0))

    def run(model, out, **where):
        with model.sweep(SWEEP_PROMPTS, batch_size=2, shard_size=2, out=out, compile="off", progress=False,
                         **where) as sweep:
            layer = sweep.param("layer", [0, 2])  # vectorised rows
            coef = sweep.param("coef", [0.0, 3.0])  # a parameter sent with each job
            model.model.layers[layer].output[:, -1, :] += coef * vec
            model.lm_head.output[:, -1, :].save("logits")
        return sweep
    server_ = remote(server.url, keys[1], quiet=True)
    remote_run, local_run = run(fake, tmp_path / "remote", remote=server_), run(local, tmp_path / "local")
    got, expected = remote_run.results, local_run.results
    assert got.dims == expected.dims and got["logits"].shape == expected["logits"].shape == (20, 64)
    torch.testing.assert_close(got["logits"], expected["logits"])
    # the manifest names the server's model and weights, as a local run of that model does
    assert got.manifest["server"] == server.url
    assert (got.manifest["model"], got.manifest["weights"]) == (expected.manifest["model"], expected.manifest["weights"])
    (tmp_path / "remote" / "shard-00001.safetensors").unlink()
    with pytest.warns(UserWarning, match="recomputing shard-00001.safetensors"):
        again = run(fake, tmp_path / "remote", remote=server_)
    assert again.ran == 2  # exactly the lost shard's prompts
    torch.testing.assert_close(again.results["logits"], expected["logits"])


def test_a_remote_generation_sweep_equals_local(server, keys, local, fake):
    def run(model, **where):
        with model.sweep(SWEEP_PROMPTS, batch_size=2, generate={"max_new_tokens": 3}, compile="off",
                         progress=False, **where) as sweep:
            with sweep.all():
                model.model.layers[1].output[:, -1] *= 0.5
                model.lm_head.output[:, -1].argmax(-1).save("top")
        return sweep.results
    got, expected = run(fake, remote=remote(server.url, keys[1], quiet=True)), run(local)
    assert torch.equal(got["__ids__:prompts"], expected["__ids__:prompts"])
    assert torch.equal(got["top"], expected["top"]) and got["top"].shape == (5, 3)
    assert got.texts == expected.texts and len(got.texts["prompts"]) == 5


def test_ivx_run_remote_equals_local(server, keys, tiny_dir, tmp_path, monkeypatch, capsys):
    from interp_dsl.cli import main
    (tmp_path / "rows.txt").write_text("the eiffel tower\nparis is\nrome\n")
    exp = tmp_path / "e.ivx"
    exp.write_text(f'model "{tiny_dir}"\nprompt a = lines("rows.txt")\nsweep layer in [0, 1]\n'
                   'invoke a {\n    save h = model.model.layers[layer].output[:, -1, :]\n}\n')
    monkeypatch.setenv("IVX_API_KEY", keys[1])
    remote_args = ["run", str(exp), "--out", str(tmp_path / "r"), "--remote", server.url, "--quiet"]
    assert main(remote_args) == 0
    assert main(["run", str(exp), "--out", str(tmp_path / "l"), "--quiet"]) == 0
    from interp_dsl import load_results
    got, expected = load_results(tmp_path / "r"), load_results(tmp_path / "l")
    assert got["h"].shape == (6, 32)
    torch.testing.assert_close(got["h"], expected["h"])
    capsys.readouterr()
    assert main(remote_args[:-1]) == 0 and "already complete; nothing ran" in capsys.readouterr().out
    assert main([*remote_args[:4], "--remote", "http://127.0.0.1:9", "--restart"]) == 1
    err = capsys.readouterr().err
    assert "cannot reach the server at http://127.0.0.1:9" in err and "runpy" not in err
    assert err.startswith("--remote http://127.0.0.1:9")  # the error names the flag, not our internals
    assert main([*remote_args[:4], "--remote", ""]) == 2  # an empty URL (an unset variable) is not "local"
    assert main([*remote_args, "--compile", "graph"]) == 2


def test_failing_job_reports_the_users_line(server, keys, local, fake):
    def failing(model, where=False):
        with model.trace("the eiffel tower", remote=where):
            h = model.model.layers[0].output
            torch.linalg.cholesky(h[0, :2, :2] * 0 - 1).save()  # not positive-definite: fails when run

    with pytest.raises(ExecutionError) as here:
        failing(local)
    with pytest.raises(ExecutionError) as there:
        failing(fake, remote(server.url, keys[1], quiet=True))
    assert [d.span for d in there.value.diagnostics] == [d.span for d in here.value.diagnostics]
    assert str(there.value) == str(here.value)  # this file's line, quoted by the client
    assert f"{__file__}:" in str(there.value) and "cholesky(h[0, :2, :2]" in str(there.value)
    assert server.health()["status"] == "ok"


def small(model, where):
    with model.trace("the eiffel tower", remote=where):
        h = model.model.layers[0].output[:, -1].save()
    return h.value


def test_a_key_is_needed(server, fake):
    for key in (None, "not-a-key"):
        with pytest.raises(RemoteError, match=r"refused the job \(401\): a valid API key is needed"):
            small(fake, Remote(server.url, key, quiet=True))


def test_limits_are_named(server, fake, local):
    tight = remote(server.url, TIGHT_KEY, quiet=True)
    with pytest.raises(RemoteError, match=r"\(413\): the job is 24 tokens .* limit is 20 \(max_tokens\)"):
        patching(fake, tight)
    with pytest.raises(RemoteError, match=r"the saves are \d+ bytes; this key's limit is 4096 \(max_result_bytes\)"):
        with fake.trace("the eiffel tower", remote=tight):
            fake.lm_head.output.expand(64, -1, -1).save()  # 64 x 3 x 64 floats
    errors = []
    worker = threading.Thread(target=lambda: errors.append(_raises(lambda: slow(fake, tight, matmuls=200))))
    worker.start()
    while server.health()["running"] == 0 and worker.is_alive():
        time.sleep(0.05)
    with pytest.raises(RemoteError, match=r"\(429\): this key has 1 jobs queued or running; its limit is 1 \(max_jobs\)"):
        small(local, tight)  # another model: the slow trace holds `fake` open until it ends
    worker.join()
    assert "ran past this key's limit of 1 seconds (max_seconds)" in str(errors[0])


def _raises(fn) -> Exception | None:
    try:
        fn()
    except Exception as e:
        return e
    return None


def _job(program: str = None, ids=None, rows=((0, 1),), params=None) -> bytes:
    ids = torch.tensor([[2, 3, 4]]) if ids is None else ids
    return encode_job(program or PROGRAM, ids, torch.ones_like(ids), [slice(a, b) for a, b in rows], 0, params or {})


PROGRAM = json.dumps({"$": "Program", "ops": [], "n_invokes": 1, "version": 1})


@pytest.mark.parametrize("body, status, reason", [
    (b"not safetensors", 400, "not a safetensors file"),
    (b"\xff" * 8 + b"{}", 400, "header claims"),
    (_job(program="{not json"), 400, "not JSON"),
    (_job(program=json.dumps({"$": "Program", "ops": [{"$": "Op", "opcode": "call", "result": 0, "target": "getattr",
                                                       "span": {"$": "Span", "file": "x.py", "line": 1}}]})),
     400, "op 0 (call getattr)"),
    (_job(program=json.dumps({"$": "Program", "ops": [{"$": "Op", "opcode": "call", "result": 0,
                                                       "target": "torch.load"}]})), 400, "op 0"),
    (_job(program=json.dumps({"$": "Program", "ops": [  # a gradient whose pass names code, not a number
        {"$": "Op", "opcode": "grad", "result": 0, "args": [{"$": "Const", "value": "os.system"}],
         "site": {"$": "Site", "module": "model.layers.0", "kind": "output"}}]})), 400, "op 0: a grad names its backward pass"),
    (_job(program=json.dumps({"$": "Program", "ops": [  # a backward with a target to call
        {"$": "Op", "opcode": "param", "result": 0, "target": "p0",
         "type": {"$": "ScalarType", "kind": "float"}},
        {"$": "Op", "opcode": "backward", "target": "eval", "args": [{"$": "Ref", "id": 0}]}]})),
     400, "op 1 (backward eval)"),
    (_job(ids=torch.tensor([[2, 3, 999]])), 400, "token ids run from 0 to 63"),
    (_job(rows=((0, 1), (1, 2))), 400, "rows must split the batch's 1 rows"),
    (_job(params={"p0": torch.ones(3)}), 400, "unknown p0"),
    (b"\0" * (MAX_REQUEST + 1), 413, "max_request_bytes"),
])
def test_hostile_payloads_are_refused_and_the_server_keeps_serving(server, keys, body, status, reason):
    code, answer = server.post(body, keys[1])
    assert code == status and reason in answer["error"], answer
    assert server.health()["status"] == "ok"


def test_new_key_stores_only_its_hash(tmp_path, capsys):
    from interp_dsl.cli import main
    path = tmp_path / "keys.txt"
    assert main(["serve", "--keys", str(path), "--new-key", "bob"]) == 0
    key = capsys.readouterr().out.strip()
    assert key not in path.read_text() and digest(key) in path.read_text()
    assert [k.name for k in read_keys(path)] == ["bob"]
    assert main(["serve", "--keys", str(path), "--new-key", "bob"]) == 2  # names are unique
    bad = tmp_path / "bad.txt"
    bad.write_text("carol sha256:1234 max_jobs=2\n")
    with pytest.raises(KeyFileError, match=r"bad.txt:1: expected `NAME sha256:<64 hex digits>"):
        read_keys(bad)
    bad.write_text(f"carol sha256:{digest('k')} max_job=2\n")
    with pytest.raises(KeyFileError, match=r"bad.txt:1: unknown limit 'max_job=2'; limits are max_jobs"):
        read_keys(bad)
    assert main(["serve", "--keys", str(bad)]) == 2
    assert "unknown limit" in capsys.readouterr().err


def test_jobs_are_private_to_their_key(server, keys):
    code, job = server.post(_job(), keys[1])
    assert code == 202

    def get(path: str, key: str) -> tuple[int, dict]:
        request = urllib.request.Request(f"{server.url}{path}", headers={"Authorization": f"Bearer {key}"})
        try:
            with urllib.request.urlopen(request, timeout=10) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    code, status = get(f"/v1/jobs/{job['id']}", keys[1])
    assert code == 200 and status["id"] == job["id"]
    code, answer = get(f"/v1/jobs/{job['id']}/result", TIGHT_KEY)
    assert code == 404 and "no job" in answer["error"]


def test_stopping_the_server_mid_job_is_a_clear_error(tiny_dir, keys, fake):
    own = Server(tiny_dir, keys[0])
    errors = []
    worker = threading.Thread(target=lambda: errors.append(_raises(lambda: slow(fake, remote(own.url, keys[1], quiet=True)))))
    worker.start()
    while own.health()["running"] == 0 and worker.is_alive():
        time.sleep(0.05)
    code, err = own.stop(signal.SIGTERM)
    worker.join()
    assert code == 0 and "ivx serve: stopped" in err and "Traceback" not in err
    assert isinstance(errors[0], RemoteError)
    message = str(errors[0])
    assert f"lost the server at {own.url} while job" in message and "was RUNNING" in message
    assert "Traceback" not in message


def test_a_server_killed_mid_sweep_keeps_the_shards_and_a_rerun_completes(tiny_dir, keys, tmp_path):
    """SIGKILL the server while `ivx run --remote` streams a prompt file: the run fails with a
    clear error, its finished shards stay, and the same command on a new server completes them."""
    from interp_dsl import load_results
    (tmp_path / "rows.txt").write_text("".join(f"{w} is in the city of\n" for w in ["rome", "paris"] * 30))
    exp = tmp_path / "e.ivx"
    exp.write_text(f'model "{tiny_dir}"\nprompt a = lines("rows.txt")\n'
                   'invoke a {\n    save h = model.model.layers[1].output[:, -1, :]\n}\n')
    env = {**os.environ, "IVX_API_KEY": keys[1]}

    def ivx_run(url: str) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "interp_dsl.cli", "run", str(exp), "--out", str(tmp_path / "r"),
                                 "--batch-size", "2", "--shard-size", "4", "--quiet", "--remote", url],
                                cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
    first = Server(tiny_dir, keys[0])
    client = ivx_run(first.url)
    manifest = tmp_path / "r" / "manifest.json"
    wait_for_shards(tmp_path / "r", 2, client)
    first.stop(signal.SIGKILL)
    _, err = client.communicate(timeout=120)
    assert client.returncode == 1, err
    assert f"the server at {first.url}" in err and "Traceback" not in err
    kept = len(json.loads(manifest.read_text())["shards"])
    assert 2 <= kept < 15 and not load_results(tmp_path / "r").complete
    second = Server(tiny_dir, keys[0])
    try:
        client = ivx_run(second.url)
        assert client.wait(timeout=120) == 0, client.communicate()[1]
    finally:
        second.stop()
    results = load_results(tmp_path / "r")
    assert results.complete and results["h"].shape == (60, 32)
    local = LanguageModel(tiny_dir)
    for i in (0, 1, 59):
        with local.trace(["rome", "paris"][i % 2] + " is in the city of"):
            h = local.model.layers[1].output[:, -1, :].save()
        torch.testing.assert_close(results["h"][i], h.value[0])


class Mangler:
    """A server in front of a real `ivx serve` that alters its answers as a broken or hostile one
    would; the client must refuse each alteration, never store it."""

    def __init__(self, upstream: str, mode: str):
        import http.server
        self.upstream, self.mode, self.requests = upstream, mode, []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                outer._answer(self, None)

            def do_POST(self):
                outer._answer(self, self.rfile.read(int(self.headers["Content-Length"])))

            def log_message(self, *args):
                pass
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def _answer(self, handler, body):
        self.requests.append((handler.path, "Authorization" in handler.headers))
        if self.mode == "redirect":
            handler.send_response(302)
            handler.send_header("Location", f"http://localhost:{self.server.server_address[1]}{handler.path}")
            handler.end_headers()
            return
        request = urllib.request.Request(self.upstream + handler.path, data=body, method=handler.command,
                                         headers={k: v for k, v in handler.headers.items() if k != "Host"})
        try:
            with urllib.request.urlopen(request, timeout=30) as r:
                status, data = r.status, r.read()
        except urllib.error.HTTPError as e:
            status, data = e.code, e.read()
        data = self._alter(handler.path, data)
        handler.send_response(status)
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        if self.mode == "cut" and handler.path == "/v1/jobs":  # a server killed while it answers
            handler.wfile.write(data[:len(data) // 2])
            handler.close_connection = True
            return
        handler.wfile.write(data)

    def _alter(self, path: str, data: bytes) -> bytes:
        from safetensors.torch import save as save_tensors

        from interp_dsl.wire import RESULT_FORMAT, decode_result, encode_result
        if path == "/v1/health" and self.mode == "health":
            return json.dumps({k: v for k, v in json.loads(data).items() if k != "architecture"}).encode()
        if path == "/v1/jobs" and self.mode == "job id":
            return json.dumps({**json.loads(data), "id": "../../v1/health"}).encode()
        if not path.endswith("/result"):
            return data
        values, stopped, output = decode_result(data)
        if self.mode == "drop":
            values = {}
        elif self.mode == "shape":
            values = {i: v[..., :1] for i, v in values.items()}
        elif self.mode == "ids":
            output = output.clone()
            output[:, 0] += 1  # not the prompt this client sent
        elif self.mode == "nested":
            return save_tensors({}, metadata={"format": RESULT_FORMAT, "values": "[" * 100_000, "stopped": "false"})
        return encode_result(values, stopped, output)

    def close(self):
        self.server.shutdown()


@pytest.mark.parametrize("mode, message", [
    ("drop", "the server's result does not fit the program checked here: save logits is missing"),
    ("shape", "save logits: float32[4, 1] where float32[4, 64] was expected"),
    ("nested", "the server sent an unreadable result: a malformed result: RecursionError"),
    ("health", "/v1/health does not name the model, weights and architecture it serves"),
    ("job id", "answered a job without a well-formed id"),
    ("redirect", "a redirect to 'http://localhost:"),
    ("cut", "broke off its answer to POST /v1/jobs ("),
])
def test_a_broken_server_is_refused_and_nothing_is_stored(server, keys, fake, tmp_path, mode, message):
    mangler = Mangler(server.url, mode)
    try:
        with pytest.raises(RemoteError, match=re.escape(message)) as err:
            with fake.sweep(SWEEP_PROMPTS[:2], batch_size=2, out=tmp_path / "out", compile="off", progress=False,
                            remote=remote(mangler.url, keys[1], quiet=True)) as sweep:
                layer = sweep.param("layer", [0, 2])
                fake.model.layers[layer].output[:, -1, :] *= 2.0
                fake.lm_head.output[:, -1, :].save("logits")
    finally:
        mangler.close()
    assert f"{__file__}:" in str(err.value)
    assert not list((tmp_path / "out").glob("shard-*"))  # nothing of it was written
    if mode == "redirect":
        assert len(mangler.requests) == 1  # not followed: the key went nowhere else
    if mode == "drop":  # the key goes with jobs, not to the public health check
        assert ("/v1/health", False) in mangler.requests and ("/v1/jobs", True) in mangler.requests


def test_generated_ids_that_do_not_continue_the_prompts_are_refused(server, keys, fake):
    mangler = Mangler(server.url, "ids")
    try:
        with pytest.raises(RemoteError, match="the generated ids are not int64 .* continuing the prompts sent"):
            with fake.sweep(SWEEP_PROMPTS[:2], batch_size=2, generate={"max_new_tokens": 2}, compile="off",
                            progress=False, remote=remote(mangler.url, keys[1], quiet=True)):
                fake.model.layers[1].output[:, -1] *= 0.5
    finally:
        mangler.close()


def test_a_server_of_another_architecture_is_refused(server, keys, tmp_path):
    from transformers import LlamaConfig
    other = LanguageModel(LlamaConfig(vocab_size=64, hidden_size=48, intermediate_size=64, num_hidden_layers=3,
                                      num_attention_heads=4, num_key_value_heads=2), weights="fake",
                          tokenizer=word_tokenizer())
    with pytest.raises(InterventionError, match=r"serves .*, whose parameters differ in names or shapes"):
        with other.sweep(SWEEP_PROMPTS[:2], batch_size=2, compile="off", progress=False,
                         remote=remote(server.url, keys[1], quiet=True)):
            other.lm_head.output[:, -1, :].save("logits")


def test_client_errors_before_sending(fake, monkeypatch):
    nowhere = remote("http://127.0.0.1:9", quiet=True)  # nothing listens on port 9
    with pytest.raises(RemoteError, match="a DynamicCache cannot be sent back") as e:
        with fake.generate("the eiffel tower", max_new_tokens=2, remote=nowhere):
            fake.model.layers[0].inputs.save()
    assert f"{__file__}:" in str(e.value) and "fake.model.layers[0].inputs.save()" in str(e.value)  # its line
    with pytest.raises(RemoteError, match="cannot reach the server at http://127.0.0.1:9"):
        small(fake, nowhere)
    monkeypatch.delenv("IVX_REMOTE_URL", raising=False)
    with pytest.raises(RemoteError, match="set IVX_REMOTE_URL"):
        small(fake, True)
    with pytest.raises(InterventionError, match="compile='graph' chooses how a local run executes"):
        fake.trace("the eiffel tower", remote=nowhere, compile="graph")
