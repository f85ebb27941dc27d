"""The job queue of `ivx serve`: jobs are validated when submitted, then one worker thread runs
them on the served model in arrival order. Waiting jobs with the same program but for parameter
values (the same experiment from several users, on other prompts of the same length) share one
forward, side by side in the batch, each getting its own saves (`compiler.passes.side_by_side`).

A job's program arrives as IR JSON and is loaded by `compiler.ir.loads` (the closed vocabulary,
checked op by op) before anything is looked up; its batch is rebuilt from token ids, never from
arbitrary forward arguments. Before a job runs, its spans' file names are replaced by opaque
tokens, so no error message can read a file on the server; diagnostics go back as records with
the client's own file names, and the client renders them. Per-key limits: jobs queued or running
(at submission), tokens (at submission), bytes of results (from the checked types, before the
model runs, and of the real result) and seconds (at every module call, and at the end).
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import secrets
import sys
import threading
import time
import traceback
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from compiler.errors import InterventionError
from compiler.ir import Program, Span, loads
from compiler.passes import side_by_side, unbatchable
from interp_dsl.keys import Key
from interp_dsl.models import LanguageModel
from interp_dsl.wire import Job, UnsendableValue, decode_job, diagnostics_json, encode_result, result_bytes
from runtime.fingerprints import architecture_fingerprint, weights_fingerprint
from runtime.interpreter import Batch

RETAIN_SECONDS = 600.0  # a finished job's result is kept this long, or until fetched

QUEUED, RUNNING, COMPLETED, ERROR = "QUEUED", "RUNNING", "COMPLETED", "ERROR"


class Refused(Exception):
    """A request the server will not take: an HTTP status, the reason, and the limit it hit."""

    def __init__(self, status: int, message: str, limit: str | None = None,
                 diagnostics: list[dict[str, Any]] | None = None):
        super().__init__(message)
        self.status, self.message, self.limit, self.diagnostics = status, message, limit, diagnostics

    def body(self) -> dict[str, Any]:
        out: dict[str, Any] = {"error": self.message}
        if self.limit is not None:
            out["limit"] = self.limit
        if self.diagnostics is not None:
            out["diagnostics"] = self.diagnostics
        return out


class _Deadline(Exception):
    """Raised from a module call once a job has run past its key's seconds."""


@dataclass
class JobRecord:
    id: str
    key: Key
    program: Program
    files: dict[str, str]  # opaque token -> the client's file name
    batch: Batch
    params: dict[str, Any]
    invokes: list[Any] = dataclasses.field(default_factory=list)  # the batch's invoke inputs, to batch jobs
    together: Any = None  # jobs with an equal key share one forward (`passes.side_by_side`); None: alone
    status: str = QUEUED
    shared: int = 1  # how many jobs its forward ran
    error: dict[str, Any] | None = None  # {"error", "kind", "diagnostics", "limit"}
    result: bytes | None = None
    finished: float = 0.0  # time.monotonic() when it ended

    def describe(self, position: int | None) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.id, "status": self.status}
        if position is not None:
            out["position"] = position
        if self.error is not None:
            out["error"] = self.error
        if self.status == COMPLETED and self.result is not None:
            out["result_bytes"] = len(self.result)
            out["batched_jobs"] = self.shared
        return out


class JobQueue:
    """Jobs for one model: `submit` validates and enqueues, a worker thread runs them."""

    def __init__(self, model: LanguageModel, batch_rows: int = 32):
        self.model = model
        self.batch_rows = batch_rows  # most rows in one forward of jobs batched together; 1: never
        self.weights = weights_fingerprint(model._engine.module)  # sweeps record whose numbers they hold
        self.architecture = architecture_fingerprint(model._engine.module)  # clients check theirs matches
        self.jobs: dict[str, JobRecord] = {}
        self.waiting: deque[JobRecord] = deque()
        self.lock = threading.Condition()
        self.closing = False
        self.worker = threading.Thread(target=self._work, name="ivx-worker", daemon=True)

    # ------------------------------------------------------------------------------ requests
    def start(self) -> None:
        self.worker.start()

    def submit(self, body: bytes, key: Key) -> JobRecord:
        """Validate a job body and enqueue it; `Refused` with a 4xx says why not."""
        try:
            job = decode_job(body)
        except ValueError as e:
            raise Refused(400, str(e)) from None
        try:
            program = loads(job.program)
        except InterventionError as e:  # PayloadError: the op and the reason
            raise Refused(400, "; ".join(d.message for d in e.diagnostics),
                          diagnostics=diagnostics_json(e.diagnostics)) from None
        batch, invokes = self._batch(job, program, key)
        params = self._params(job, program)
        together = None if unbatchable(program) else (  # padded batches pass the layers a mask, others none
            program.structural_hash(), batch.pad_id, tuple(job.input_ids.shape[1:]), bool(job.attention_mask.all()))
        program, files = _opaque_spans(program)
        with self.lock:
            if self.closing:
                raise Refused(503, "the server is shutting down")
            self._forget_old()
            active = sum(1 for j in self.jobs.values() if j.key.name == key.name and j.status in (QUEUED, RUNNING))
            if active >= key.limits.max_jobs:
                raise Refused(429, f"this key has {active} jobs queued or running; its limit is "
                                   f"{key.limits.max_jobs} (max_jobs)", "max_jobs")
            record = JobRecord(secrets.token_hex(8), key, program, files, batch, params, invokes, together)
            self.jobs[record.id] = record
            self.waiting.append(record)
            self.lock.notify_all()
        return record

    def status(self, job_id: str, key: Key) -> dict[str, Any]:
        with self.lock:
            record = self._own(job_id, key)
            position = next((i for i, j in enumerate(self.waiting) if j is record), None)
            return record.describe(position)

    def result(self, job_id: str, key: Key) -> bytes:
        """A completed job's result (then forgotten); `Refused` while it runs or when it failed."""
        with self.lock:
            record = self._own(job_id, key)
            if record.status in (QUEUED, RUNNING):
                raise Refused(409, f"job {job_id} is {record.status}; poll its status until COMPLETED")
            if record.status == ERROR:
                error = record.error or {}
                status = {"max_result_bytes": 413, "max_seconds": 429}.get(error.get("limit") or "", 422)
                raise Refused(status, error.get("error", "the job failed"), error.get("limit"),
                              error.get("diagnostics"))
            del self.jobs[job_id]
            return record.result  # type: ignore[return-value]

    def health(self) -> dict[str, Any]:
        with self.lock:
            running = sum(1 for j in self.jobs.values() if j.status == RUNNING)
            return {"status": "closing" if self.closing else "ok", "model": self.model._engine.name,
                    "weights": self.weights, "architecture": self.architecture,
                    "queued": len(self.waiting), "running": running, "batch_rows": self.batch_rows}

    def close(self, timeout: float | None = None) -> None:
        """Stop taking jobs; queued ones fail with a reason, the running one finishes."""
        with self.lock:
            self.closing = True
            while self.waiting:
                self._fail(self.waiting.popleft(), "the server shut down before the job ran")
            self.lock.notify_all()
        if self.worker.is_alive():
            self.worker.join(timeout)

    # ----------------------------------------------------------------------------- validation
    def _own(self, job_id: str, key: Key) -> JobRecord:
        record = self.jobs.get(job_id)
        if record is None or record.key.name != key.name:
            raise Refused(404, f"no job {job_id!r} for this key (a result is kept until it is fetched, "
                               f"or {RETAIN_SECONDS:.0f} s)")
        return record

    def _batch(self, job: Job, program: Program, key: Key) -> tuple[Batch, list[Any]]:
        """The forward's batch, rebuilt from token ids exactly as the client built it, and its
        invokes' inputs."""
        ids, mask = job.input_ids, job.attention_mask
        config = self.model.config
        vocab, context = config.vocab_size, getattr(config, "max_position_embeddings", None)
        if ids.dtype != torch.int64 or ids.dim() != 2 or mask.shape != ids.shape or ids.shape[0] < 1:
            raise Refused(400, f"input_ids is int64 [batch, tokens] with an attention_mask of the same shape; "
                               f"found {str(ids.dtype).removeprefix('torch.')}{list(ids.shape)} and "
                               f"{list(mask.shape)}")
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
            raise Refused(400, f"token ids run from 0 to {vocab - 1} for this model; found "
                               f"{int(ids.min())}..{int(ids.max())}")
        if not bool(((mask == 0) | (mask == 1)).all()) or bool((mask.sum(-1) == 0).any()):
            raise Refused(400, "attention_mask holds 0 and 1, with at least one 1 in every row")
        if context is not None and ids.shape[1] > context:
            raise Refused(400, f"prompts are {ids.shape[1]} tokens; the model's context is {context}")
        if not 0 <= job.pad_id < vocab:
            raise Refused(400, f"pad_id runs from 0 to {vocab - 1}, found {job.pad_id}")
        starts = [0] + [b for _, b in job.rows[:-1]]
        if len(job.rows) != program.n_invokes or [a for a, _ in job.rows] != starts \
                or any(b <= a for a, b in job.rows) or job.rows[-1][1] != ids.shape[0]:
            raise Refused(400, f"rows must split the batch's {ids.shape[0]} rows into the program's "
                               f"{program.n_invokes} invokes, in order; found {list(map(list, job.rows))}")
        steps = program.generation.max_new_tokens if program.generation is not None else 0
        tokens = ids.shape[0] * (ids.shape[1] + steps)
        if tokens > key.limits.max_tokens:
            raise Refused(413, f"the job is {tokens} tokens (rows x (prompt + generated)); this key's "
                               f"limit is {key.limits.max_tokens} (max_tokens)", "max_tokens")
        invokes = [(({"input_ids": ids[a:b], "attention_mask": mask[a:b]},), {}) for a, b in job.rows]
        try:
            batch = self.model._batch(invokes)
        except InterventionError as e:
            raise Refused(400, "; ".join(d.message for d in e.diagnostics)) from None
        return dataclasses.replace(batch, pad_id=job.pad_id), invokes

    def _params(self, job: Job, program: Program) -> dict[str, Any]:
        wanted = program.params()
        missing = sorted(set(wanted) - set(job.params))
        extra = sorted(set(job.params) - set(wanted))
        if missing or extra:
            raise Refused(400, f"the job's params must be the program's ({', '.join(sorted(wanted)) or 'none'}); "
                               f"{'missing ' + ', '.join(missing) if missing else 'unknown ' + ', '.join(extra)}")
        device = self.model._input_device()
        return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in job.params.items()}

    # --------------------------------------------------------------------------------- worker
    def _work(self) -> None:
        while True:
            with self.lock:
                while not self.waiting and not self.closing:
                    self.lock.wait()
                if not self.waiting:
                    return
                group = self._take()
            outcomes = self._run_together(group) if len(group) > 1 else [self._run(group[0])]
            with self.lock:
                for record, outcome in zip(group, outcomes, strict=True):
                    if isinstance(outcome, bytes):
                        record.result, record.status = outcome, COMPLETED
                    else:
                        record.error, record.status = outcome, ERROR
                    record.finished = time.monotonic()
                    record.batch, record.params, record.invokes = None, {}, []  # type: ignore[assignment]
                self.lock.notify_all()

    def _take(self) -> list[JobRecord]:
        """The next job, and the waiting jobs that can share its forward (equal programs but for
        parameter values, prompts of its length), up to `batch_rows` rows. Holds the lock."""
        first = self.waiting.popleft()
        group, rows = [first], first.batch.size
        if first.together is not None:
            for job in list(self.waiting):
                if job.together == first.together and rows + job.batch.size <= self.batch_rows:
                    self.waiting.remove(job)
                    group.append(job)
                    rows += job.batch.size
        for job in group:
            job.status, job.shared = RUNNING, len(group)
        return group

    def _run_together(self, group: list[JobRecord]) -> list[bytes | dict[str, Any]]:
        """Run jobs side by side in one forward, each getting its own saves. Copies see only
        their own rows (`passes.unbatchable`); if the shared forward fails, takes longer than a
        job's seconds, or a job's saves pass its limit, each job runs alone, so that every error
        and limit is its own."""
        program, back = side_by_side([job.program for job in group])
        params = {f"b{k}_{name}": value for k, job in enumerate(group) for name, value in job.params.items()}
        engine = self.model._engine
        started = time.monotonic()
        try:
            with self._limited(program, started + min(job.key.limits.max_seconds for job in group)):
                batch = dataclasses.replace(self.model._batch([i for job in group for i in job.invokes]),
                                            pad_id=group[0].batch.pad_id)
                if unbatchable(program, engine.site_table(batch)):
                    raise ValueError("a write reaches rows of other jobs")
                _, checked = engine.run(program, batch, params, execute=False)
                if any(result_bytes(_own(checked.values, ids)) > job.key.limits.max_result_bytes
                       for job, ids in zip(group, back, strict=True)):
                    raise ValueError("a job's saves pass its limit")
                _, result = engine.run(program, self._head(program, batch), params)
        except Exception:
            for job in group:
                job.shared = 1
            return [self._run(job) for job in group]
        return [self._body(job, _own(result.values, ids), result.stopped, None, started + job.key.limits.max_seconds)
                for job, ids in zip(group, back, strict=True)]

    def _run(self, record: JobRecord) -> bytes | dict[str, Any]:
        """Run one job: its result body, or its error record."""
        limits = record.key.limits
        deadline = time.monotonic() + limits.max_seconds
        engine = self.model._engine
        try:
            with self._limited(record.program, deadline):
                _, checked = engine.run(record.program, record.batch, record.params, execute=False)
                expected = result_bytes(checked.values)
                if expected > limits.max_result_bytes:
                    return _limit(f"the saves are {expected} bytes; this key's limit is "
                                  f"{limits.max_result_bytes} (max_result_bytes)", "max_result_bytes")
                _, result = engine.run(record.program, self._head(record.program, record.batch), record.params)
        except Exception as e:
            if time.monotonic() > deadline:
                return _out_of_time(limits.max_seconds)
            return self._error(record, e)
        output = result.output if record.program.generation is not None else None
        return self._body(record, result.values, result.stopped, output, deadline)

    @contextlib.contextmanager
    def _limited(self, program: Program, deadline: float) -> Iterator[None]:
        """Errors without a span of their own point at the program's first line, and every
        module call past `deadline` raises."""
        first = next((op.span for op in program.ops), Span("<job>", 0))
        self.model._engine.where = lambda: first

        def check_deadline(module: Any, args: Any) -> None:
            if time.monotonic() > deadline:
                raise _Deadline()

        hook = torch.nn.modules.module.register_module_forward_pre_hook(check_deadline)
        try:
            yield
        finally:
            hook.remove()

    def _head(self, program: Program, batch: Batch) -> Batch:
        """`batch`, with the head on the last position alone where that is all `program` reads."""
        if not self.model._engine.last_position_head(program):
            return batch
        return dataclasses.replace(batch, kwargs={**batch.kwargs, "logits_to_keep": 1})

    def _body(self, record: JobRecord, values: dict[int, Any], stopped: bool, output: Any,
              deadline: float) -> bytes | dict[str, Any]:
        """A job's result body, or the error of a value that cannot travel or a limit it passed."""
        limits = record.key.limits
        try:
            body = encode_result(values, stopped, output)
        except UnsendableValue as e:
            return self._error(record, InterventionError.at(_save_span(record.program, e.value_id), str(e)))
        if len(body) > limits.max_result_bytes:
            return _limit(f"the result is {len(body)} bytes; this key's limit is "
                          f"{limits.max_result_bytes} (max_result_bytes)", "max_result_bytes")
        if time.monotonic() > deadline:
            return _out_of_time(limits.max_seconds)
        return body

    def _error(self, record: JobRecord, e: Exception) -> dict[str, Any]:
        if isinstance(e, InterventionError):
            diagnostics = [dataclasses.replace(d, span=dataclasses.replace(
                d.span, file=record.files.get(d.span.file, d.span.file))) for d in e.diagnostics]
            return {"error": "; ".join(d.message for d in diagnostics), "kind": type(e).__name__,
                    "diagnostics": diagnostics_json(diagnostics)}
        print(f"ivx serve: job {record.id} failed with an internal error:", file=sys.stderr)
        traceback.print_exception(e, file=sys.stderr)
        return {"error": f"internal error on the server: {type(e).__name__}: {str(e)[:300]}",
                "kind": "InternalError", "diagnostics": []}

    def _fail(self, record: JobRecord, message: str) -> None:
        record.status, record.error = ERROR, {"error": message, "kind": "ServerError", "diagnostics": []}
        record.finished = time.monotonic()

    def _forget_old(self) -> None:
        now = time.monotonic()
        for job_id in [i for i, j in self.jobs.items() if j.finished and now - j.finished > RETAIN_SECONDS]:
            del self.jobs[job_id]


def _limit(message: str, limit: str) -> dict[str, Any]:
    return {"error": message, "kind": "LimitError", "limit": limit, "diagnostics": []}


def _out_of_time(seconds: float) -> dict[str, Any]:
    return _limit(f"the job ran past this key's limit of {seconds:g} seconds (max_seconds)", "max_seconds")


def _own(values: dict[int, Any], ids: dict[int, int]) -> dict[int, Any]:
    """One copy's values of a side-by-side run, by the copy's own value ids."""
    return {old: values[new] for new, old in ids.items() if new in values}


def _save_span(program: Program, value_id: int) -> Span:
    return next(op.span for op in program.ops if op.opcode == "save" and op.refs() == [value_id])


def _opaque_spans(program: Program) -> tuple[Program, dict[str, str]]:
    """`program` with each span's file replaced by a token (`<file 0>`) that names no file on the
    server, and the table back to the client's names."""
    tokens: dict[str, str] = {}
    counter = itertools.count()

    def token(file: str) -> str:
        if file not in tokens:
            tokens[file] = f"<file {next(counter)}>"
        return tokens[file]

    ops = tuple(dataclasses.replace(op, span=dataclasses.replace(op.span, file=token(op.span.file)))
                for op in program.ops)
    return dataclasses.replace(program, ops=ops), {v: k for k, v in tokens.items()}
