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

import contextlib
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils._pytree import tree_flatten, tree_unflatten

from compiler.check import BEFORE_FORWARD, TypedProgram
from compiler.ir import Const, Op, Ref, SliceArg, TupleArg
from compiler.signatures import Event, SiteTable
from compiler.splice import RowViews
from runtime.interpreter import Batch, HookedRun, RunResult

FAN_PREFIX = "__fan_"  # interp_dsl.fan.FAN_PARAM without its name
_ALL = SliceArg(Const(None), Const(None), Const(None))  # `:`


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
    for op in program.ops:
        if op.opcode == "module" and any(layer == op.target or layer.startswith(op.target + ".") or not op.target
                                         for layer in layers):
            return f"it calls {op.target or 'the model'} itself, which runs decoder layers"
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
            return f"it uses {site.module}.{site.kind}, which is not a tensor with one row per batch row"
        if op.opcode == "read" or site.invoke != expanded:
            continue
        point = _point_of(op, defs, axis, typed)
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


def _point_of(write: Op, defs: dict[int, Op], axis: str, typed: TypedProgram) -> int | None:
    """The point whose rows `write` changes, when its value is `where(mask of one point, new,
    current)` with `current` the written place's own value (interp_dsl.fan.FanState.write) and the
    mask's rows along `current`'s first dimension."""
    where = _def(write.args[0], defs)
    if where is None or where.target != "torch.where" or len(where.args) != 3:
        return None
    mask, _, current = (_def(a, defs) for a in where.args)
    rank = len(getattr(typed.types.get(where.args[2].id), "shape", ())) if current is not None else 0
    if mask is not None and mask.target == "getitem":  # new trailing dimensions only: rows stay rows
        index = mask.args[1]
        if not isinstance(index, TupleArg) or index.items[0] != _ALL or len(index.items) != rank \
                or any(i != Const(None) for i in index.items[1:]):
            return None
        mask = _def(mask.args[0], defs)
    elif rank != 1:
        return None
    if mask is None or mask.target != "torch.eq" or not isinstance(mask.args[1], Const):
        return None
    param = _def(mask.args[0], defs)
    if param is None or param.opcode != "param" or param.target != FAN_PREFIX + axis:
        return None
    if write.path:  # `current` is the read indexed by the write's path, which keeps every row
        index = write.path[0]
        first = index.items[0] if isinstance(index, TupleArg) and index.items else index
        same = current is not None and current.target == "getitem" and len(write.path) == 1 \
            and current.args[1] == index and first == _ALL
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


# -------------------------------------------------------------------------------------- layout
@dataclass
class Layout:
    """The schedule laid out on one batch: which logical rows start the physical batch, where the
    batch grows, and after every event where each logical row lives. Hooks that run the growth
    (`grow_inputs`, `grow_output`) read only tensors and plain data here, so dynamo traces them."""

    keep: torch.Tensor  # the logical rows the physical batch starts with
    grow: dict[Event, torch.Tensor]  # growth event -> the physical rows copied to the end there
    snapshots: list[tuple[int, torch.Tensor, torch.Tensor]]  # (event position, where, source), by position
    logical: int  # rows of the logical batch
    positions: dict[Event, int]
    side_rows: dict[str, list[bool]]  # stack layer -> per leaf of (args[1:], kwargs): one row per batch row
    layers: tuple[str, ...]  # the stack layers whose inputs follow the growing batch

    def at(self, event: Event) -> tuple[torch.Tensor, torch.Tensor]:
        """After `event` (and its growth): logical row -> physical row, and per physical row the
        starting row it copies."""
        return self._upto(self.positions[event])

    def owner(self, event: Event) -> tuple[torch.Tensor, torch.Tensor]:
        """The physical rows after `event` that some logical row lives in, and one such logical row
        each (where a write's new values come from)."""
        where, source = self.at(event)
        owner = torch.full((len(source),), -1, dtype=torch.long, device=where.device)
        owner[where] = torch.arange(self.logical, device=where.device)
        taken = (owner >= 0).nonzero().flatten()
        return taken, owner[taken]

    @property
    def start(self) -> int:
        return len(self.keep)

    @property
    def final(self) -> torch.Tensor:
        """Logical row -> physical row at the end of the forward."""
        return self.snapshots[-1][1]

    def rows_before(self, event: Event) -> int:
        """Physical rows just before `event` (and its growth)."""
        return len(self._upto(self.positions[event] - 1)[1])

    def _upto(self, position: int) -> tuple[torch.Tensor, torch.Tensor]:
        found = self.snapshots[0]
        for snapshot in self.snapshots:
            if snapshot[0] <= position:
                found = snapshot
        return found[1], found[2]


def layout(schedule: SharedPrefix, batch: Batch, table: SiteTable) -> Layout:
    """`schedule` on `batch` (the logical batch it was planned on, `table` its sites)."""
    rows, n = batch.rows[schedule.invoke], schedule.rows
    shared_logical = torch.arange(rows.start, rows.start + n)
    keep = torch.cat([torch.arange(0, rows.start), shared_logical, torch.arange(rows.stop, batch.size)])
    where = torch.empty(batch.size, dtype=torch.long)
    where[keep] = torch.arange(len(keep))
    point_rows = torch.arange(rows.start, rows.stop).view(schedule.points, n)
    shared = where[shared_logical].clone()
    where[point_rows] = shared.expand(schedule.points, -1)
    source = torch.arange(len(keep))
    snapshots = [(-1, where.clone(), source.clone())]
    grow: dict[Event, torch.Tensor] = {}
    waiting = schedule.points
    for event in sorted(schedule.joins, key=table.positions.__getitem__):
        copied = []
        for p in schedule.joins[event]:
            waiting -= 1
            if not waiting:  # the last point to join takes the shared rows themselves
                break
            where[point_rows[p]] = torch.arange(len(source), len(source) + n)
            source = torch.cat([source, source[shared]])
            copied.append(shared)
        if copied:
            grow[event] = torch.cat(copied)
            snapshots.append((table.positions[event], where.clone(), source.clone()))
    first = min((schedule.layers.index(path) for path, _, _ in grow), default=len(schedule.layers))
    stack = schedule.layers[first:]
    side = {path: per_row((table.values[(path, "pre", 0)][0][1:], table.values[(path, "pre", 0)][1]), batch.size)
            for path in stack}
    device = next((v.device for v in tree_flatten((batch.args, batch.kwargs))[0] if isinstance(v, torch.Tensor)),
                  torch.device("cpu"))  # index tensors live with the inputs (a model on a GPU)
    return Layout(keep.to(device), {e: t.to(device) for e, t in grow.items()},
                  [(p, w.to(device), s.to(device)) for p, w, s in snapshots], batch.size, dict(table.positions), side, stack)


def physical_inputs(batch: Batch, schedule: SharedPrefix, plan: Layout) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The forward's arguments for the physical batch: the expanded invoke's prompts once. Raises
    NotShared when the invoke's copies are not all the same prompts."""
    rows, n, points = batch.rows[schedule.invoke], schedule.rows, schedule.points

    def compact(value: Any) -> Any:
        if not _batch_first(value, batch.size):
            return value
        copies = value[rows].reshape(points, n, *value.shape[1:])
        if not bool((copies == copies[:1]).all()):
            raise NotShared("the expanded invoke's inputs differ between points")
        return value[plan.keep]
    leaves, spec = tree_flatten((batch.args, batch.kwargs))
    return tree_unflatten([compact(v) for v in leaves], spec)


def per_row(recorded: Any, logical: int) -> list[bool]:
    """Per leaf of a site value recorded on the logical batch: whether it has a row per batch row."""
    return [_batch_first(v, logical) for v in tree_flatten(recorded)[0]]


def row_views(typed: TypedProgram, plan: Layout) -> tuple[RowViews, list[torch.Tensor]]:
    """For the splice pass: at every event the program acts on, where the logical rows live (and
    for writes, which physical rows take which logical row's values), as extra graph inputs."""
    events: dict[Event, tuple[str, str, str]] = {}
    values: list[torch.Tensor] = []
    for at in sorted({a for a in typed.schedule if a >= 0}):
        event = typed.events[at]
        names = tuple(f"e{at}_{part}" for part in ("where", "taken", "owner"))
        events[event] = names  # type: ignore[assignment]
        values += [plan.at(event)[0], *plan.owner(event)]
    return RowViews(plan.logical, events), values


def logical_output(output: Any, plan: Layout) -> Any:
    """The model's output with the logical batch's rows."""
    rows = len(plan.snapshots[-1][2])
    leaves, spec = tree_flatten(output)
    return tree_unflatten([v[plan.final] if _batch_first(v, rows) else v for v in leaves], spec)


# ------------------------------------------------------------------------------ growth hooks
def grow_inputs(plan: Layout, path: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """A stack layer's inputs on the growing batch: the hidden state grown for the points joining
    before this layer, the other per-row inputs (computed once on the starting rows) indexed by
    the starting row each physical row copies. None when nothing changes."""
    event = (path, "pre", 0)
    hidden, rest = args[0], args[1:]
    if event in plan.grow:
        hidden = _grown(plan, event, hidden)
    source = plan.at(event)[1]
    if len(source) == plan.start:
        return None if hidden is args[0] else ((hidden, *rest), kwargs)
    leaves, spec = tree_flatten((rest, kwargs))
    flags = plan.side_rows[path]
    if len(flags) != len(leaves):
        raise NotShared(f"{path}'s inputs have another structure than when they were recorded")
    out = []
    for flag, value in zip(flags, leaves, strict=True):
        if flag and value is not None:  # a mask recorded on fake tensors may be None when nothing is padded
            if not isinstance(value, torch.Tensor) or value.dim() == 0 or value.shape[0] != plan.start:
                raise NotShared(f"an input of {path} does not have a row per batch row")
            value = value[source]
        out.append(value)
    rest, kwargs = tree_unflatten(out, spec)
    return (hidden, *rest), kwargs


def grow_output(plan: Layout, path: str, output: Any) -> Any:
    """A stack layer's output grown for the points joining after it (None when none join)."""
    event = (path, "post", 0)
    return _grown(plan, event, output) if event in plan.grow else None


def _grown(plan: Layout, event: Event, hidden: Any) -> torch.Tensor:
    if not isinstance(hidden, torch.Tensor) or hidden.dim() == 0 or hidden.shape[0] != plan.rows_before(event):
        raise NotShared("a decoder layer's hidden state does not have the batch's rows")
    return torch.cat([hidden, hidden[plan.grow[event]]])


class Regrowth:
    """Growth hooks on a model's decoder stack for compiled runs: installed once per layer (dynamo
    guards on hook dictionaries) and first in line (the site markers see the grown batch); they
    act only while a layout is active."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.active: Layout | None = None
        self.installed: set[str] = set()
        self.handles: list[Any] = []

    def install(self, layers: tuple[str, ...]) -> None:
        for path in layers:
            if path in self.installed:
                continue
            module = self.model.get_submodule(path)
            self.handles += [
                module.register_forward_pre_hook(lambda m, a, k, p=path: self._pre(p, a, k), with_kwargs=True, prepend=True),
                module.register_forward_hook(lambda m, a, o, p=path: self._post(p, o), prepend=True)]
            self.installed.add(path)

    def hook_ids(self) -> set[int]:
        """The ids of the growth hooks in the modules' hook dictionaries."""
        return {handle.id for handle in self.handles}

    def remove(self) -> None:
        """Take the growth hooks off the model."""
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        self.installed.clear()

    @contextlib.contextmanager
    def activated(self, plan: Layout) -> Iterator[None]:
        self.active = plan
        try:
            yield
        finally:
            self.active = None

    def _pre(self, path: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        plan = self.active
        if plan is None or path not in plan.side_rows:
            return None
        return grow_inputs(plan, path, args, kwargs)

    def _post(self, path: str, output: Any) -> Any:
        plan = self.active
        if plan is None:
            return None
        return grow_output(plan, path, output)


# ------------------------------------------------------------------------------------- running
class _SharedRun(HookedRun):
    """A HookedRun on the growing batch; the program's ops see logical rows (gathered before
    they run, scattered back after a write)."""

    def __init__(self, model: torch.nn.Module, typed: TypedProgram, table: SiteTable, batch: Batch,
                 params: dict[str, Any], schedule: SharedPrefix):
        super().__init__(model, typed, batch, params)
        self.table = table
        self.layout = layout(schedule, batch, table)
        self.inputs = physical_inputs(batch, schedule, self.layout)

    def _forward(self) -> Any:
        args, kwargs = self.inputs
        return logical_output(self.model(*args, **kwargs), self.layout)

    def _install_hooks(self) -> list[Any]:
        plan, handles = self.layout, []
        for path in plan.layers:
            module = self.model.get_submodule(path)
            handles.append(module.register_forward_pre_hook(
                lambda m, a, k, p=path: None if self.adhoc_depth else grow_inputs(plan, p, a, k), with_kwargs=True))
            handles.append(module.register_forward_hook(
                lambda m, a, o, p=path: None if self.adhoc_depth else grow_output(plan, p, o)))
        return handles + super()._install_hooks()

    def _on_pre(self, path: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        return self._at(path, "pre", (tuple(args), dict(kwargs)))

    def _on_post(self, path: str, output: Any) -> Any:
        return self._at(path, "post", output)

    def _at(self, path: str, phase: str, live: Any) -> Any:
        index = self._event(path, phase)
        if index is None:
            return None
        event = self.typed.events[index]
        flags = per_row(self.table.values[event], self.layout.logical)
        where, source = self.layout.at(event)
        leaves, spec = tree_flatten(live)
        if len(flags) != len(leaves):
            raise NotShared(f"{path} ({phase}) has another structure than when it was recorded")
        flags = [f and v is not None for f, v in zip(flags, leaves, strict=True)]
        if any(f and not _batch_first(v, len(source)) for f, v in zip(flags, leaves, strict=True)):
            raise NotShared(f"{path} ({phase}) does not have a row per batch row")
        logical = tree_unflatten([v[where] if f else v for f, v in zip(flags, leaves, strict=True)], spec)
        new = self._run_ops(self.by_event.get(index, []), logical)
        self._maybe_stop()
        if new is logical:
            return None
        taken, owner = self.layout.owner(event)
        out = [was.index_copy(0, taken, value[owner].to(was.dtype)) if flag else value
               for flag, value, was in zip(flags, tree_flatten(new)[0], leaves, strict=True)]
        return tree_unflatten(out, spec)
