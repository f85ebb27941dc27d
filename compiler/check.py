"""Type-check and schedule a program against a model's recorded sites, on fake tensors.

`check(...)` returns a `TypedProgram` (every value's type, every op's place in the forward) or
raises one `CheckError` listing every problem found, each at the user's line.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch._subclasses.fake_tensor import FakeTensor

from compiler import ops, shape_rules
from compiler.errors import CheckError, Diagnostic, did_you_mean
from compiler.ir import (
    DictType,
    Op,
    OpaqueType,
    Program,
    ScalarType,
    Site,
    TensorType,
    TupleType,
    Type,
    refs_of,
)
from compiler.printer import format_type
from compiler.shape_rules import is_tensor_like, materialize
from compiler.signatures import Event, SiteTable, call_count, quiet_fake_mode
from compiler.validate import problems

BEFORE_FORWARD = -1
GRADIENT = -2  # the schedule of backwards, gradients and what is computed from them (see HookedRun)
MAX_PASSES = 32  # backward passes one program may take (each costs a backward of the whole model)


@dataclass(frozen=True)
class TypedProgram:
    """A program that passed the check: value types and, per op, the event it runs at."""

    program: Program
    types: dict[int, Type]
    schedule: tuple[int, ...]  # per op: index into `events`, BEFORE_FORWARD or GRADIENT
    events: tuple[Event, ...]
    fakes: dict[int, Any] = field(default_factory=dict, compare=False, repr=False)


def type_of(value: Any) -> Type:
    """The IR type of a (fake, abstract or real) value."""
    if isinstance(value, (torch.Tensor, shape_rules.Abstract)):
        return TensorType(str(value.dtype).removeprefix("torch."), tuple(int(d) for d in value.shape))
    if isinstance(value, bool):
        return ScalarType("bool")
    if isinstance(value, int):
        return ScalarType("int")
    if isinstance(value, float):
        return ScalarType("float")
    if isinstance(value, str):
        return ScalarType("str")
    if value is None:
        return ScalarType("none")
    if isinstance(value, (tuple, list)) and not hasattr(value, "_fields"):
        return TupleType(tuple(type_of(v) for v in value))
    if type(value) is dict and all(isinstance(k, str) for k in value):
        return DictType(tuple(value), tuple(type_of(v) for v in value.values()))
    return OpaqueType(type(value).__name__)


def describe_site(site: Site, root: str = "model", calls_per_step: dict[str, int] | None = None) -> str:
    """`model.layers.3` output -> `model.model.layers[3].output`, as the user wrote it. In a
    generation (`calls_per_step` given), call indices are shown as steps."""
    text = root
    for part in site.module.split(".") if site.module else ():
        text += f"[{part}]" if part.isdigit() else f".{part}"
    per_step = (calls_per_step or {}).get(f"{site.module}/{site.phase}", 0)
    if per_step:
        step, call = divmod(site.call, per_step)
        where = ", ".join(x for x in (f"step {step}" if step else "", f"call {call}" if call else "") if x)
        return f"{text}.{site.kind}" + (f" ({where})" if where else "")
    call = f" (call {site.call})" if site.call else ""
    return f"{text}.{site.kind}{call}"


def _event(site: Site) -> Event:
    return (site.module, site.phase, site.call)


class _Checker:
    def __init__(self, program: Program, table: SiteTable, model: torch.nn.Module,
                 params: dict[str, Any], rows: list[slice], root: str):
        self.program, self.table, self.model = program, table, model
        self.params, self.rows, self.root = params, rows, root
        self.fake: dict[int, Any] = {}
        self.real_params: dict[int, Any] = {}
        # Integer tensors from the user, by their range: computed here, outside fake mode, since
        # fake tensors never look at values (out-of-range tensor indices would pass unnoticed).
        self.known = {name: KnownRange(int(v.min()), int(v.max())) for name, v in params.items()
                      if isinstance(v, torch.Tensor) and v.numel() and not v.is_floating_point()
                      and v.dtype != torch.bool and not isinstance(v, FakeTensor)}  # a fake has no values
        self.diags: list[Diagnostic] = []
        self.when: list[int] = []
        self.gradient_sites: list[int] = []  # forward events whose gradients the program takes
        self.failed: set[int] = set()

    def error(self, op: Op, message: str, hint: str = "") -> None:
        found = Diagnostic(op.span, message, hint)
        if found not in self.diags:  # a generation's step block repeats its ops once per step
            self.diags.append(found)

    # --------------------------------------------------------------------------- scheduling
    def site_event(self, op: Op) -> int | None:
        site = op.site
        assert site is not None
        index = self.table.index(_event(site))
        if index is None:
            calls = call_count(self.table, site.module, site.phase)
            where = self.describe(site)
            if calls == 0:
                self.error(op, f"{where} never happens: the module is not called in this forward",
                           "read a module that runs for this input (print the model to see them)")
            elif self.table.calls_per_step:
                steps = calls // max(1, self.table.calls_per_step.get(f"{site.module}/{site.phase}", 1))
                self.error(op, f"{where} does not exist: this generation has {steps} step(s)",
                           f"steps run from 0 to {steps - 1}; `.next()` moves one step on")
            else:
                self.error(op, f"{where} does not exist: the module is called {calls} time(s)",
                           f"call indices run from 0 to {calls - 1}")
        return index

    def schedule(self) -> None:
        when_of: dict[int, int] = {}
        grads_of: dict[int, frozenset[tuple[int, int]]] = {}  # value -> (pass, event) of gradients used
        passes = sum(op.opcode == "backward" for op in self.program.ops)
        passes_seen = 0
        for op in self.program.ops:
            deps = [when_of.get(r, BEFORE_FORWARD) for r in op.refs()]
            grads = frozenset().union(*(grads_of.get(r, frozenset()) for r in op.refs()))
            latest = max(deps, default=BEFORE_FORWARD)
            if op.opcode == "backward":
                passes_seen += 1
                if passes_seen == MAX_PASSES + 1:
                    self.error(op, f"more than {MAX_PASSES} backward passes in one program",
                               "differentiate a sum of the metrics, or split the work over traces")
            if op.opcode in ("backward", "grad", "setgrad"):
                at = GRADIENT
                self._schedule_gradient(op, passes, grads, grads_of, when_of)
            elif GRADIENT in deps:
                at = GRADIENT
                if op.opcode == "write":
                    self.error(op, f"cannot write {self.describe(op.site)}: the value written is computed "  # type: ignore[arg-type]
                                   "from a gradient, which exists only once the forward has ended",
                               "to change a gradient on its way back, assign to the site's `.grad`")
                elif op.opcode == "stop":
                    self.error(op, "stop() at a gradient: the forward has ended before any gradient exists")
            elif op.opcode in ("read", "write"):
                at = self.site_event(op)
                at = BEFORE_FORWARD if at is None else at
                if op.opcode == "write" and latest > at:
                    later = self.table.order[latest]
                    self.error(
                        op,
                        f"cannot write {self.describe(op.site)}: the value written is "  # type: ignore[arg-type]
                        f"computed from {self._event_text(later)}, which runs later in the forward",
                        "values flow forward only; read from an earlier module, or save the value "
                        "in one trace and write it in a second",
                    )
            elif op.opcode == "stop" and not op.args:  # after every site, gradients' sites too
                at = max(self.when + self.gradient_sites, default=BEFORE_FORWARD)
            else:
                at = latest
            self.when.append(at)
            if op.result is not None:
                when_of[op.result] = at
                grads_of.setdefault(op.result, grads)  # a gradient read has set its own

    def _schedule_gradient(self, op: Op, passes: int, grads: frozenset[tuple[int, int]],
                           grads_of: dict[int, frozenset[tuple[int, int]]], when_of: dict[int, int]) -> None:
        """Check where a backward, a gradient read or a gradient write can run: gradients flow
        from the metric back to the inputs, so a gradient write may use only gradients that reach
        it first (of its own site, or of sites later in the forward) in its own pass."""
        if op.opcode == "backward":
            if self.program.generation is not None:
                self.error(op, "backward() in a generation: gradients are taken in a single forward",
                           "use model.trace(...) for gradients")
            if grads:
                self.error(op, "backward() of a value computed from a gradient: the metric must come "
                               "from the forward", "differentiate a value of the forward (e.g. a logit)")
            return
        event = self.site_event(op)
        if event is not None:
            self.gradient_sites.append(event)
        where = self.describe(op.site)  # type: ignore[arg-type]
        path_refs = [r for a in op.path for r in refs_of(a)]
        if any(when_of.get(r, BEFORE_FORWARD) == GRADIENT for r in path_refs):
            self.error(op, f"the index into the gradient of {where} is computed from a gradient",
                       "index with numbers or values of the forward")
        later = max((when_of.get(r, BEFORE_FORWARD) for r in path_refs), default=BEFORE_FORWARD)
        if event is not None and later > event:
            self.error(op, f"the index into the gradient of {where} is computed from "
                           f"{self._event_text(self.table.order[later])}, which runs later in the forward",
                       "index with values computed before the site runs")
        if op.backward_pass >= passes:
            self.error(op, f"the gradient of {where} is used, but no backward() follows to compute it",
                       "call .backward() on a scalar of the forward, e.g. "
                       "`with model.output.logits[0, -1].max().backward():`")
            return
        if op.opcode == "grad":
            grads_of[op.result] = frozenset({(op.backward_pass, -1 if event is None else event)})  # type: ignore[index]
            return
        for other_pass, other_event in sorted(grads):
            if other_pass != op.backward_pass:
                self.error(op, f"the gradient written at {where} is computed from a gradient of "
                               "another backward pass", "use gradients of the same backward()")
            elif event is not None and other_event < event:
                self.error(op, f"the gradient written at {where} is computed from the gradient of "
                               f"{self._event_text(self.table.order[other_event])}, which the backward "
                               "reaches later", "gradients flow backward: use the gradient of this site "
                               "or of a later one")

    def _event_text(self, event: Event) -> str:
        path, phase, call = event
        return self.describe(Site(path, "output" if phase == "post" else "input", call))

    def describe(self, site: Site) -> str:
        return describe_site(site, self.root, self.table.calls_per_step)

    # ------------------------------------------------------------------------------ typing
    def run(self, start: int = 0) -> None:
        """Type every op from `start` on (earlier ones were typed by a previous call)."""
        failed = self.failed
        with quiet_fake_mode(), self.table.mode, torch.no_grad():
            for op in self.program.ops[start:]:
                if any(r in failed for r in op.refs()):
                    if op.result is not None:
                        failed.add(op.result)
                    continue
                try:
                    ok = getattr(self, f"_{op.opcode}")(op)
                except Exception as e:  # a torch error on fake values: the user's op is wrong
                    self.error(op, self._failure_text(op, e))
                    ok = False
                if not ok and op.result is not None:
                    failed.add(op.result)

    def _failure_text(self, op: Op, e: Exception) -> str:
        shown = ", ".join(format_type(type_of(self.fake[r])) for r in op.refs() if r in self.fake)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        what = op.target or op.opcode
        return f"{what} fails on ({shown}): {first}" if shown else f"{what} fails: {first}"

    def _values(self, op: Op, source: dict[int, Any]) -> tuple[list[Any], dict[str, Any]]:
        args = [ops.materialize(a, source) for a in op.args]
        kwargs = {k: ops.materialize(v, source) for k, v in op.kwargs}
        return args, kwargs

    def _site_live(self, op: Op) -> Any:
        event = _event(op.site)  # type: ignore[arg-type]
        if event not in self.table.values:
            return None
        return self.table.values[event]

    def _rows(self, site: Site) -> slice:
        """An invoke's rows (a generation's ids too)."""
        return self.rows[site.invoke]

    def _read(self, op: Op) -> bool:
        live = self._site_live(op)
        if live is None:
            return False
        site = op.site
        value = ops.site_value(live, site.kind)  # type: ignore[union-attr]
        self.fake[op.result] = ops.slice_rows(value, self._rows(site), self.table.batch_size)  # type: ignore
        return True

    def _param(self, op: Op) -> bool:
        value = self.params[op.target]
        found = type_of(value)
        if found != op.type:
            self.error(op, f"parameter {op.target!r} is declared {format_type(op.type)} "
                           f"but bound to {format_type(found)}")
            return False
        self.real_params[op.result] = self.known.get(op.target, value)  # type: ignore[index]
        self.fake[op.result] = (  # type: ignore[index]
            self.table.mode.from_tensor(value) if isinstance(value, torch.Tensor) else value)
        return True

    def _weight(self, op: Op) -> bool:
        module_path, _, name = op.target.rpartition(".")
        module = submodule(self.model, module_path)
        if name not in module._parameters and name not in module._buffers:
            self.error(op, f"{op.target!r} is not a parameter or buffer of the model",
                       did_you_mean(name, [*module._parameters, *module._buffers]))
            return False
        self.fake[op.result] = self.table.mode.from_tensor(getattr(module, name))  # type: ignore
        return True

    def _call(self, op: Op) -> bool:
        args, kwargs = self._values(op, self.fake)
        if op.target in _ELEMENTWISE and len(args) == 2 and all(is_tensor_like(a) for a in args):
            problem = _broadcast_problem(args[0].shape, args[1].shape)
            if problem:
                a, b = (format_type(type_of(x)) for x in args)
                self.error(op, f"shapes do not broadcast in `{_ELEMENTWISE[op.target]}`: {a} and {b} ({problem})",
                           "index or reshape one side so trailing dimensions match or are 1")
                return False
        if op.target in ("getitem", "setitem") and is_tensor_like(args[0]):
            index = ops.materialize(op.args[1], {**self.fake, **self.real_params})
            problem = index_problem(tuple(args[0].shape), index)
            if problem:
                self.error(op, f"index out of range: {problem}",
                           "indices run from -size to size-1; slices must stay within the dim")
                return False
        if op.target == "getitem" and isinstance(args[0], (tuple, list)) and isinstance(args[1], int):
            if not -len(args[0]) <= args[1] < len(args[0]):
                self.error(op, f"index {args[1]} is out of range for a tuple of {len(args[0])} "
                               f"({format_type(type_of(args[0]))})")
                return False
        if op.target in ("torch.index_select", "Tensor.index_select") and is_tensor_like(args[0]):
            problem = self._index_select_problem(op, args, kwargs)
            if problem:
                self.error(op, f"index out of range in index_select: {problem}",
                           "indices run from 0 to size-1 along the selected dim")
                return False
        inferred = shape_rules.infer(op.target, args, kwargs)
        if inferred is not None:
            self.fake[op.result] = inferred  # type: ignore[index]
            return True
        self.fake[op.result] = ops.call(op.target, materialize(args), materialize(kwargs))  # type: ignore[index]
        return True

    def _index_select_problem(self, op: Op, args: list[Any], kwargs: dict[str, Any]) -> str | None:
        """Fake tensors do not look at index values; a parameter's values are known, so check them."""
        known = [ops.materialize(a, {**self.fake, **self.real_params}) for a in op.args]
        dim = known[1] if len(known) > 1 else kwargs.get("dim")
        index = known[2] if len(known) > 2 else None
        if index is None:
            index = dict((k, ops.materialize(v, self.real_params | self.fake)) for k, v in op.kwargs).get("index")
        if type(dim) is not int or not isinstance(index, KnownRange) or not -args[0].ndim <= dim < args[0].ndim:
            return None
        size = args[0].shape[dim]
        if 0 <= index.low and index.high < size:
            return None
        return f"indices {index.low}..{index.high} on dim {dim} of size {size}"

    def _module(self, op: Op) -> bool:
        args, kwargs = self._values(op, self.fake)
        module = submodule(self.model, op.target)
        self.fake[op.result] = module(*materialize(args), **materialize(kwargs))  # type: ignore
        return True

    def _save(self, op: Op) -> bool:
        return True

    def _stop(self, op: Op) -> bool:
        return True

    def _write(self, op: Op) -> bool:
        found = self._path_target(op)
        if found is None:
            return False
        where, target = found
        value = ops.materialize(op.args[0], self.fake)
        return self._compatible(op, where, target, value, partial=bool(op.path))

    def _grad(self, op: Op) -> bool:
        found = self._gradient_target(op)
        if found is not None:
            self.fake[op.result] = materialize(found[1]).clone()  # type: ignore[index]
        return found is not None

    def _setgrad(self, op: Op) -> bool:
        found = self._gradient_target(op)
        if found is None:
            return False
        value = ops.materialize(op.args[1], self.fake)
        return self._compatible(op, f"the gradient of {found[0]}", found[1], value, partial=bool(op.path))

    def _gradient_target(self, op: Op) -> tuple[str, Any] | None:
        found = self._path_target(op)
        if found is not None and not (is_tensor_like(found[1]) and found[1].dtype.is_floating_point):
            self.error(op, f"{found[0]} is a {format_type(type_of(found[1]))}: only floating-point "
                           "tensors have gradients", "take the gradient of a tensor of the module's value")
            return None
        return found

    def _backward(self, op: Op) -> bool:
        metric = ops.materialize(op.args[0], self.fake)
        if not (is_tensor_like(metric) and metric.dtype.is_floating_point and metric.numel() == 1):
            shown = format_type(type_of(metric))
            self.error(op, f"backward() differentiates a floating-point scalar, found {shown}",
                       "reduce it first, e.g. `.sum()`, or index one element: `logits[0, -1, token]`")
            return False
        return True

    def _path_target(self, op: Op) -> tuple[str, Any] | None:
        """The part of a site's value that a write, a gradient read or a gradient write names:
        the site's value for the op's invoke, indexed along `op.path` (None after an error)."""
        live = self._site_live(op)
        if live is None:
            return None
        site = op.site
        assert site is not None
        where = self.describe(site)
        target = ops.site_value(live, site.kind)
        target = ops.slice_rows(target, self._rows(site), self.table.batch_size)
        bounds_source = {**self.fake, **self.real_params}
        for step_arg in op.path:
            step = ops.materialize(step_arg, self.fake)
            if is_tensor_like(target):
                problem = index_problem(tuple(target.shape), ops.materialize(step_arg, bounds_source))
                if problem:
                    verb = {"write": "writing", "grad": "reading the gradient of"}.get(op.opcode, "writing the gradient of")
                    self.error(op, f"index out of range {verb} {where}: {problem}")
                    return None
                target = shape_rules.infer("getitem", [target, step], {}) or \
                    materialize(target)[materialize(step)]
            elif isinstance(target, (tuple, list)) and isinstance(step, int):
                if not -len(target) <= step < len(target):
                    self.error(op, f"{where} is a tuple of {len(target)} "
                                   f"({format_type(type_of(target))}); index {step} is out of range",
                               "in transformers 5.x decoder layers return a tensor, not a tuple")
                    return None
                target = target[step]
            elif isinstance(target, dict) and step in target:
                target = target[step]
            else:
                self.error(op, f"cannot index {format_type(type_of(target))} with {step!r} in {where}")
                return None
        return where, target

    def _compatible(self, op: Op, where: str, target: Any, value: Any, partial: bool) -> bool:
        if not is_tensor_like(target):
            if type_of(target) != type_of(value):
                self.error(op, f"write to {where} expects {format_type(type_of(target))}, "
                               f"found {format_type(type_of(value))}")
                return False
            return True
        if isinstance(value, (bool, int, float)):
            return True
        if not is_tensor_like(value):
            self.error(op, f"write to {where} expects a tensor {format_type(type_of(target))}, "
                           f"found {format_type(type_of(value))}")
            return False
        expected, found = format_type(type_of(target)), format_type(type_of(value))
        if value.dtype != target.dtype:
            self.error(op, f"dtype clash writing {where}: expected {expected}, found {found}",
                       f"convert it first: .to(torch.{str(target.dtype).removeprefix('torch.')})")
            return False
        if partial:
            try:
                fits = torch.broadcast_shapes(value.shape, target.shape) == target.shape
            except RuntimeError:
                fits = False
        else:
            fits = value.shape == target.shape
        if not fits:
            how = "broadcast to" if partial else "match"
            self.error(op, f"shape mismatch writing {where}: the value must {how} {expected}, "
                           f"found {found}",
                       "index the site to the part you mean to replace, e.g. [:, -1, :]")
            return False
        return True


_ELEMENTWISE = {name: symbol for name, symbol in ops.OPERATOR_SYMBOLS.items() if name != "matmul"}


def _broadcast_problem(a: torch.Size, b: torch.Size) -> str | None:
    for i in range(1, min(len(a), len(b)) + 1):
        x, y = a[-i], b[-i]
        if x != y and x != 1 and y != 1:
            return f"dim -{i}: {x} vs {y}"
    return None


def submodule(model: torch.nn.Module, path: str) -> torch.nn.Module:
    """The module at a dotted path, found through registered submodules only (never attributes)."""
    module = model
    for part in path.split(".") if path else ():
        child = module._modules.get(part)
        if child is None:
            raise AttributeError(f"{type(module).__name__} has no submodule {part!r}"
                                 + (f" ({did_you_mean(part, module._modules)})" if did_you_mean(part, module._modules) else ""))
        module = child
    return module


@dataclass(frozen=True)
class KnownRange:
    """An integer tensor from the user, known by the range of its values."""

    low: int
    high: int


def index_problem(shape: tuple[int, ...], index: Any) -> str | None:
    """Why `index` is out of range for `shape` (fake tensors miss these), or None."""
    items = list(index) if isinstance(index, tuple) else [index]
    consumed = sum(1 for i in items if i is not None and i is not Ellipsis and not isinstance(i, bool))
    dim = 0
    for item in items:
        if item is Ellipsis:
            dim += len(shape) - consumed
            continue
        if item is None or isinstance(item, bool):
            continue
        if dim >= len(shape):
            return f"too many indices for a tensor of {len(shape)} dims"
        size = shape[dim]
        if isinstance(item, int):
            if not -size <= item < size:
                return f"index {item} on dim {dim} of size {size}"
        elif isinstance(item, slice):
            for bound in (item.start, item.stop):
                if isinstance(bound, int) and not -size <= bound <= size:
                    text = ":".join("" if b is None else str(b) for b in (item.start, item.stop))
                    return f"slice {text} runs past dim {dim} of size {size}"
        elif isinstance(item, KnownRange) and not (-size <= item.low and item.high < size):
            return f"tensor index with values {item.low}..{item.high} on dim {dim} of size {size}"
        dim += 1
    return None


def check(program: Program, table: SiteTable, model: torch.nn.Module, params: dict[str, Any],
          rows: list[slice], root: str = "model", typed: "IncrementalTyper | None" = None,
          ids: dict[int, int] | None = None, max_bytes: int | None = None) -> TypedProgram:
    """Schedule and type-check `program`; raise CheckError with every problem, in line order.

    `typed` is a typer that already typed the ops `program` was made from (by `ids`: its value
    id -> the program's); then the ops are not typed again, only scheduled. `max_bytes`: the
    largest tensor one op may allocate (see `allocation_limit`); larger ones are errors.
    """
    refused = problems(program)
    if refused:
        raise CheckError(refused)
    checker = _Checker(program, table, model, params, rows, root)
    checker.schedule()
    if typed is None or ids is None:
        checker.run()
        fakes = checker.fake
    else:
        prior, diagnostics = typed.finish()
        checker.diags.extend(diagnostics)
        fakes = {ids[k]: v for k, v in prior.items() if k in ids}
    if max_bytes is not None:
        checker.diags.extend(_allocation_problems(program, fakes, max_bytes))
    if checker.diags:
        raise CheckError(checker.diags)
    types = {k: type_of(v) for k, v in fakes.items()}
    return TypedProgram(program, types, tuple(checker.when), tuple(table.order), fakes)


def allocation_limit(device: torch.device | str = "cpu") -> int:
    """The most bytes one op of an experiment may allocate: IVX_MAX_OP_BYTES if set, else half
    the memory free now on `device`."""
    import os

    setting = os.environ.get("IVX_MAX_OP_BYTES")
    if setting:
        return int(float(setting))
    if torch.device(device).type == "cuda":
        return torch.cuda.mem_get_info(torch.device(device))[0] // 2
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2


def _allocation_problems(program: Program, fakes: dict[int, Any], limit: int) -> list[Diagnostic]:
    found = []
    for op in program.ops:
        value = fakes.get(op.result) if op.opcode in ("call", "module") else None  # type: ignore[arg-type]
        if is_tensor_like(value):
            size = value.numel() * value.dtype.itemsize
            if size > limit:
                found.append(Diagnostic(op.span, f"{op.target} would allocate {_bytes(size)} "
                                        f"({format_type(type_of(value))}), above the limit of {_bytes(limit)}",
                                        "make it smaller, or raise the limit: IVX_MAX_OP_BYTES=<bytes>"))
    return found


def _bytes(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


@dataclass(frozen=True)
class _OpList:
    ops: tuple[Op, ...]


class IncrementalTyper:
    """Fake values of a growing list of ops (for `.shape` inside a trace): each op is typed once,
    and the final check reuses the result."""

    def __init__(self, table: SiteTable, model: torch.nn.Module, params: dict[str, Any],
                 rows: list[slice], root: str = "model"):
        self.table = table
        self._checker = _Checker(Program(()), table, model, params, rows, root)
        self._done = 0
        self._ops: list[Op] = []

    def _type(self, ops: list[Op]) -> None:
        self._ops = ops
        self._checker.program = _OpList(tuple(ops))  # type: ignore[assignment]
        self._checker.run(start=self._done)
        self._done = len(ops)

    def values(self, ops: list[Op]) -> dict[int, Any]:
        """Fake values of the results of `ops` (a list that only grows); raises CheckError while
        any op typed so far has a problem."""
        self._type(ops)
        if self._checker.diags:
            raise CheckError(list(self._checker.diags))
        return self._checker.fake

    def record(self, ops: list[Op]) -> None:
        """The complete list of ops, typed by `finish`."""
        self._ops = ops

    def finish(self) -> tuple[dict[int, Any], list[Diagnostic]]:
        """Every op's fake value and every problem found, without raising."""
        self._type(self._ops)
        return self._checker.fake, list(self._checker.diags)
