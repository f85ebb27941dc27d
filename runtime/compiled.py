"""Compiled execution: the model's forward captured once per experiment and shape bucket, the
program spliced in, compiled, and reused for every later call with other parameter values.

Capture is `torch.compile(model, backend=<ours>, fullgraph=True)`: our backend receives dynamo's
graph (with site markers), splices the program in (`compiler.splice`), and compiles the result
with inductor or runs it as it is. Parameters, weights and saved values pass through a side
channel on the artefact, so values never appear in the graph and never recompile it.

Across processes: a capture in `graph` mode is kept on disk (runtime/graph_cache.py), and a later
process with the same model, program and shape bucket runs that graph without capturing.

Guards: each artefact has its own backend, and dynamo keys its cache entries by backend, so two
programs can never share a graph; marker hooks stay installed (dynamo guards on hook
dictionaries). After every call the artefact checks that its graph really ran; if dynamo ran
the model some other way (a recompile limit, a guard we did not foresee), the result is thrown
away and the reference interpreter runs instead, with a warning. Each artefact compiles its own
copy of a small forward function, so dynamo's per-code-object state (cache entries, recompile
limits, frames it gave up on) is per artefact.
"""

from __future__ import annotations

import contextlib
import itertools
import types
from dataclasses import dataclass, field
from typing import Any

import torch

from compiler.check import TypedProgram
from compiler.ir import SaveKey, by_name
from compiler.markers import Markers
from compiler.signatures import SiteTable
from compiler.splice import RowViews, Spliced, extra_inputs, site_keys, splice
from runtime import graph_cache, shared_prefix
from runtime.interpreter import Batch, RunResult

AUTO_REPEATS = 3  # on a GPU, `auto` compiles an experiment the third time it runs with one shape bucket
# On a CPU, `auto` compiles a sweep of at least this many forwards (batches x parameter points).
# Measured on SmolLM2 (docs/benchmarks.md): capturing costs ~14 s and saves ~2-3 ms per prompt,
# so it pays from ~5000 prompts at batch 32.
AUTO_SWEEP_RUNS_CPU = 160
_ARTEFACT_IDS = itertools.count()


class _NotRun(Exception):
    """The spliced graph did not run during a compiled call."""


@dataclass
class _Call:
    """What one call passes to the compiled graph, and what it gets back."""

    typed: TypedProgram
    table: SiteTable
    batch: Batch
    extra: list[Any]
    saves: list[Any] | None = None
    spliced: Spliced | None = None
    views: RowViews | None = None
    outputs: list[Any] | None = None  # the graph's outputs for the model's
    keep: bool = False  # describe a fresh capture for the disk (runtime/graph_cache.py)
    capture: dict[str, Any] | None = None  # that description, where it can be written down


@dataclass
class CompileStats:
    """Counters for one model: artefacts built, backend compilations (captures), graphs loaded
    from disk instead of captured, compiled calls, and calls that fell back to the reference
    interpreter."""

    artefacts: int = 0
    compilations: int = 0
    loaded: int = 0
    calls: int = 0
    fallbacks: int = 0
    reasons: list[str] = field(default_factory=list)


class Artefact:
    """One experiment (IR structural hash) compiled for one model, mode and batch layout."""

    def __init__(self, module: torch.nn.Module, markers: Markers, mode: str, keys: frozenset[str],
                 dynamic: bool, stats: CompileStats):
        self.module, self.markers, self.mode, self.keys = module, markers, mode, keys
        self.stats, self.dynamic = stats, dynamic
        self._call: _Call | None = None
        self.compiled = torch.compile(_own_forward(module), backend=self._backend, fullgraph=True,
                                      dynamic=None if dynamic else False)

    def _backend(self, gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Any:
        call = self._call
        assert call is not None
        self.stats.compilations += 1
        fake_mode = _graph_fake_mode(gm) or torch._guards.detect_fake_mode(example_inputs)
        examples = [fake_mode.from_tensor(v) if fake_mode is not None else v for v in call.extra]
        spliced = splice(gm, call.typed, call.table, call.batch.rows, call.batch.size, self.module,
                         examples, fake_mode, call.views)
        if self.mode == "graph":
            run = spliced.module
        else:
            from torch._inductor.compile_fx import compile_fx
            patches = {"triton.cudagraphs": True} if self.mode == "cudagraphs" else {}
            run = compile_fx(spliced.module, [*example_inputs, *call.extra], config_patches=patches)
        if call.keep and self.mode == "graph":
            call.capture = graph_cache.describe_capture(gm, spliced, getattr(fake_mode, "shape_env", None))
        n = spliced.n_outputs

        def compiled(*args: Any) -> Any:
            now = self._call
            out = run(*args, *now.extra)  # type: ignore[union-attr]
            now.saves, now.spliced, now.outputs = list(out[n:]), spliced, list(out[:n])  # type: ignore[union-attr]
            return out[:n]

        return compiled

    def run(self, typed: TypedProgram, table: SiteTable, batch: Batch, params: dict[str, Any],
            shared: tuple[shared_prefix.SharedPrefix, shared_prefix.Regrowth] | None = None,
            keep: Any = None) -> RunResult:
        """One compiled call; with `shared`, on the growing batch of the shared-prefix schedule.
        `keep(capture)` is called with what a fresh capture in this call can leave on disk."""
        extra = [_extra_value(self.module, kind, name, params) for kind, name in extra_inputs(typed.program)]
        args, kwargs, views, plan = batch.args, batch.kwargs, None, None
        growing = contextlib.nullcontext()
        if shared is not None:
            schedule, regrowth = shared
            plan = shared_prefix.layout(schedule, batch, table)
            args, kwargs = shared_prefix.physical_inputs(batch, schedule, plan)
            views, rows = shared_prefix.row_views(typed, plan)
            extra += rows
            regrowth.install(plan.layers)
            growing = regrowth.activated(plan)
        call = self._call = _Call(typed, table, batch, extra, views=views, keep=keep is not None)
        self.markers.install(self.keys)
        if self.dynamic:
            _mark_dynamic(args, kwargs, batch_too=len(batch.rows) == 1 and shared is None)
        try:
            with self.markers.activated(self.keys), growing, torch.no_grad():
                output = self.compiled(*args, **kwargs)
        finally:
            self._call = None
        if call.saves is None or call.spliced is None:
            raise _NotRun("dynamo ran the model without the spliced graph")
        self.stats.calls += 1
        if keep is not None and call.capture is not None and call.outputs is not None:
            output_recipe = graph_cache.describe_output(output, call.outputs)
            if output_recipe is not None:
                keep({**call.capture, "output": output_recipe})
        if plan is not None:
            output = shared_prefix.logical_output(output, plan)
        return _result(typed, call.spliced, call.saves, output, extra)


class CompiledRunner:
    """The compiled artefacts of one model, by (IR hash, mode, batch layout, shape bucket)."""

    def __init__(self, module: torch.nn.Module):
        self.module = module
        self.markers = Markers(module)
        self.artefacts: dict[Any, Artefact] = {}
        self.failed: dict[Any, str] = {}
        self.stats = CompileStats()
        self.seen: dict[Any, int] = {}
        self.new_reason: str | None = None
        self.regrowth = shared_prefix.Regrowth(module)
        root = graph_cache.directory()
        self.disk = graph_cache.GraphCache(root) if root is not None else None
        self.entries: dict[str, graph_cache.Entry | None] = {}  # disk key -> entry (None: none usable)
        self._digest: tuple[tuple[Any, ...], str] | None = None  # the last structure and its hash

    def release(self) -> None:
        """Drop every artefact and take the marker and growth hooks off the model."""
        self.artefacts.clear()
        self.failed.clear()
        self.markers.remove()
        self.regrowth.remove()

    def wants(self, mode: str, typed: TypedProgram, batch: Batch) -> str:
        """The mode to use for this call: `auto` compiles only work that repeats on a GPU."""
        if mode != "auto":
            return mode
        if not any(p.is_cuda for p in self.module.parameters()):
            return "off"
        key = self._key("auto", typed, batch)
        self.seen[key] = self.seen.get(key, 0) + 1
        return "inductor" if self.seen[key] >= AUTO_REPEATS else "off"

    def run(self, mode: str, typed: TypedProgram, table: SiteTable, batch: Batch,
            params: dict[str, Any], static: bool = False,
            shared: shared_prefix.SharedPrefix | None = None) -> RunResult | None:
        """Run compiled; None when it cannot be (see `new_reason`). `static`: every shape is
        fixed (a decode step on a static KV cache), so nothing is marked dynamic. `shared`: run
        with the shared-prefix schedule (its growth is traced into the captured graph)."""
        self.new_reason = None
        if mode == "cudagraphs" and not any(p.is_cuda for p in self.module.parameters()):
            return self._fallback(("cudagraphs",), "CUDA graphs need the model on a CUDA device")
        key = self._key(mode, typed, batch, static) + ((shared.invoke, tuple(shared.joins.items())) if shared else ())
        if key in self.failed:
            self.stats.fallbacks += 1
            return None
        if any(op.opcode == "backward" for op in typed.program.ops):
            return self._fallback(key, "the program takes gradients (backward), which the compiled "
                                       "path does not run yet")
        dynamic = not static
        disk = self._disk_key(key, mode, typed, batch, params, dynamic)
        if disk is not None:
            result = self._run_kept(disk[0], typed, table, batch, params, shared)
            if result is not None:
                return result
        artefact = self.artefacts.get(key)
        if artefact is None:
            artefact = Artefact(self.module, self.markers, mode, site_keys(typed), dynamic, self.stats)
            self.artefacts[key] = artefact
            self.stats.artefacts += 1
        keep = (lambda capture: self._keep(*disk, capture)) if disk is not None else None
        try:
            return artefact.run(typed, table, batch, params, (shared, self.regrowth) if shared else None, keep)
        except Exception as e:  # capture, splice or compile failed: the reference still works
            del self.artefacts[key]
            return self._fallback(key, _cause(e))

    def _disk_key(self, key: Any, mode: str, typed: TypedProgram, batch: Batch, params: dict[str, Any],
                  dynamic: bool) -> tuple[str, tuple[Any, ...]] | None:
        """The name of this call's graph on disk, and the model's structure it was named from;
        None where no graph is kept (graph_cache.py)."""
        if self.disk is None or mode != "graph":
            return None
        values = [*batch.args, *batch.kwargs.values()]
        if not all(v is None or isinstance(v, (torch.Tensor, bool, int, float, str)) for v in values):
            return None  # an object (a KV cache) is specialised on by identity
        snapshot = self._structure()
        if snapshot is None:
            return None
        if self._digest is None or self._digest[0] != snapshot:
            self._digest = (snapshot, graph_cache.digest(snapshot))
        extra = [_extra_value(self.module, kind, name, params) for kind, name in extra_inputs(typed.program)]
        return graph_cache.key({
            "structure": self._digest[1], "program": key[0], "mode": mode, "layout": key[2], "bucket": key[3],
            "shared": key[4:],
            "shapes": None if dynamic else [list(v.shape) for v in values if isinstance(v, torch.Tensor)],
            "extra": [graph_cache.tensor_signature(v) for v in extra],
            "default_dtype": str(torch.get_default_dtype())}), snapshot

    def _structure(self) -> tuple[Any, ...] | None:
        try:
            return graph_cache.structure(self.module, self.markers.hook_ids() | self.regrowth.hook_ids())
        except graph_cache.Uncacheable:
            return None

    def _run_kept(self, disk_key: str, typed: TypedProgram, table: SiteTable, batch: Batch,
                  params: dict[str, Any], shared: shared_prefix.SharedPrefix | None) -> RunResult | None:
        """Run the graph kept on disk under `disk_key`; None when there is none or its shape
        conditions reject this call."""
        if disk_key not in self.entries:
            self.entries[disk_key] = self.disk.load(disk_key)  # type: ignore[union-attr]
            if self.entries[disk_key] is not None:
                self.stats.loaded += 1
        entry = self.entries[disk_key]
        if entry is None:
            return None
        extra = [_extra_value(self.module, kind, name, params) for kind, name in extra_inputs(typed.program)]
        args, kwargs, plan = batch.args, batch.kwargs, None
        if shared is not None:  # the growth is in the graph; its layout tensors are inputs
            plan = shared_prefix.layout(shared, batch, table)
            args, kwargs = shared_prefix.physical_inputs(batch, shared, plan)
            extra += shared_prefix.row_views(typed, plan)[1]
        try:
            inputs = entry.arguments(self.module, args, kwargs, extra, plan)
            if inputs is None:
                return None
            with torch.no_grad():
                out = entry.spliced.module(*inputs, *extra)
        except Exception:  # the capture path decides what a failing call does (its fallback, its errors)
            self.entries[disk_key] = None
            return None
        n = entry.spliced.n_outputs
        output = entry.output(list(out[:n]))
        if plan is not None:
            output = shared_prefix.logical_output(output, plan)
        self.stats.calls += 1
        return _result(typed, entry.spliced, list(out[n:]), output, extra)

    def _keep(self, disk_key: str, before: tuple[Any, ...], capture: dict[str, Any]) -> None:
        """Write a fresh capture to disk, unless the call changed the model (see graph_cache.py)."""
        if self._structure() == before:
            self.disk.save(disk_key, capture)  # type: ignore[union-attr]

    def refuse(self, key: Any, reason: str) -> None:
        """Record that `key` cannot run compiled, and why (for work decided outside `run`)."""
        return self._fallback(key, reason)

    def _fallback(self, key: Any, reason: str) -> None:
        """Remember why; `new_reason` is set the first time, for the caller to tell the user."""
        self.stats.fallbacks += 1
        if key not in self.failed:
            self.failed[key] = reason
            self.stats.reasons.append(reason)
            self.new_reason = reason
        return None

    def _key(self, mode: str, typed: TypedProgram, batch: Batch, static: bool = False) -> Any:
        layout = None if len(batch.rows) == 1 else (tuple((r.start, r.stop) for r in batch.rows), batch.size)
        return (typed.program.structural_hash(), mode, layout, _bucket(batch, static))


def sweep_mode(mode: str, module: torch.nn.Module, runs: int) -> str:
    """The mode a sweep of `runs` forwards runs in: `auto` compiles when the capture pays for
    itself (`inductor` on a GPU from AUTO_REPEATS forwards, `graph` on a CPU from
    AUTO_SWEEP_RUNS_CPU), else runs the reference interpreter; other modes stay as given."""
    if mode != "auto":
        return mode
    if any(p.is_cuda for p in module.parameters()):
        return "inductor" if runs >= AUTO_REPEATS else "off"
    return "graph" if runs >= AUTO_SWEEP_RUNS_CPU else "off"


def _bucket(batch: Batch, static: bool = False) -> Any:
    """What a compiled graph is specialised on: argument names, dtypes, ranks, non-tensor values
    (by identity for objects such as a KV cache) and which dims are 1 (dynamo specialises those).
    Other sizes are symbolic, or part of the bucket when `static`."""
    def sig(v: Any) -> Any:
        if isinstance(v, torch.Tensor):
            return ("T", str(v.dtype), tuple(v.shape) if static else tuple(d == 1 for d in v.shape),
                    v.device.type)
        if v is None or isinstance(v, (bool, int, float, str, tuple, list, torch.dtype)):
            return repr(v)
        return (type(v).__name__, id(v))
    return (tuple(sig(a) for a in batch.args), tuple((k, sig(v)) for k, v in batch.kwargs.items()))


def _own_forward(module: torch.nn.Module) -> Any:
    """A function calling the model (so the root module's hooks are traced too) with a code
    object of its own: dynamo keeps its cache, recompile count and skip marks per code object,
    so one artefact's failure or its shape buckets never touch another's."""
    def forward(*args: Any, **kwargs: Any) -> Any:
        return module(*args, **kwargs)

    code = forward.__code__.replace(co_name=f"ivx_forward_{next(_ARTEFACT_IDS)}")
    return types.FunctionType(code, forward.__globals__, code.co_name, None, forward.__closure__)


def _graph_fake_mode(gm: torch.fx.GraphModule) -> Any:
    """The fake mode of the graph's own metadata (the one its nodes' example values live in)."""
    for node in gm.graph.nodes:
        mode = getattr(node.meta.get("example_value"), "fake_mode", None)
        if mode is not None:
            return mode
    return None


def _mark_dynamic(args: tuple[Any, ...], kwargs: dict[str, Any], batch_too: bool) -> None:
    """Sequence sizes are symbolic (where the model allows), and with `batch_too` the batch size:
    one graph for all. Several invokes, or the shared-prefix schedule's rows, fix the batch size
    (their rows are part of the artefact's key)."""
    for v in (*args, *kwargs.values()):
        if isinstance(v, torch.Tensor) and v.dim() >= 1:
            if batch_too:
                torch._dynamo.maybe_mark_dynamic(v, 0)
            if v.dim() == 2 and not v.is_floating_point():  # token ids, masks, positions
                torch._dynamo.maybe_mark_dynamic(v, 1)


def _extra_value(module: torch.nn.Module, kind: str, name: str, params: dict[str, Any]) -> Any:
    if kind == "weight":
        path, _, attr = name.rpartition(".")
        return getattr(module.get_submodule(path), attr)
    value = params[name]
    if isinstance(value, torch.Tensor):
        return value
    return torch.tensor(value, dtype=torch.float64)  # a number is a 0-d input, not a constant


def _result(typed: TypedProgram, spliced: Spliced, leaves: list[Any], output: Any,
            extra: list[Any]) -> RunResult:
    stops = [at for op, at in zip(typed.program.ops, typed.schedule, strict=True) if op.opcode == "stop"]
    stop_at = min(stops) if stops else None
    saves: dict[tuple[str, int], list[tuple[SaveKey, int]]] = {}  # (name, value id) -> each save's key, event
    for op, at in zip(typed.program.ops, typed.schedule, strict=True):
        if op.opcode == "save":
            saves.setdefault((op.target, op.args[0].id), []).append((op.save_key, at))  # type: ignore[union-attr]
    result = RunResult(output=None if stops else output, stopped=bool(stops), graph=spliced)
    for name, vid, value in spliced.unflatten_saves(leaves):
        value = torch.utils._pytree.tree_map_only(
            torch.Tensor, lambda t: t.clone() if any(t is e for e in extra) else t, value)
        for key, at in saves[(name, vid)]:
            if stop_at is None or at <= stop_at:  # else the reference interpreter stops before computing it
                result.saved[key] = value
                result.values[vid] = value
    result.saves = by_name(result.saved)
    return result


def _cause(e: BaseException) -> str:
    inner = getattr(e, "inner_exception", None)
    if inner is not None:
        e = inner
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__
