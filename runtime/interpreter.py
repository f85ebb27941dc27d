"""The reference interpreter: executes a typed program with forward hooks on the real modules.

It is slow but obviously right, and defines what an experiment means. Each op runs at the event
the checker scheduled it for (its site's event, or the latest event of its inputs), in program
order within an event. Hooks are removed after every run, also when it fails.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from compiler import ops
from compiler.check import BEFORE_FORWARD, GRADIENT, TypedProgram
from compiler.errors import ExecutionError
from compiler.ir import Op, SaveKey, Site, by_name
from compiler.signatures import GENERATOR
from runtime.backward import BackwardPasses, weights_requiring_grad
from runtime.decode import DecodePlan, StepFn, StepInputs, decode, step_kwargs


@dataclass(frozen=True)
class Batch:
    """The model's forward arguments, which rows of the batch belong to each invoke, and the token
    id that pads them (a generation pads finished rows with it too)."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    rows: tuple[slice, ...]
    size: int
    pad_id: int = 0


@dataclass
class RunResult:
    saves: dict[str, Any] = field(default_factory=dict)  # what users read: `by_name(saved)`
    values: dict[int, Any] = field(default_factory=dict)  # value id -> value, for saved ids
    saved: dict[SaveKey, Any] = field(default_factory=dict)  # each save's (name, step, point) -> value
    output: Any = None  # the model's return value (None when stopped)
    stopped: bool = False
    graph: Any = None  # the patched graph (compiler.splice.Spliced) when the run was compiled


class _Stop(Exception):
    """Raised from a hook to end the forward early."""


class HookedRun:
    """One execution of a typed program: its ops run at the model's hooks as events happen."""

    def __init__(self, model: torch.nn.Module, typed: TypedProgram, batch: Batch,
                 params: dict[str, Any], only: set[int] | None = None):
        """`only`: run just these ops (by index); others run elsewhere (a compiled decode step)."""
        self.model, self.typed, self.batch, self.params = model, typed, batch, params
        self.values: dict[int, Any] = {}
        self.result = RunResult()
        self.positions = {e: i for i, e in enumerate(typed.events)}
        self.by_event: dict[int, list[Op]] = defaultdict(list)
        for i, (op, at) in enumerate(zip(typed.program.ops, typed.schedule, strict=True)):
            if (only is None or i in only) and at != GRADIENT:
                self.by_event[at].append(op)
        self.gradients = BackwardPasses(typed, lambda site: _rows(site, batch), batch.size, self.positions,
                                        lambda op: self._run_ops([op], None), self.values) \
            if GRADIENT in typed.schedule else None
        self.handles: list[Any] = []
        self.calls: dict[tuple[str, str], int] = defaultdict(int)
        self.adhoc_depth = 0
        self.stop_requested = False

    def execute(self, forward: Callable[[], Any] | None = None) -> RunResult:
        """Run `forward` (default: the model on the batch) with the program at its hooks."""
        gradients = self.gradients
        self.handles = self._install_hooks()
        with weights_requiring_grad(self.model) if gradients else contextlib.nullcontext():
            try:
                self._run_ops(self.by_event.get(BEFORE_FORWARD, []), None)
                try:
                    with torch.no_grad() if gradients is None else torch.enable_grad():
                        self.result.output = (forward or self._forward)()
                except _Stop:
                    self.result.stopped = True
            finally:
                self.remove_hooks()
            if gradients is not None:
                with torch.no_grad():
                    gradients.run(self.params)
                self.result.output = torch.utils._pytree.tree_map_only(torch.Tensor, torch.Tensor.detach,
                                                                       self.result.output)
        self.result.saves = by_name(self.result.saved)
        return self.result

    def remove_hooks(self) -> None:
        """Take this run's hooks off the model (also before a compiled step runs on it)."""
        for h in self.handles:
            h.remove()
        self.handles = []

    def report(self, path: str, value: Any) -> Any:
        """Run the ops at `path`'s output event for a value no module hook sees (a generation's
        ids, reported by the decoding loop); the replacement value, or None."""
        return self._on_post(path, value)

    def _forward(self) -> Any:
        return self.model(*self.batch.args, **self.batch.kwargs)

    # ---------------------------------------------------------------------------------- hooks
    def _install_hooks(self) -> list[Any]:
        wanted: dict[str, set[str]] = defaultdict(set)
        for index in {*self.by_event, *(self.gradients.events if self.gradients else ())}:
            if index != BEFORE_FORWARD:
                path, phase, _ = self.typed.events[index]
                if path != GENERATOR:  # not a module: the decoding loop reports it
                    wanted[path].add(phase)
        handles = []
        for path, phases in wanted.items():
            module = self.model.get_submodule(path)
            if "pre" in phases:
                handles.append(module.register_forward_pre_hook(
                    lambda m, a, k, p=path: self._on_pre(p, a, k), with_kwargs=True))
            if "post" in phases:
                handles.append(module.register_forward_hook(
                    lambda m, a, k, o, p=path: self._on_post(p, o), with_kwargs=True))
        return handles

    def _event(self, path: str, phase: str) -> int | None:
        """The index of the event a hook call is, counting the module's calls (None when the
        program does nothing there, or inside an ad-hoc module call)."""
        if self.adhoc_depth:
            return None
        n = self.calls[(path, phase)]
        self.calls[(path, phase)] = n + 1
        return self.positions.get((path, phase, n))

    def _on_pre(self, path: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        index = self._event(path, "pre")
        if index is None:
            return None
        live = (tuple(args), dict(kwargs))
        new = self._run_ops(self.by_event.get(index, []), live)
        if self.gradients is not None:
            for kind in ("input", "inputs"):
                new = self.gradients.keep(index, kind, new)
        self._maybe_stop()
        return new if new is not live else None

    def _on_post(self, path: str, output: Any) -> Any:
        index = self._event(path, "post")
        if index is None:
            return None
        new = self._run_ops(self.by_event.get(index, []), output)
        if self.gradients is not None:
            new = self.gradients.keep(index, "output", new)
        self._maybe_stop()
        return new if new is not output else None

    def _maybe_stop(self) -> None:
        if self.stop_requested:
            raise _Stop()

    # ------------------------------------------------------------------------------------ ops
    def _run_ops(self, todo: list[Op], live: Any) -> Any:
        for op in todo:
            try:
                live = self._run_op(op, live)
            except _Stop:
                raise
            except Exception as e:
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise ExecutionError.at(op.span, f"{op.target or op.opcode} failed while the model "
                                                 f"ran: {first}") from None
        return live

    def _run_op(self, op: Op, live: Any) -> Any:
        args = [ops.materialize(a, self.values) for a in op.args]
        kwargs = {k: ops.materialize(v, self.values) for k, v in op.kwargs}
        code = op.opcode
        if code == "read":
            rows = _rows(op.site, self.batch)  # type: ignore[arg-type]
            value = ops.site_value(live, op.site.kind)  # type: ignore[union-attr]
            self.values[op.result] = ops.slice_rows(value, rows, self.batch.size)  # type: ignore
        elif code == "write":
            path = [ops.materialize(a, self.values) for a in op.path]
            rows = _rows(op.site, self.batch)  # type: ignore[arg-type]
            live = ops.write_site(live, op.site.kind, path, args[0], rows, self.batch.size)  # type: ignore
        elif code == "call":
            self.values[op.result] = ops.call(op.target, args, kwargs)  # type: ignore[index]
        elif code == "module":
            self.adhoc_depth += 1
            try:
                self.values[op.result] = self.model.get_submodule(op.target)(*args, **kwargs)  # type: ignore
            finally:
                self.adhoc_depth -= 1
        elif code == "weight":
            module_path, _, name = op.target.rpartition(".")
            self.values[op.result] = getattr(self.model.get_submodule(module_path), name)  # type: ignore
        elif code == "param":
            self.values[op.result] = self.params[op.target]  # type: ignore[index]
        elif code == "save":
            value = _snapshot(args[0])
            self.result.saved[op.save_key] = value
            self.result.values[op.args[0].id] = value  # type: ignore[union-attr]
        elif code == "stop":
            self.stop_requested = True
        elif code in ("grad", "setgrad"):  # the backward runs these in its hooks
            raise RuntimeError("the forward ended before this site ran, so it has no gradient")
        return live


def _rows(site: Site, batch: Batch) -> slice:
    """The rows of the batch a site refers to: its invoke's (`model.generator.output` too, as
    in nnsight 0.8: an invoke's prompt and new tokens)."""
    return batch.rows[site.invoke]


def _snapshot(value: Any) -> Any:
    """Saved values must not change if the model later works in place on the same storage."""
    return torch.utils._pytree.tree_map_only(torch.Tensor, lambda t: t.detach().clone(), value)


def run(model: torch.nn.Module, typed: TypedProgram, batch: Batch, params: dict[str, Any]) -> RunResult:
    """Run the model once on `batch`, executing `typed` at its sites."""
    return HookedRun(model, typed, batch, params).execute()


def run_generation(model: torch.nn.Module, typed: TypedProgram, batch: Batch, params: dict[str, Any],
                   spec: DecodePlan) -> RunResult:
    """Generate from `batch` (left-padded prompts) with a dynamic KV cache, executing `typed` at its
    sites in every step: the hooks stay on for the whole loop, so a module's call count runs on
    across steps exactly as the generation's site table numbers them."""
    from transformers import DynamicCache

    run = HookedRun(model, typed, batch, params)
    cache = DynamicCache(config=getattr(model, "config", None))

    def step(k: int, inputs: StepInputs) -> torch.Tensor:
        return model(**step_kwargs(model, inputs, cache)).logits[:, -1]

    return run.execute(lambda: generate_and_report(run, step, batch, spec))


def generate_and_report(run: HookedRun, step: StepFn, batch: Batch, spec: DecodePlan) -> Any:
    """Decode from the batch's prompts with `step`, then run the ops at the generator's output."""
    ids = decode(step, batch.kwargs["input_ids"], batch.kwargs["attention_mask"], spec)
    new = run.report(GENERATOR, ids)
    return ids if new is None else new
