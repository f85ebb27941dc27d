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
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from compiler import errors
from compiler.check import IncrementalTyper, TypedProgram
from compiler.errors import InterventionError
from compiler.ir import Program, by_name, dumps
from compiler.validate import PayloadError
from interp_dsl.spans import user_span
from interp_dsl.wire import WireError, decode_result, diagnostics_of, encode_job, unsendable
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
        where = user_span()
        for op in program.ops:
            problem = unsendable(checked.values.get(op.args[0].id)) if op.opcode == "save" else None  # type: ignore[union-attr]
            if problem:
                raise RemoteError.at(op.span, problem, "save the tensors inside it instead (index into the value)")
        body = self._body(program, batch, params, where)
        job = self._send("POST", "/v1/jobs", body, where)
        job_id = str(job.get("id", "?"))
        self._say(job_id, "RECEIVED", f"by {self.url}")
        final = self._follow(job, job_id, where)
        if final["status"] == "ERROR":
            error = final.get("error") if isinstance(final.get("error"), dict) else {}
            self._say(job_id, "ERROR", str(error.get("error", "the job failed")))
            raise _job_error(error, job_id, where)
        result = self._fetch(f"/v1/jobs/{job_id}/result", job_id, where)
        try:
            values, stopped, output = decode_result(result)
        except WireError as e:
            raise RemoteError.at(where, f"job {job_id}: the server sent an unreadable result: {e}") from None
        self._say(job_id, "COMPLETED", f"{len(result)} bytes")
        saved = {op.save_key: values[op.args[0].id] for op in program.ops  # as the interpreter keeps them
                 if op.opcode == "save" and op.args[0].id in values}  # type: ignore[union-attr]
        return typed, RunResult(output=output, saves=by_name(saved), values=values, saved=saved, stopped=stopped)

    def describe(self) -> dict[str, Any]:
        """The server's model name and weight fingerprint (a sweep's identity records them)."""
        health = self._send("GET", "/v1/health", None, user_span())
        return {"model": str(health.get("model")), "weights": str(health.get("weights"))}

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
              state: str | None = None) -> dict[str, Any]:
        data = self._http(method, path, body, where, job_id, state)
        try:
            reply = json.loads(data)
        except ValueError:
            reply = None
        if not isinstance(reply, dict):
            raise RemoteError.at(where, f"{self.url}{path} did not answer with JSON; is it an `ivx serve`?")
        return reply

    def _fetch(self, path: str, job_id: str, where: Any) -> bytes:
        return self._http("GET", path, None, where, job_id, "COMPLETED")

    def _http(self, method: str, path: str, body: bytes | None, where: Any, job_id: str | None,
              state: str | None) -> bytes:
        headers = {"Content-Type": "application/octet-stream"} if body is not None else {}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(self.url.rstrip("/") + path, data=body, method=method, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return response.read()
        except urllib.error.HTTPError as e:
            raise _refusal(e, job_id, where) from None
        except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
            reason = getattr(e, "reason", None) or e
            if isinstance(reason, ConnectionResetError) and body is not None:
                raise RemoteError.at(where, f"the server at {self.url} closed the connection while the job "
                                            f"({len(body)} bytes) was being sent",
                                     "a server cuts off a job far over its max_request_bytes: send less "
                                     "(fewer or shorter prompts, smaller params)") from None
            if job_id is None:
                raise RemoteError.at(where, f"cannot reach the server at {self.url}: {reason}",
                                     "start one with `ivx serve --model NAME --port PORT`, or check "
                                     "IVX_REMOTE_URL") from None
            raise RemoteError.at(where, f"lost the server at {self.url} while job {job_id} was {state}: {reason}",
                                 "the server stopped or crashed and the job's result is lost; run the "
                                 "trace again once it is back") from None


def _refusal(e: urllib.error.HTTPError, job_id: str | None, where: Any) -> RemoteError:
    """An HTTP error answer as a located error, with the server's reason and the limit named."""
    try:
        body = json.loads(e.read() or b"{}")
    except (ValueError, OSError):
        body = {}
    reason = body.get("error") if isinstance(body, dict) else None
    what = f"job {job_id}" if job_id else "the job"
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
