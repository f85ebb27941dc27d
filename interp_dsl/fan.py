"""Vectorised sweep axes: values that differ per point of an integer sweep axis.

An integer sweep axis (a layer index, a position) is not run point by point. Its points become rows
of the batch instead, so a sweep over every layer runs as one forward and one compiled graph.
A `Fanned` value maps each point of the axes it depends on to an ordinary value (an `Envoy`, a
`Proxy`, a number); operations on it apply point by point. A write made at a point rewrites only
that point's rows of its invoke: `site = torch.where(rows_of_point, new, site)`. The invoke is
*expanded* at its first such write: its prompts repeat once per point, point-major. Invokes that
only read (the clean run of a patching sweep) keep one row per prompt, so they run once.
"""

from __future__ import annotations

import itertools
import operator
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from compiler.errors import InterventionError
from compiler.ir import Arg, Site
from compiler.shape_rules import is_tensor_like
from interp_dsl.spans import user_span
from runtime.grid import n_points, repeat_rows, row_values

if TYPE_CHECKING:
    from interp_dsl.tracing import Tracer

FAN_PARAM = "__fan_{}"  # the per-row index of an axis's value, a parameter of the program


@dataclass
class FanState:
    """A sweep's vectorised axes as its tracer records them: created by the sweep, attached to
    the tracer it records into (`tracer.fan`)."""

    rows: int  # prompts per batch, before expansion
    axes: dict[str, list[Any]] = field(default_factory=dict)  # name -> values, in declaration order
    point: dict[str, int] = field(default_factory=dict)  # the point a fanned operation is applied at
    expanded: set[int] = field(default_factory=set)  # invokes whose rows repeat once per point
    params: dict[str, Any] = field(default_factory=dict)  # axis -> the Proxy of its per-row indices

    @property
    def points(self) -> int:
        return n_points(self.axes)

    def write(self, tracer: "Tracer", site: Site, path: tuple[Arg, ...], value: Any) -> None:
        """A write at `self.point`: only that point's rows change (`torch.where` on a row mask).
        The invoke is expanded at its first such write."""
        if site.invoke not in self.expanded:
            self.expanded.add(site.invoke)
            tracer.invoke_inputs[site.invoke] = repeat_rows(tracer.invoke_inputs[site.invoke], self.points)
            tracer.inputs_changed()
        current = tracer.reread((site, path))
        target = tracer.fake(current)
        if not is_tensor_like(target):
            raise InterventionError.at(user_span(), "a write that depends on a vectorised sweep axis "
                                       f"needs a tensor target, not a {type(target).__name__}")
        from interp_dsl.proxy import Proxy  # proxy.py applies fanned operations through this module
        points = self.points
        found = tracer.fake(value) if isinstance(value, Proxy) else value
        rank = len(target.shape)
        if is_tensor_like(found) and len(found.shape) == rank and points > 1 \
                and found.shape[0] == self.rows and target.shape[0] == self.rows * points:
            value = tracer.call("Tensor.repeat", (value, (points,) + (1,) * (rank - 1)), {})
        mask = None
        for name, index in self.point.items():
            if name not in self.params:
                self.params[name] = tracer.named_param(FAN_PARAM.format(name), row_values(self.axes, self.rows)[name])
            hit = tracer.call("torch.eq", (self.params[name], index), {})
            mask = hit if mask is None else tracer.call("torch.logical_and", (mask, hit), {})
        mask = tracer.call("getitem", (mask, (slice(None),) + (None,) * (rank - 1)), {})
        new = tracer.call("torch.where", (mask, value, current), {})
        tracer.emit_write(site, path, new)


class Fanned:
    """A value per point of some vectorised axes: `items[(i, j, ...)]` is the value at the i-th
    value of `axes[0]`, the j-th of `axes[1]`, ... (indices into the sweep's value lists)."""

    __slots__ = ("_tracer", "_axes", "_items")

    def __init__(self, tracer: "Tracer", axes: tuple[str, ...], items: dict[tuple[int, ...], Any]):
        object.__setattr__(self, "_tracer", tracer)
        object.__setattr__(self, "_axes", axes)
        object.__setattr__(self, "_items", items)

    # attribute access and indexing act on every point
    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return apply(getattr, self, name)

    def __setattr__(self, name: str, value: Any) -> None:
        apply(setattr, self, name, value)

    def __getitem__(self, index: Any) -> Any:
        return apply(operator.getitem, self, index)

    def __setitem__(self, index: Any, value: Any) -> None:
        apply(operator.setitem, self, index, value)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return apply(lambda f, *a, **k: f(*a, **k), self, *args, **kwargs)

    @classmethod
    def __torch_function__(cls, func: Callable[..., Any], types: Any, args: Any = (), kwargs: Any = None) -> Any:
        return apply(func, *args, **(kwargs or {}))

    def save(self, name: str | None = None) -> "Fanned":
        """Save the value at every point: one save named `name` per point (the save records its
        point), joined back into rows by the sweep."""
        name = name or f"save{len(self._tracer._saved)}"
        apply(lambda item: item.save(name), self)
        return self

    def __index__(self) -> int:
        raise InterventionError.at(user_span(), f"the sweep axis {', '.join(self._axes)} has no single value here",
                                   "use it to index modules or tensors, or in arithmetic")

    def __bool__(self) -> bool:
        return bool(self.__index__())

    def __repr__(self) -> str:
        return f"Fanned({', '.join(self._axes)}: {len(self._items)} points)"


def _binary(op: Callable[[Any, Any], Any], reflected: bool = False) -> Callable[[Fanned, Any], Any]:
    def method(self: Fanned, other: Any) -> Any:
        return apply(op, other, self) if reflected else apply(op, self, other)
    return method


for _name in ("add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "matmul", "and_", "or_", "xor"):
    _dunder = _name.rstrip("_")
    setattr(Fanned, f"__{_dunder}__", _binary(getattr(operator, _name)))
    setattr(Fanned, f"__r{_dunder}__", _binary(getattr(operator, _name), reflected=True))
    setattr(Fanned, f"__i{_dunder}__", _binary(getattr(operator, f"i{_name.rstrip('_')}")))
for _name in ("lt", "le", "gt", "ge", "eq", "ne"):
    setattr(Fanned, f"__{_name}__", _binary(getattr(operator, _name)))
def _unary(op: Callable[[Any], Any]) -> Callable[[Fanned], Any]:
    return lambda self: apply(op, self)


for _name in ("neg", "pos", "abs", "invert"):
    setattr(Fanned, f"__{_name}__", _unary(getattr(operator, _name)))


def axis(tracer: "Tracer", name: str) -> Fanned:
    """The axis itself: its value at each of its points."""
    return Fanned(tracer, (name,), {(i,): v for i, v in enumerate(tracer.fan.axes[name])})


def contains(obj: Any) -> bool:
    """Whether a fanned value occurs in `obj` (looking into tuples, lists, dicts and slices)."""
    return bool(_collect(obj, []))


def apply(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """`fn(*args, **kwargs)` at every point of the axes its fanned arguments depend on; the results
    make a `Fanned` (or None when `fn` returns nothing). Writes made inside know their point."""
    fanned = _collect((args, kwargs), [])
    if not fanned:
        return fn(*args, **kwargs)
    tracer = fanned[0]._tracer
    state = tracer.fan
    used = {a for f in fanned for a in f._axes}
    axes = tuple(a for a in state.axes if a in used)
    items: dict[tuple[int, ...], Any] = {}
    outer = state.point
    for key in itertools.product(*(range(len(state.axes[a])) for a in axes)):
        point = dict(zip(axes, key, strict=True))
        state.point = {**outer, **point}
        try:
            items[key] = fn(*_pick(args, point), **_pick(kwargs, point))
        finally:
            state.point = outer
    if all(v is None for v in items.values()):
        return None
    return Fanned(tracer, axes, items)


def _collect(obj: Any, out: list[Fanned]) -> list[Fanned]:
    if isinstance(obj, Fanned):
        out.append(obj)
    elif isinstance(obj, (tuple, list)):
        for item in obj:
            _collect(item, out)
    elif isinstance(obj, dict):
        _collect(list(obj.values()), out)
    elif isinstance(obj, slice):
        _collect((obj.start, obj.stop, obj.step), out)
    return out


def _pick(obj: Any, point: dict[str, int]) -> Any:
    if isinstance(obj, Fanned):
        return obj._items[tuple(point[a] for a in obj._axes)]
    if isinstance(obj, tuple) and not hasattr(obj, "_fields"):
        return tuple(_pick(x, point) for x in obj)
    if isinstance(obj, list):
        return [_pick(x, point) for x in obj]
    if isinstance(obj, dict):
        return {k: _pick(v, point) for k, v in obj.items()}
    if isinstance(obj, slice):
        return slice(_pick(obj.start, point), _pick(obj.stop, point), _pick(obj.step, point))
    return obj
