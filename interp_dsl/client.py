"""The client of `ivx serve`: `model.trace(..., remote=True)` checks the program locally on fake
tensors, sends it as IR with its token ids and params, follows the job, and binds the saves.

The server is named by `IVX_REMOTE_URL` and `IVX_API_KEY`, or by passing
`remote=interp_dsl.remote(url, api_key)`. HTTP is the standard library's `urllib`: a job is two
requests and a few status polls, nothing a client library would add to.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from compiler import errors
from compiler.check import IncrementalTyper, TypedProgram
from compiler.errors import InterventionError
from compiler.ir import Program, Span, by_name, dumps
from compiler.shape_rules import is_tensor_like
from compiler.validate import PayloadError
from interp_dsl.spans import user_span
from interp_dsl.wire import WireError, decode_result, diagnostics_of, encode_job, result_bytes, unsendable
from runtime.engine import Engine
from runtime.interpreter import Batch, RunResult

SENT_KWARGS = frozenset({"input_ids", "attention_mask", "use_cache", "position_ids"})  # rebuilt by the server
_ERRORS: dict[str, type[InterventionError]] = {
    cls.__name__: cls for cls in (errors.CheckError, errors.ExecutionError, errors.InterventionError,
                                  errors.UnknownModuleError, errors.UnsupportedOperationError,
                                  errors.ValueUnavailableError, PayloadError)}


class RemoteError(InterventionError):
    """A remote job could not be sent, was refused, hit a limit, or its server went away."""


@dataclass(frozen=True)
class Remote:
    """A server to run traces on: its URL, an API key, and whether to print the job's progress
    (`[id] RECEIVED`, `QUEUED`, `RUNNING`, `COMPLETED` / `ERROR`) on stderr."""

    url: str
    api_key: str | None = None
    quiet: bool = False
    timeout: float = 60.0  # seconds for one HTTP request
    origin: Span | None = None  # where errors point when no user code is on the stack (`--remote URL`)

    def _where(self) -> Span:
        return self.origin or user_span()

    def runner(self, engine: Engine) -> Callable[..., tuple[TypedProgram, RunResult]]:
        """`Engine.run`'s signature, run on this server (checked on `engine` first)."""
        return lambda program, batch, params, **kwargs: self.run(engine, program, batch, params, **kwargs)

    def run(self, engine: Engine, program: Program, batch: Batch, params: dict[str, Any], *,
            compile: str = "off", execute: bool = True, typer: IncrementalTyper | None = None,
            ids: dict[int, int] | None = None) -> tuple[TypedProgram, RunResult]:
        """Check `program` locally on fake tensors, then run it on the server."""
        typed, checked = engine.run(program, batch, params, execute=False, typer=typer, ids=ids)
        if not execute:
            return typed, checked
        where = self._where()
        trained = [name for name, v in params.items() if isinstance(v, torch.Tensor) and v.requires_grad]
        if trained and any(op.opcode == "backward" for op in program.ops):
            raise RemoteError.at(where, "a remote job cannot give your tensors their gradients (.grad stays "
                                        "on the server)", "train tensors that require grad in a local run")
        for op in program.ops:
            problem = unsendable(checked.values.get(op.args[0].id)) if op.opcode == "save" else None  # type: ignore[union-attr]
            if problem:
                raise RemoteError.at(op.span, problem, "save the tensors inside it instead (index into the value)")
        body = self._body(program, batch, params, where)
        job = self._send("POST", "/v1/jobs", body, where)
        job_id = job.get("id")
        if not (isinstance(job_id, str) and JOB_ID.fullmatch(job_id)):
            raise RemoteError.at(where, f"{self.url} answered a job without a well-formed id; is it an `ivx serve`?")
        self._say(job_id, "RECEIVED", f"by {self.url}")
        final = self._follow(job, job_id, where)
        if final["status"] == "ERROR":
            error = final.get("error") if isinstance(final.get("error"), dict) else {}
            self._say(job_id, "ERROR", str(error.get("error", "the job failed")))
            raise _job_error(error, job_id, where)
        limit = 2 * (result_bytes(checked.values) + _output_bytes(program, batch)) + 2**24
        result = self._http("GET", f"/v1/jobs/{job_id}/result", None, where, job_id, "COMPLETED", limit)
        try:
            values, stopped, output = decode_result(result)
        except WireError as e:
            raise RemoteError.at(where, f"job {job_id}: the server sent an unreadable result: {e}") from None
        problem = result_problem(program, checked.values, values, output, batch)
        if problem:
            raise RemoteError.at(where, f"job {job_id}: the server's result does not fit the program checked here: "
                                        f"{problem}", "is the server an `ivx serve` of this model?")
        self._say(job_id, "COMPLETED", f"{len(result)} bytes")
        saved = {op.save_key: values[op.args[0].id] for op in program.ops  # as the interpreter keeps them
                 if op.opcode == "save" and op.args[0].id in values}  # type: ignore[union-attr]
        return typed, RunResult(output=output, saves=by_name(saved), values=values, saved=saved, stopped=stopped)

    def describe(self) -> dict[str, str]:
        """The server's model name, weight fingerprint and parameter-shape fingerprint (a
        sweep's identity records the first two; the third must match the local model's)."""
        health = self._send("GET", "/v1/health", None, self._where(), key=False)  # public: no key sent
        model, weights, shapes = (health.get(k) for k in ("model", "weights", "architecture"))
        if not (isinstance(model, str) and model and all(isinstance(f, str) and FINGERPRINT.fullmatch(f)
                                                         for f in (weights, shapes))):
            raise RemoteError.at(self._where(), f"{self.url}/v1/health does not name the model, weights and "
                                                "architecture it serves; is it an `ivx serve` of this version?")
        return {"model": model, "weights": weights, "architecture": shapes}

    # ------------------------------------------------------------------------------ the job
    def _body(self, program: Program, batch: Batch, params: dict[str, Any], where: Any) -> bytes:
        extra = sorted(set(batch.kwargs) - SENT_KWARGS)
        if batch.args or "input_ids" not in batch.kwargs or extra:
            found = f"the argument(s) {', '.join(extra)}" if extra else "inputs that are not token ids"
            raise RemoteError.at(where, f"a remote job sends token ids and attention masks only; this trace has "
                                        f"{found}", "pass text or token ids to the trace and its invokes")
        try:
            return encode_job(dumps(program), batch.kwargs["input_ids"], batch.kwargs["attention_mask"],
                              list(batch.rows), batch.pad_id, params)
        except WireError as e:
            raise RemoteError.at(where, f"this trace cannot be sent: {e}") from None

    def _follow(self, job: dict[str, Any], job_id: str, where: Any) -> dict[str, Any]:
        """Poll the job's status until it ends, saying each change."""
        shown, delay = None, 0.02
        while True:
            status = job.get("status")
            if status != shown and status in ("QUEUED", "RUNNING"):
                ahead = job.get("position")
                self._say(job_id, status, f"{ahead} job(s) ahead" if status == "QUEUED" and ahead else "")
                shown = status
            if status in ("COMPLETED", "ERROR"):
                return job
            if status not in ("QUEUED", "RUNNING"):
                raise RemoteError.at(where, f"job {job_id}: the server reported the status {status!r}")
            time.sleep(delay)
            delay = min(delay * 1.5, 0.5)
            job = self._send("GET", f"/v1/jobs/{job_id}", None, where, job_id, shown)

    def _say(self, job_id: str, status: str, detail: str = "") -> None:
        if not self.quiet:
            print(f"[{job_id}] {status}" + (f": {detail}" if detail else ""), file=sys.stderr)

    # ------------------------------------------------------------------------------ HTTP
    def _send(self, method: str, path: str, body: bytes | None, where: Any, job_id: str | None = None,
              state: str | None = None, key: bool = True) -> dict[str, Any]:
        data = self._http(method, path, body, where, job_id, state, key=key)
        try:
            reply = json.loads(data)
        except ValueError:
            reply = None
        if not isinstance(reply, dict):
            raise RemoteError.at(where, f"{self.url}{path} did not answer with JSON; is it an `ivx serve`?")
        return reply

    def _http(self, method: str, path: str, body: bytes | None, where: Any, job_id: str | None,
              state: str | None, limit: int = 2**24, key: bool = True) -> bytes:
        """One request; the answer's body, at most `limit` bytes; the API key goes only where it
        is needed (`key`). Redirects are not followed: the key would travel with them."""
        headers = {"Content-Type": "application/octet-stream"} if body is not None else {}
        if self.api_key and key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(self.url.rstrip("/") + path, data=body, method=method, headers=headers)
        try:
            with _OPENER.open(request, timeout=self.timeout) as response:
                data = response.read(limit + 1)
                if len(data) > limit:
                    raise RemoteError.at(where, f"{self.url}{path} answered more than the {limit} bytes expected "
                                                "for it; the answer is dropped")
                if response.length:  # fewer bytes than its Content-Length: the connection broke mid-answer
                    raise http.client.IncompleteRead(data, response.length)
                return data
        except urllib.error.HTTPError as e:
            raise _refusal(e, job_id, where) from None
        except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
            reason = getattr(e, "reason", None) or e
            if isinstance(reason, ConnectionResetError) and body is not None:
                raise RemoteError.at(where, f"the server at {self.url} closed the connection while the job "
                                            f"({len(body)} bytes) was being sent",
                                     "a server cuts off a job far over its max_request_bytes: send less "
                                     "(fewer or shorter prompts, smaller params)") from None
            if isinstance(e, http.client.IncompleteRead) and job_id is None:
                raise RemoteError.at(where, f"the server at {self.url} broke off its answer to {method} {path} "
                                            f"({len(e.partial)} bytes of {len(e.partial) + (e.expected or 0)})",
                                     "the server stopped or crashed; start it again and rerun") from None
            if job_id is None:
                raise RemoteError.at(where, f"cannot reach the server at {self.url}: {reason}",
                                     "start one with `ivx serve --model NAME --port PORT`, or check "
                                     "IVX_REMOTE_URL") from None
            raise RemoteError.at(where, f"lost the server at {self.url} while job {job_id} was {state}: {reason}",
                                 "the server stopped or crashed and the job's result is lost; run the "
                                 "trace again once it is back") from None


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any) -> None:
        return None  # the 3xx answer is raised as an HTTPError, then explained by `_refusal`


_OPENER = urllib.request.build_opener(_NoRedirect())
JOB_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
FINGERPRINT = re.compile(r"[0-9a-f]{16}")


def _output_bytes(program: Program, batch: Batch) -> int:
    if program.generation is None:
        return 0
    ids = batch.kwargs["input_ids"]
    return ids.shape[0] * (ids.shape[1] + program.generation.max_new_tokens) * 8


def result_problem(program: Program, expected: dict[int, Any], got: dict[int, Any], output: Any,
                   batch: Batch) -> str | None:
    """What in a server's result contradicts the local check of `program` on `batch`: a save
    missing (only a generation step after every row ended may be), another structure, shape or
    dtype, or generated ids that do not continue these prompts. None when it fits."""
    for op in program.ops:
        if op.opcode != "save" or op.args[0].id not in expected:  # type: ignore[union-attr]
            continue
        value_id = op.args[0].id  # type: ignore[union-attr]
        if value_id not in got:
            if op.step is not None:  # a step that did not run: every row had ended
                continue
            return f"save {op.target} is missing"
        problem = _value_problem(expected[value_id], got[value_id], exact=program.generation is None)
        if problem:
            return f"save {op.target}: {problem}"
    ids = batch.kwargs["input_ids"]
    if output is None:
        return None
    if program.generation is None:
        return "it holds generated ids, and this program does not generate"
    longest = ids.shape[1] + program.generation.max_new_tokens
    if not (isinstance(output, torch.Tensor) and output.dtype == torch.int64 and output.dim() == 2
            and output.shape[0] == ids.shape[0] and ids.shape[1] <= output.shape[1] <= longest
            and torch.equal(output[:, :ids.shape[1]], ids)):
        return (f"the generated ids are not int64 [{ids.shape[0]}, {ids.shape[1]}..{longest}] continuing "
                "the prompts sent")
    return None


def _value_problem(expected: Any, got: Any, exact: bool) -> str | None:
    want, have = torch.utils._pytree.tree_leaves(expected), torch.utils._pytree.tree_leaves(got)
    if len(want) != len(have):
        return f"{len(have)} values where {len(want)} were expected"
    for e, g in zip(want, have, strict=True):
        if is_tensor_like(e) != isinstance(g, torch.Tensor):
            return f"a {type(g).__name__} where {'a tensor' if is_tensor_like(e) else type(e).__name__} was expected"
        if not is_tensor_like(e):
            continue
        if g.dtype != e.dtype or g.dim() != e.dim() or (exact and any(
                isinstance(n, int) and n != m for n, m in zip(e.shape, g.shape, strict=True))):
            return f"{_kind(g)} where {_kind(e)} was expected"
    return None


def _kind(t: torch.Tensor) -> str:
    return f"{str(t.dtype).removeprefix('torch.')}{list(t.shape)}"


def _refusal(e: urllib.error.HTTPError, job_id: str | None, where: Any) -> RemoteError:
    """An HTTP error answer as a located error, with the server's reason and the limit named."""
    try:
        body = json.loads(e.read() or b"{}")
    except (ValueError, OSError):
        body = {}
    reason = body.get("error") if isinstance(body, dict) else None
    what = f"job {job_id}" if job_id else "the job"
    if 300 <= e.code < 400:
        return RemoteError.at(where, f"the server answered {e.code}, a redirect to {e.headers.get('Location')!r}, "
                                     "which the client does not follow (your key would go with it)",
                              "use the URL it redirects to, if you trust it")
    message = f"the server refused {what} ({e.code}): {reason or e.reason}"
    hints = {401: "pass a key: interp_dsl.remote(url, api_key) or IVX_API_KEY",
             413: "send less: fewer or shorter prompts, smaller params, fewer saves",
             429: "wait for your running jobs to finish, or ask for a higher limit"}
    return RemoteError.at(where, message, hints.get(e.code, ""))


def _job_error(error: dict[str, Any], job_id: str, where: Any) -> InterventionError:
    """A failed job's error, as the class it was on the server, at the user's own lines."""
    try:
        diagnostics = diagnostics_of(error.get("diagnostics") or [])
    except WireError:
        diagnostics = []
    if diagnostics:
        return _ERRORS.get(str(error.get("kind")), RemoteError)(diagnostics)
    return RemoteError.at(where, f"job {job_id} failed on the server: {error.get('error', 'no reason given')}")


def remote(url: str | None = None, api_key: str | None = None, *, quiet: bool = False) -> Remote:
    """A server for `model.trace(..., remote=...)`; `url` and `api_key` default to the
    environment's `IVX_REMOTE_URL` and `IVX_API_KEY`. `quiet` silences the progress lines."""
    url = url or os.environ.get("IVX_REMOTE_URL")
    if not url:
        raise RemoteError.at(user_span(), "no server to run on: remote execution needs a URL",
                             "set IVX_REMOTE_URL=http://HOST:PORT or pass interp_dsl.remote(url, api_key)")
    if not url.startswith(("http://", "https://")):
        raise RemoteError.at(user_span(), f"a server URL starts with http:// or https://, found {url!r}")
    return Remote(url, api_key if api_key is not None else os.environ.get("IVX_API_KEY"), quiet)


def resolve(setting: Any) -> Remote | None:
    """`remote=` as given to a trace: False/None (run locally), True (the environment's server),
    or a `Remote`."""
    if setting is None or setting is False:
        return None
    if setting is True:
        return remote()
    if isinstance(setting, Remote):
        return setting
    raise RemoteError.at(user_span(), f"remote= takes True, False or interp_dsl.remote(url, api_key), "
                                      f"found {type(setting).__name__}")
