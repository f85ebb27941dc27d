"""Sweeps on a Ray cluster: `model.sweep(..., executor="ray")` and `ivx run --executor ray`.

The driver (the process that called `model.sweep` or `ivx run`) records and checks the experiment,
reads the prompts and owns the run directory, exactly as a local run does; workers (Ray actors,
each holding one copy of the model) compute shards. A shard is the unit of work: the driver sends a
window of prompt rows, a worker returns its tensors, the driver verifies their shapes and writes
the shard and the manifest. So resume, identity checks, `ivx show` and `load_results` are those of
a local run, and a shard is written once whichever worker computed it.

Faults: a worker that dies (killed, out of memory, its node lost) has its shard sent to another
worker, and a new worker takes its place; an error in the experiment itself (the same on every
worker) stops the run with that error, keeping the shards already written.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import sys
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from compiler.errors import Diagnostic, InterventionError
from compiler.ir import NO_SPAN, Span
from interp_dsl.sweeps import batch_runner
from runtime.fingerprints import architecture_fingerprint, weights_fingerprint
from runtime.shards import ShardSink
from runtime.sweep_runner import SweepPlan, Window, check_shard_shapes, run_window

MAX_ATTEMPTS = 3  # a shard whose worker dies this many times stops the run
START_TIMEOUT = float(os.environ.get("IVX_RAY_START_TIMEOUT", 1800))  # seconds for a worker to load the model
INSTALL = "pip install 'interp-dsl[ray]'"


class ClusterError(InterventionError):
    """The Ray cluster cannot run the sweep (unreachable, workers that cannot load the model, ...)."""


@dataclass(frozen=True)
class RayCluster:
    """Where a sweep's shards are computed: `address` names a running Ray cluster ("auto", or
    HOST:PORT); None starts a local instance (or uses the one this process already joined).
    `workers`: how many model copies compute shards (default: one per GPU, or one per node on a
    cluster without GPUs). `origin` names the setting in messages."""

    address: str | None = None
    workers: int | None = None
    origin: Span | None = None

    def pool(self, model: Any, plan: SweepPlan, invokes: list[str], compile: str, progress: bool) -> "Pool":
        """Workers that hold `model` (loaded from the source it was loaded from) and run `plan`."""
        return Pool(self, model, plan, invokes, compile, progress)


def ray_cluster(address: str | None = None, workers: int | None = None) -> RayCluster:
    """The executor of a sweep on Ray: `model.sweep(..., executor=interp_dsl.ray_cluster("auto", 8))`."""
    return RayCluster(address, workers)


def resolve_executor(executor: Any, where: Callable[[], Span]) -> RayCluster | None:
    """`executor=` of a sweep: "local" (or None) runs here; "ray" or a `RayCluster` runs on Ray."""
    if executor in (None, "local"):
        return None
    if executor == "ray":
        return RayCluster()
    if isinstance(executor, RayCluster):
        if executor.workers is not None and executor.workers < 1:
            raise InterventionError.at(executor.origin or where(), f"a Ray sweep needs at least one worker, "
                                       f"got {executor.workers}")
        return executor
    raise InterventionError.at(where(), f"executor must be 'local', 'ray' or interp_dsl.ray_cluster(...), "
                               f"got {executor!r}")


# ------------------------------------------------------------------------------------ workers
@dataclass(frozen=True)
class ModelSource:
    """How a worker loads the driver's model: by the name, directory or .gguf file it was loaded
    from (which every node must be able to read), or as the module itself (shipped through Ray's
    object store when the model exists only in the driver's memory)."""

    name: str | None
    dtype: torch.dtype
    language: bool  # a LanguageModel (with a tokenizer), or a plain Model

    @classmethod
    def of(cls, model: Any, where: Span) -> tuple["ModelSource", tuple[torch.nn.Module, Any] | None]:
        """The source of `model`, and the (module, tokenizer) to ship when it has no loadable name."""
        from interp_dsl.models import LanguageModel, local_source
        engine = model._engine
        dtype = next((p.dtype for p in engine.module.parameters() if p.is_floating_point()), torch.float32)
        language = isinstance(model, LanguageModel)
        name = local_source(engine.name) if language else None
        if name is not None:
            return cls(name, dtype, language), None
        if engine.fake_mode is not None:
            raise ClusterError.at(where, f"the workers cannot load {engine.name}: this model has no weights "
                                  "(a config with weights='fake') and no name, directory or .gguf file to load",
                                  "load it from a name, HF directory or .gguf file every node can read")
        return cls(None, dtype, language), (engine.module, getattr(model, "tokenizer", None))

    def load(self, shipped: tuple[torch.nn.Module, Any] | None) -> Any:
        from interp_dsl.models import LanguageModel, Model
        if shipped is not None:
            module, tokenizer = shipped
            return LanguageModel(module, tokenizer=tokenizer) if self.language else Model(module)
        return LanguageModel(self.name, dtype=self.dtype)


class ShardWorker:
    """One Ray actor: a copy of the model and the sweep's plan; computes a shard per call."""

    def __init__(self, source: ModelSource, shipped: tuple[torch.nn.Module, Any] | None, plan: SweepPlan,
                 invokes: list[str], compile: str, origin: Span, threads: int | None):
        import ray
        self.origin = origin
        self.failure: tuple[type[InterventionError], list[Diagnostic]] | None = None
        if threads:
            torch.set_num_threads(threads)
        self.device = "cuda" if ray.get_gpu_ids() else "cpu"
        try:
            model = source.load(shipped)
        except InterventionError as e:  # the same on every worker: reported, not retried
            self.failure = (type(e), self._located(e))
            return
        module = model._engine.module
        if self.device == "cuda":
            module.to(self.device)
        self.weights, self.architecture = weights_fingerprint(module), architecture_fingerprint(module)
        self.plan = dataclasses.replace(plan, params=_to(plan.params, self.device), points=_to(plan.points, self.device))
        self.execute = batch_runner(model, self.plan, invokes, compile)

    def describe(self) -> dict[str, Any]:
        if self.failure is not None:
            return {"failure": self.failure}
        return {"weights": self.weights, "architecture": self.architecture, "host": socket.gethostname(),
                "pid": os.getpid(), "device": self.device, "threads": torch.get_num_threads()}

    def run(self, window: Window) -> tuple[str, Any]:
        """("ok", the shard's tensors) or ("error", the error's class, its diagnostics)."""
        if self.failure is not None:
            return ("error", *self.failure)
        try:
            tensors = run_window(self.plan, window, self.execute, lambda n: None, {})
        except InterventionError as e:
            return ("error", type(e), self._located(e))
        return ("ok", {k: v.cpu() for k, v in tensors.items()})

    def _located(self, e: InterventionError) -> list[Diagnostic]:
        """The diagnostics, with spans inside Ray's worker (not the user's) moved to the sweep's origin."""
        import ray
        inside = os.path.dirname(ray.__file__)
        return [dataclasses.replace(d, span=self.origin)
                if d.span == NO_SPAN or os.path.abspath(d.span.file).startswith(inside) else d
                for d in e.diagnostics]


def _to(value: Any, device: str) -> Any:
    """Parameter values (tensors, in dicts and lists) on `device`."""
    if isinstance(value, dict):
        return {k: _to(v, device) for k, v in value.items()}
    if isinstance(value, list):
        return [_to(v, device) for v in value]
    return value.to(device) if isinstance(value, torch.Tensor) else value


# --------------------------------------------------------------------------------------- pool
class Pool:
    """The workers of one sweep, started on entry (each loads the model) and killed on exit."""

    def __init__(self, cluster: RayCluster, model: Any, plan: SweepPlan, invokes: list[str], compile: str,
                 progress: bool):
        from interp_dsl.spans import user_span
        self.cluster, self.plan, self.progress = cluster, plan, progress
        self.origin = cluster.origin or user_span()
        self.source, shipped = ModelSource.of(model, self.origin)
        self.driver = model._engine
        self.ray = _connect(cluster, self.origin)
        self.shipped = None if shipped is None else self.ray.put(shipped)
        self.arguments = (plan, invokes, compile, self.origin)
        self.count, self.options, self.threads = self._placement()
        self.actors: list[Any] = []
        self.replacements = self.count  # new workers that may replace dead ones
        self.weights = ""

    def __enter__(self) -> "Pool":
        if self.progress:
            print(f"ivx: starting {self.count} Ray worker(s); each loads {self.driver.name}", flush=True,
                  file=sys.stderr)
        self.actors = [self._start() for _ in range(self.count)]
        try:
            self.weights = self._agreed_weights(self._described(self.actors))
        except BaseException:
            self.__exit__()
            raise
        return self

    def _described(self, actors: list[Any]) -> list[dict[str, Any]]:
        """Each worker's description, once it has loaded the model (within START_TIMEOUT)."""
        ray = self.ray
        try:
            return ray.get([a.describe.remote() for a in actors], timeout=START_TIMEOUT)
        except ray.exceptions.GetTimeoutError:
            raise ClusterError.at(self.origin, f"Ray workers did not start within {START_TIMEOUT:.0f} s; each asks "
                                  f"for {self.options}, which the cluster may not have free",
                                  "use fewer --workers, or set IVX_RAY_START_TIMEOUT for a model that "
                                  "loads slowly") from None
        except ray.exceptions.RayActorError as e:
            raise ClusterError.at(self.origin, f"a Ray worker died while loading the model: {_reason(e)}") from None

    def __exit__(self, *exc: Any) -> None:
        for actor in self.actors:
            self.ray.kill(actor)
        self.actors = []

    def describe(self) -> dict[str, Any]:
        return {"kind": "ray", "workers": self.count, **({"address": self.cluster.address}
                                                         if self.cluster.address else {})}

    def _placement(self) -> tuple[int, dict[str, Any], int | None]:
        """How many workers, the resources each asks Ray for, and its torch threads (CPU workers)."""
        resources = self.ray.cluster_resources()
        gpus, cpus = int(resources.get("GPU", 0)), resources.get("CPU", 1)
        nodes = [n["Resources"].get("CPU", 0) for n in self.ray.nodes() if n.get("Alive")]
        nodes = [c for c in nodes if c > 0] or [cpus]  # a head started with --num-cpus=0 takes no worker
        count = self.cluster.workers or gpus or len(nodes)
        if gpus:
            return count, {"num_gpus": min(1.0, gpus / count), "num_cpus": min(1.0, cpus / count)}, None
        share = min(cpus / count, min(nodes))  # every worker must fit on the smallest node
        per = float(int(share)) if share >= 1 else share  # whole CPUs, or a fraction of one
        return count, {"num_cpus": per}, max(1, int(share))

    def _start(self) -> Any:
        worker = self.ray.remote(ShardWorker).options(max_restarts=0, max_task_retries=0, **self.options)
        return worker.remote(self.source, self.shipped, *self.arguments, self.threads)

    def _agreed_weights(self, described: list[dict[str, Any]]) -> str:
        """The workers' weights fingerprint: theirs must agree with each other, their architecture
        with the model the sweep was checked against, and their weights with the driver's when it
        holds real ones."""
        for d in described:
            if "failure" in d:
                kind, diagnostics = d["failure"]
                raise kind(diagnostics)
        mine = architecture_fingerprint(self.driver.module)
        if any(d["architecture"] != mine for d in described):
            raise ClusterError.at(self.origin, f"the Ray workers loaded a model whose parameters differ in names or "
                                  f"shapes from those of {self.driver.name}, which this sweep was checked against")
        theirs = {d["weights"] for d in described}
        if len(theirs) > 1:
            hosts = ", ".join(sorted({d["host"] for d in described}))
            raise ClusterError.at(self.origin, f"the Ray workers on {hosts} loaded different weights from "
                                  f"{self.source.name}", "make every node hold the same model files")
        weights = theirs.pop()
        if self.driver.fake_mode is None and weights != weights_fingerprint(self.driver.module):
            raise ClusterError.at(self.origin, f"the Ray workers' weights of {self.driver.name} differ from this "
                                  "process's (were they changed in memory after loading?)",
                                  "run locally, or save the changed model and load it from that directory")
        return weights

    # -------------------------------------------------------------------------- scheduling
    def run(self, windows: Iterator[Window], sink: ShardSink, advance: Callable[[int], None],
            show_workers: Callable[[int], None]) -> None:
        """Compute every window on the workers, at most two per worker in flight; write each shard
        as it arrives; then mark the run complete."""
        ray = self.ray
        retry: deque[Window] = deque()
        attempts: dict[int, int] = {}
        flying: dict[Any, tuple[Any, Window]] = {}
        queued: dict[int, list[Window]] = {id(a): [] for a in self.actors}  # per worker, in submission order
        shapes: dict[str, tuple[int, ...]] = {}
        exhausted = False
        show_workers(len(self.actors))
        while True:
            while self.actors and (retry or not exhausted) and len(flying) < 2 * len(self.actors):
                window = retry.popleft() if retry else next(windows, None)
                if window is None:
                    exhausted = True
                    break
                actor = min(self.actors, key=lambda a: len(queued[id(a)]))
                queued[id(actor)].append(window)
                flying[actor.run.remote(window)] = (actor, window)
            if not flying:
                break
            [done], _ = ray.wait(list(flying), num_returns=1)
            actor, window = flying.pop(done)
            running = queued[id(actor)][0] is window  # the others waited behind it
            queued[id(actor)].remove(window)
            try:
                outcome = ray.get(done)
            except ray.exceptions.RayActorError as e:
                if running:
                    attempts[window.index] = attempts.get(window.index, 0) + 1
                self._lost(actor, window, e, attempts, queued)
                retry.append(window)
                show_workers(len(self.actors))
                continue
            except ray.exceptions.RayTaskError as e:  # an error outside the experiment's own checks
                raise ClusterError.at(self.origin, f"a Ray worker failed on prompts {window.first}..{window.stop - 1}: "
                                      f"{_reason(e.cause if e.cause is not None else e)}") from None
            if outcome[0] == "error":
                raise outcome[1](outcome[2])
            check_shard_shapes(self.plan, outcome[1], shapes)
            sink.write(window.index, outcome[1], window.first, window.stop, window.rows)
            advance(len(window.rows))
        sink.finish()

    def _replacement(self) -> Any:
        """A new worker that loaded the same weights, or None when none starts in time (the run goes
        on with the others)."""
        actor = self._start()
        try:
            [described] = self._described([actor])
        except ClusterError:
            self.ray.kill(actor)
            return None
        if "failure" in described:
            self.ray.kill(actor)
            kind, diagnostics = described["failure"]
            raise kind(diagnostics)
        if described["weights"] != self.weights:
            self.ray.kill(actor)
            raise ClusterError.at(self.origin, f"a Ray worker started to replace a dead one on {described.get('host')} "
                                  f"did not load the weights the run was started with", "make every node hold "
                                  "the same model files")
        return actor

    def _lost(self, actor: Any, window: Window, error: Exception, attempts: dict[int, int],
              queued: dict[int, list[Window]]) -> None:
        """A worker died: replace it (while replacements last); stop when the window it was
        computing has killed MAX_ATTEMPTS workers."""
        if attempts.get(window.index, 0) >= MAX_ATTEMPTS:
            raise ClusterError.at(self.origin, f"prompts {window.first}..{window.stop - 1} killed {MAX_ATTEMPTS} "
                                  f"Ray workers in turn (last: {_reason(error)})",
                                  "a batch may not fit in a worker's memory: try a smaller --batch-size")
        if actor in self.actors:
            self.actors.remove(actor)
            self.ray.kill(actor)
            if self.replacements > 0:
                self.replacements -= 1
                replacement = self._replacement()
                if replacement is not None:
                    queued[id(replacement)] = []
                    self.actors.append(replacement)
        if not self.actors:
            raise ClusterError.at(self.origin, f"every Ray worker died (last: {_reason(error)})")


def _reason(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0][:200] if text else type(error).__name__


def _connect(cluster: RayCluster, origin: Span) -> Any:
    """The `ray` module, joined to the cluster (a local instance when no address is given)."""
    try:
        import ray
    except ImportError:
        raise ClusterError.at(origin, "a Ray sweep needs Ray, which is not installed", INSTALL) from None
    if ray.is_initialized():
        joined = ray.get_runtime_context().gcs_address
        if cluster.address not in (None, "auto") and cluster.address.removeprefix("ray://") != joined:
            raise ClusterError.at(origin, f"this process already joined the Ray cluster at {joined}; it cannot "
                                  f"join {cluster.address} too", "leave out the address, or run from a new process")
        return ray
    options: dict[str, Any] = {"logging_level": logging.ERROR, "log_to_driver": False}
    if cluster.address is None:
        options["include_dashboard"] = False
    else:
        _reachable(cluster.address, origin)  # Ray itself retries an unreachable address for minutes
    try:
        ray.init(address=cluster.address, **options)
    except (ConnectionError, ValueError, RuntimeError) as e:
        raise ClusterError.at(origin, f"cannot join the Ray cluster at {cluster.address}: {_reason(e)}",
                              "start one with `ray start --head`, or leave out the address to start a local "
                              "instance") from None
    return ray


def _reachable(address: str, origin: Span) -> None:
    """Refuse a HOST:PORT address nothing answers at, within a few seconds."""
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not port.isdigit():
        if address == "auto":
            return
        raise ClusterError.at(origin, f"a Ray address is 'auto' or HOST:PORT, got {address!r}")
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError as e:
        raise ClusterError.at(origin, f"cannot join the Ray cluster at {address}: nothing answers there "
                              f"({e.strerror or e})", "start one with `ray start --head` (it prints the address), "
                              "or leave out the address to start a local instance") from None
