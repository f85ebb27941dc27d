"""The shared-prefix schedule for sweeps that write at one layer per point (activation patching,
steering over a layer axis): the rows of a point join the batch at the layer they are written at.

A vectorised integer axis (interp_dsl/fan.py) expands an invoke into a copy of its prompts per
point, and each point's write touches only its own rows (`torch.where` on the point's row mask).
Until a point's first write, its rows are therefore equal to the unexpanded invoke's. This schedule
runs the invoke once (its *shared* rows) and, at the decoder layer where a point is first written,
appends a copy of the shared rows for that point: rows patched at layer L only run layers L..end.

Rows are *logical* (the expanded batch the program was checked against) or *physical* (the batch
that runs). At every event the program acts on, its site value is gathered into logical rows, the
ops run exactly as in the reference interpreter, and what they wrote is scattered back. The
per-row inputs a decoder layer takes besides the hidden state (attention mask, position ids,
rotary embeddings) are indexed per physical row; which inputs are per row is read from the site
table recorded on the logical batch and must agree with the shapes seen at run time.

`plan` decides whether a program and model allow it (or says why not); `run` executes it.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils._pytree import tree_flatten, tree_unflatten

from compiler.check import BEFORE_FORWARD, TypedProgram
from compiler.ir import Const, Op, Ref
from compiler.signatures import Event, SiteTable
from runtime.interpreter import Batch, HookedRun, RunResult

FAN_PREFIX = "__fan_"  # interp_dsl.fan.FAN_PARAM without its name


class NotShared(Exception):
    """The run met a value the schedule cannot lay out by rows (the batch then runs vectorised)."""


@dataclass(frozen=True)
class SharedPrefix:
    """Where each point's rows of the expanded invoke join the batch."""

    invoke: int  # the expanded invoke
    points: int  # points of the vectorised axis
    rows: int  # prompts per point
    joins: dict[Event, tuple[int, ...]]  # growth event (a stack layer's pre or post) -> points joining there
    layers: tuple[str, ...]  # the decoder stack's layers, in forward order

    def describe(self) -> dict[str, Any]:
        """For a sweep's manifest."""
        first = min(self.layers.index(path) for path, _, _ in self.joins)
        return {"name": "shared-prefix", "invoke": self.invoke, "points_joining": {
            f"{path}.{'input' if phase == 'pre' else 'output'}": list(p) for (path, phase, _), p in self.joins.items()},
            "first_layer": self.layers[first]}


def plan(typed: TypedProgram, table: SiteTable, batch: Batch, axis: str, points: int,
         expanded: int) -> SharedPrefix | str:
    """The schedule for `typed`, a sweep program whose invoke `expanded` holds a copy of its prompts
    per point of the vectorised axis `axis` (`points` points), or the reason it does not apply."""
    program = typed.program
    if program.generation is not None:
        return "it generates"
    if points < 2:
        return "the axis has one point"
    for op in program.ops:
        if op.opcode in ("backward", "grad", "setgrad"):
            return "it back-propagates"
        if op.opcode == "call" and (op.target == "setitem" or op.target.startswith("Tensor.") and op.target.endswith("_")):
            return f"it changes a value in place ({op.target})"
    layers = decoder_stack(table)
    if not layers:
        return "the model has no decoder stack whose layers pass one hidden-state tensor on"
    defs = {op.result: op for op in program.ops if op.result is not None}
    joins: dict[int, Event] = {}
    invoke = None
    for index, op in enumerate(program.ops):
        if op.opcode not in ("read", "write"):
            continue
        site = op.site
        assert site is not None
        live = table.values.get((site.module, site.phase, site.call))
        if site.kind == "inputs" or not _batch_first(_site(live, site.kind), table.batch_size):
            return f"{site.module}.{site.kind} is not one row per batch row"
        if op.opcode == "read" or site.invoke != expanded:
            continue
        point = _point_of(op, defs, axis)
        if point is None:
            return f"a write at {site.module}.{site.kind} changes rows of more than one point"
        invoke = site.invoke
        event = _join_event(site.module, site.kind, site.call, layers)
        if event is None:
            return f"{site.module} is not inside a decoder layer"
        if typed.schedule[index] == BEFORE_FORWARD:
            return "a write runs before the forward"
        order = table.positions
        if point not in joins or order[event] < order[joins[point]]:
            joins[point] = event
    if invoke is None:
        return "no invoke is written per point"
    if len(joins) != points:
        return "some points write nothing"
    by_event: dict[Event, list[int]] = defaultdict(list)
    for point, event in sorted(joins.items()):
        by_event[event].append(point)
    rows = batch.rows[invoke]
    return SharedPrefix(invoke, points, (rows.stop - rows.start) // points,
                        {e: tuple(p) for e, p in by_event.items()}, layers)


def decoder_stack(table: SiteTable) -> tuple[str, ...]:
    """The longest run of sibling modules `<list>.0`, `<list>.1`, ... each called once, each taking
    as its first argument the very tensor the one before returned, with nothing run in between."""
    best: tuple[str, ...] = ()
    for path, phase, call in table.order:
        if phase != "pre" or call != 0 or not path.endswith(".0"):
            continue
        parent = path[:-2]
        layers = [path]
        while True:
            nxt = f"{parent}.{len(layers)}"
            post, pre = (layers[-1], "post", 0), (nxt, "pre", 0)
            at = table.positions.get(post)
            if at is None or at + 1 >= len(table.order) or table.order[at + 1] != pre \
                    or table.calls.get(f"{nxt}/pre") != 1:
                break
            args = table.values[pre][0]
            if not args or args[0] is not table.values[post]:
                break
            layers.append(nxt)
        if len(layers) > len(best) and all(_batch_first(table.values[(p, "post", 0)], table.batch_size) for p in layers) \
                and all(table.calls.get(f"{p}/pre") == 1 for p in layers):
            best = tuple(layers)
    return best if len(best) > 1 else ()


def run(model: torch.nn.Module, typed: TypedProgram, table: SiteTable, batch: Batch, params: dict[str, Any],
        schedule: SharedPrefix) -> RunResult:
    """Run `typed` on `batch` with `schedule`'s growing batch. Raises NotShared (before any save
    is kept) when a value does not have the rows the site table promised."""
    return _SharedRun(model, typed, table, batch, params, schedule).execute()


# ------------------------------------------------------------------------------------ planning
def _site(live: Any, kind: str) -> Any:
    if kind == "input":
        args, kwargs = live
        return args[0] if args else next(iter(kwargs.values()), None)
    return live


def _batch_first(value: Any, batch: int) -> bool:
    return isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == batch


def _point_of(write: Op, defs: dict[int, Op], axis: str) -> int | None:
    """The point whose rows `write` changes, when its value is `where(mask of one point, new,
    current)` with `current` the written place's own value (interp_dsl.fan.FanState.write)."""
    where = _def(write.args[0], defs)
    if where is None or where.target != "torch.where" or len(where.args) != 3:
        return None
    mask, _, current = (_def(a, defs) for a in where.args)
    if mask is not None and mask.target == "getitem":
        mask = _def(mask.args[0], defs)
    if mask is None or mask.target != "torch.eq" or not isinstance(mask.args[1], Const):
        return None
    param = _def(mask.args[0], defs)
    if param is None or param.opcode != "param" or param.target != FAN_PREFIX + axis:
        return None
    if write.path:  # `current` is the read indexed by the write's path
        same = current is not None and current.target == "getitem" and len(write.path) == 1 \
            and current.args[1] == write.path[0]
        current = _def(current.args[0], defs) if same else None
    if current is None or current.opcode != "read" or current.site != write.site or current.path:
        return None
    value = mask.args[1].value
    return value if isinstance(value, int) else None


def _def(arg: Any, defs: dict[int, Op]) -> Op | None:
    return defs.get(arg.id) if isinstance(arg, Ref) else None


def _join_event(module: str, kind: str, call: int, layers: tuple[str, ...]) -> Event | None:
    """Where rows written at `module`.`kind` must have joined: after the layer's output when that is
    the written site, else before the layer that contains it."""
    if call != 0:
        return None
    for layer in layers:
        if module == layer and kind == "output":
            return (layer, "post", 0)
        if module == layer or module.startswith(layer + "."):
            return (layer, "pre", 0)
    return None


# ------------------------------------------------------------------------------------- running
class _SharedRun(HookedRun):
    """A HookedRun whose physical batch grows at the schedule's events; the program's ops see
    logical rows (gathered before they run, scattered back after a write)."""

    def __init__(self, model: torch.nn.Module, typed: TypedProgram, table: SiteTable, batch: Batch,
                 params: dict[str, Any], schedule: SharedPrefix):
        super().__init__(model, typed, batch, params)
        self.table, self.schedule = table, schedule
        self.logical = batch.size
        rows = batch.rows[schedule.invoke]
        shared = torch.arange(rows.start, rows.start + schedule.rows)
        keep = torch.cat([torch.arange(0, rows.start), shared, torch.arange(rows.stop, batch.size)])
        self.inputs = self._physical_inputs(batch, keep, rows)
        # logical row -> physical row; physical row -> the starting physical row it copies
        where = torch.empty(batch.size, dtype=torch.long)
        where[keep] = torch.arange(len(keep))
        point_rows = torch.arange(rows.start, rows.stop).view(schedule.points, schedule.rows)
        where[point_rows] = where[shared].expand(schedule.points, -1)
        self.where = where
        self.start = len(keep)
        self.source = torch.arange(self.start)
        self.shared = where[shared]
        self.point_rows = point_rows
        self.waiting = schedule.points  # points whose rows have not joined yet

    def _physical_inputs(self, batch: Batch, keep: torch.Tensor, rows: slice) -> tuple[tuple[Any, ...], dict[str, Any]]:
        n, points = self.schedule.rows, self.schedule.points

        def compact(value: Any) -> Any:
            if not _batch_first(value, batch.size):
                return value
            copies = value[rows].reshape(points, n, *value.shape[1:])
            if not bool((copies == copies[:1]).all()):
                raise NotShared("the expanded invoke's inputs differ between points")
            return value[keep]
        leaves, spec = tree_flatten((batch.args, batch.kwargs))
        return tree_unflatten([compact(v) for v in leaves], spec)

    def _forward(self) -> Any:
        args, kwargs = self.inputs
        output = self.model(*args, **kwargs)
        return self._to_logical(output, None)

    # --------------------------------------------------------------------------- layout
    @property
    def physical(self) -> int:
        return len(self.source)

    def _grow(self, hidden: torch.Tensor, points: tuple[int, ...]) -> torch.Tensor:
        if hidden.shape[0] != self.physical:
            raise NotShared(f"a decoder layer's hidden state has {hidden.shape[0]} rows, not {self.physical}")
        for p in points:
            self.waiting -= 1
            if not self.waiting:  # the last point to join takes the shared rows themselves
                break
            new = torch.arange(self.physical, self.physical + self.schedule.rows)
            self.source = torch.cat([self.source, self.source[self.shared]])
            self.where[self.point_rows[p]] = new
            hidden = torch.cat([hidden, hidden[self.shared]])
        return hidden

    def _per_row(self, table_value: Any, live: Any, fn: Any, rows: int) -> Any:
        """`live` with `fn` applied to the tensors the site table has one row per batch row in
        (each must have `rows` rows here)."""
        recorded, _ = tree_flatten(table_value)
        leaves, spec = tree_flatten(live)
        if len(recorded) != len(leaves):
            raise NotShared("a value has another structure than when it was recorded")
        out = []
        for seen, value in zip(recorded, leaves, strict=True):
            if _batch_first(seen, self.logical):
                if not isinstance(value, torch.Tensor) or value.dim() == 0 or value.shape[0] != rows:
                    raise NotShared("a per-row value has another number of rows than the batch")
                value = fn(value)
            out.append(value)
        return tree_unflatten(out, spec)

    def _to_logical(self, live: Any, event: Event | None) -> Any:
        if event is None:  # the model's output: whatever has a row per physical row
            leaves, spec = tree_flatten(live)
            return tree_unflatten([v[self.where] if _batch_first(v, self.physical) else v for v in leaves], spec)
        return self._per_row(self.table.values[event], live, lambda t: t[self.where], self.physical)

    def _to_physical(self, new: Any, old: Any, event: Event) -> Any:
        owner = torch.full((self.physical,), -1, dtype=torch.long)
        owner[self.where] = torch.arange(self.logical)  # a physical row takes one of its logical rows' values
        taken = owner >= 0
        recorded, _ = tree_flatten(self.table.values[event])
        leaves, spec = tree_flatten(new)
        before, _ = tree_flatten(old)
        out = []
        for seen, value, was in zip(recorded, leaves, before, strict=True):
            if _batch_first(seen, self.logical) and isinstance(value, torch.Tensor):
                merged = was.clone()
                merged[taken] = value[owner[taken]].to(was.dtype)
                value = merged
            out.append(value)
        return tree_unflatten(out, spec)

    # ---------------------------------------------------------------------------- hooks
    def _install_hooks(self) -> list[Any]:
        handles = []
        first = min(self.schedule.layers.index(path) for path, _, _ in self.schedule.joins)
        for path in self.schedule.layers[first:]:
            module = self.model.get_submodule(path)
            handles.append(module.register_forward_pre_hook(
                lambda m, a, k, p=path: self._layer_inputs(p, a, k), with_kwargs=True))
            if (path, "post", 0) in self.schedule.joins:
                handles.append(module.register_forward_hook(
                    lambda m, a, o, p=path: self._grow(o, self.schedule.joins[(p, "post", 0)])))
        return handles + super()._install_hooks()

    def _layer_inputs(self, path: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """Grow the hidden state for points joining before this layer; index the layer's other
        per-row inputs (computed once on the starting rows) by the physical rows."""
        hidden, rest = args[0], args[1:]
        joining = self.schedule.joins.get((path, "pre", 0))
        if joining:
            hidden = self._grow(hidden, joining)
        if self.physical == self.start:
            return (hidden, *rest), kwargs
        recorded_args, recorded_kwargs = self.table.values[(path, "pre", 0)]
        rest, kwargs = self._per_row((recorded_args[1:], recorded_kwargs), (rest, kwargs),
                                     lambda t: t[self.source], self.start)
        return (hidden, *rest), kwargs

    def _on_pre(self, path: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        return self._at(path, "pre", (tuple(args), dict(kwargs)))

    def _on_post(self, path: str, output: Any) -> Any:
        return self._at(path, "post", output)

    def _at(self, path: str, phase: str, live: Any) -> Any:
        index = self._event(path, phase)
        if index is None:
            return None
        event = self.typed.events[index]
        logical = self._to_logical(live, event)
        new = self._run_ops(self.by_event.get(index, []), logical)
        self._maybe_stop()
        return None if new is logical else self._to_physical(new, live, event)
