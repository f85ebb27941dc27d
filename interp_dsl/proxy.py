"""Proxy: a value of the experiment, recorded as IR while tracing, the real value afterwards."""

from __future__ import annotations

import functools
import inspect
import operator
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from compiler import ops, vocabulary
from compiler.errors import (
    ProxyControlFlowError,
    UnsupportedOperationError,
    ValueUnavailableError,
    did_you_mean,
)
from compiler.ir import Arg, Site
from compiler.shape_rules import Abstract, is_tensor_like, materialize
from interp_dsl import fan
from interp_dsl.spans import user_span

if TYPE_CHECKING:
    from interp_dsl.tracing import Tracer

_UNSET = object()

# Tensor dunder methods reach __torch_function__ when a real tensor is on the left.
_DUNDERS = {
    "__add__": "add", "__sub__": "sub", "__mul__": "mul", "__truediv__": "truediv",
    "__floordiv__": "floordiv", "__mod__": "mod", "__pow__": "pow", "__matmul__": "matmul",
    "__and__": "and_", "__or__": "or_", "__xor__": "xor", "__lt__": "lt", "__le__": "le",
    "__gt__": "gt", "__ge__": "ge", "__eq__": "eq", "__ne__": "ne", "__getitem__": "getitem",
    "__neg__": "neg", "__pos__": "pos", "__abs__": "abs", "__invert__": "invert",
    "__radd__": "add", "__rsub__": "sub", "__rmul__": "mul", "__rtruediv__": "truediv",
    "__rfloordiv__": "floordiv", "__rmod__": "mod", "__rpow__": "pow", "__rmatmul__": "matmul",
}
GradientOf = tuple[Site, tuple[Arg, ...], int]  # a gradient's site, path in the site's value, backward pass


class Proxy:
    """A value inside a trace. Every operation on it records an op; nothing runs until the end.

    After the trace, a saved proxy stands for its value: indexing, arithmetic, torch functions,
    attributes and printing all act on the real tensor (also reachable as `.value`).
    """

    __slots__ = ("_tracer", "_id", "_origin", "_value", "_missing", "_saved", "_save_name", "_steps",
                 "_grad_of", "_retained", "__weakref__")

    def __init__(self, tracer: "Tracer", id: int, origin: tuple[Site, tuple[Arg, ...]] | None = None):
        object.__setattr__(self, "_tracer", tracer)
        object.__setattr__(self, "_id", id)
        object.__setattr__(self, "_origin", origin)
        object.__setattr__(self, "_value", _UNSET)
        object.__setattr__(self, "_missing", "")
        object.__setattr__(self, "_saved", False)
        object.__setattr__(self, "_save_name", None)
        object.__setattr__(self, "_steps", None)  # in a generation step block: its value id per step
        object.__setattr__(self, "_grad_of", None)  # a gradient: where (GradientOf)
        object.__setattr__(self, "_retained", None)  # `.retain_grad()`: the saved gradient's proxy

    # ------------------------------------------------------------------------------ life cycle
    @property
    def _live(self) -> bool:
        return self._tracer.recording

    def _resolve(self, value: Any = _UNSET, missing: str = "") -> None:
        object.__setattr__(self, "_value", value)
        object.__setattr__(self, "_missing", missing)

    def _rebind(self, other: "Proxy") -> "Proxy":
        """In-place operations make this proxy name the new value (as aliasing would in torch)."""
        object.__setattr__(self, "_id", other._id)
        if self._saved:
            self._tracer.save(self)
        return self

    @property
    def value(self) -> Any:
        """The real value, after the trace. (`.value` is the older nnsight spelling; a saved
        proxy can also be used directly.)"""
        if self._live:
            raise ValueUnavailableError.at(
                user_span(), "a value is not available inside the trace; it exists once the "
                "`with` block ends", "call .save() on it and use it after the block")
        if self._value is _UNSET:
            raise ValueUnavailableError.at(
                user_span(), self._missing or "this value was not saved",
                "" if self._missing else "call .save() on it inside the trace")
        if isinstance(self._value, Abstract):  # a scan's result: a fake tensor, made when first read
            with self._tracer.typer().table.mode:
                object.__setattr__(self, "_value", materialize(self._value))
        return self._value

    def save(self, name: str | None = None) -> "Proxy":
        """Keep this value after the trace (`name` labels it in results; default `save<n>`)."""
        if not self._live:
            return self
        from interp_dsl.conditions import HIDDEN  # conditions.py builds on this module
        if isinstance(name, str) and name.startswith(HIDDEN):
            raise UnsupportedOperationError.at(user_span(), f"save names starting with {HIDDEN!r} are "
                                               "the library's own", "choose another name")
        self._tracer.save(self, name)
        return self

    def stop(self) -> None:
        """Old spelling: stop the forward right after this value's site."""
        self._tracer.stop(self)

    # ------------------------------------------------------------------------------- tracing
    def _call(self, name: str, *args: Any, **kwargs: Any) -> Any:
        if not self._live:
            return ops.functions()[name](*_unwrap(args), **_unwrap(kwargs))
        return self._tracer.call(name, args, kwargs)

    def _inplace(self, name: str, other: Any) -> "Proxy":
        if not self._live:
            raise ProxyControlFlowError.at(user_span(), "in-place operation on a value after the trace")
        return self._inplace_result(name, self._tracer.call(name, (self, other), {}))

    def _write_through(self, result: "Proxy") -> "Proxy":
        if self._grad_of is not None:
            site, path, number = self._grad_of
            self._tracer.set_grad(site, path, number, result)
            object.__setattr__(result, "_grad_of", self._grad_of)
        elif self._origin is not None:
            site, path = self._origin
            self._tracer.write(site, path, result)
            object.__setattr__(result, "_origin", self._origin)
        return self._rebind(result)

    @classmethod
    def __torch_function__(cls, func: Callable[..., Any], types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        tracer = _find_tracer((args, kwargs))
        if tracer is None or not tracer.recording:
            return func(*_unwrap(args), **_unwrap(kwargs))
        name = vocabulary.name_of(func)
        kwargs = _without_defaults(func, kwargs)
        dunder = getattr(func, "__name__", "")
        if name is None and dunder in _DUNDERS:
            name = _DUNDERS[dunder]
            if dunder.startswith("__r") and dunder != "__rshift__":
                args = (args[1], args[0])
        if name is None:
            qual = f"{getattr(func, '__module__', None) or 'torch'}.{getattr(func, '__qualname__', func)}"
            raise UnsupportedOperationError.at(
                user_span(), f"{qual} is not in interp_dsl's vocabulary",
                "use a function listed in docs/vocabulary.md (torch, F, linalg, einops, tensor methods)")
        return record_call(tracer, name, args, kwargs)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        if not self._live:
            if name == "grad" and self._retained is not None:
                return self._retained.value
            return getattr(self.value, name)
        if name in ("grad", "backward", "retain_grad", "requires_grad", "register_hook"):
            return self._gradient_attribute(name)
        if not self._is_tensor():
            return self._tracer.call("field", (self, name), {})
        full = f"Tensor.{name}"
        entry = vocabulary.vocabulary().get(full)
        if entry is None:
            known = [n.removeprefix("Tensor.") for n in vocabulary.vocabulary() if n.startswith("Tensor.")]
            raise UnsupportedOperationError.at(
                user_span(), f"tensor method .{name} is not in interp_dsl's vocabulary",
                "values inside a trace are symbolic; use .save() and call it after the block"
                if name in ("item", "tolist", "numpy") else
                did_you_mean(name, known) or "docs/vocabulary.md lists the tensor methods")
        if entry.kind == "property":
            return self._tracer.call(full, (self,), {})
        return lambda *a, **k: record_call(self._tracer, full, (self, *a), k)

    def _inplace_result(self, name: str, result: "Proxy") -> "Proxy":
        """An in-place op: a write when this is a module's value; refused on a weight; otherwise
        the new value of this (the experiment's own) value."""
        if any(op.result == self._id and op.opcode == "weight" for op in self._tracer.ops):
            raise UnsupportedOperationError.at(
                user_span(), f"{name} would change a weight of the model in place",
                "weights are read-only here: compute a new value (w = w * 2) and use it")
        return self._write_through(result)

    def _is_tensor(self) -> bool:
        """Whether the value is a tensor (not a tuple such as topk's (values, indices))."""
        try:
            return is_tensor_like(self._tracer.fake(self))
        except Exception:  # no fake pass for this model: assume a tensor; the final check decides
            return True

    def _gradient_attribute(self, name: str) -> Any:
        """`.grad` (a gradient of this module value, readable and writable), `.backward()`,
        `.retain_grad()`, and `.requires_grad` (always true here for a module's value)."""
        tracer = self._tracer
        if name == "grad":
            return tracer.grad(self)
        if name == "backward":
            return lambda gradient=None, retain_graph=None: tracer.backward(self, gradient)
        if name == "retain_grad":
            return lambda: object.__setattr__(self, "_retained", tracer.grad(self).save())
        if name == "requires_grad":
            return self._origin is not None or self._grad_of is not None
        raise UnsupportedOperationError.at(
            user_span(), "register_hook takes a Python function, which an experiment cannot hold",
            "read or change the gradient with `.grad` inside `with metric.backward():`")

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "grad" and self._live:
            self._tracer.set_grad_of(self, value)
            return
        if name == "requires_grad" and self._live:
            if value is True and self._origin is not None:
                return  # a module value whose gradient is used is made to require one
            raise UnsupportedOperationError.at(
                user_span(), f"requires_grad = {value!r}: only a module's value can require a gradient here",
                "read `.grad` of a module's .output/.input; it requires a gradient by itself")
        raise UnsupportedOperationError.at(
            user_span(), f"cannot set attribute {name!r} on a traced value",
            "write a module's value with `module.output = ...` or `value[...] = ...`")

    def __getitem__(self, index: Any) -> Any:
        if not self._live:
            return self.value[_unwrap(index)]
        return self._tracer.call("getitem", (self, index), {}, origin_of=(self, index))

    def __setitem__(self, index: Any, value: Any) -> None:
        if not self._live:
            self.value[_unwrap(index)] = _unwrap(value)
            return
        if fan.contains(index):
            fan.apply(self.__setitem__, index, value)
            return
        if self._grad_of is not None:
            site, path, number = self._grad_of
            self._tracer.set_grad(site, (*path, self._tracer.encode(index)), number, value)
            self._rebind(self._tracer.grad_at(site, path, number))
        elif self._origin is not None:
            site, path = self._origin
            self._tracer.write(site, (*path, self._tracer.encode(index)), value)
            self._rebind(self._tracer.reread(self._origin))
        else:
            self._rebind(self._tracer.call("setitem", (self, index, value), {}))

    # ------------------------------------------------------------------- shape and conversion
    @property
    def shape(self) -> Any:
        shape = self._fake_or_value().shape
        return Shape(shape) if self._live else shape

    @property
    def dtype(self) -> torch.dtype:
        return self._fake_or_value().dtype

    @property
    def ndim(self) -> int:
        return self._fake_or_value().ndim

    @property
    def device(self) -> torch.device:
        return self._fake_or_value().device

    def size(self, dim: int | None = None) -> Any:
        shape = self.shape
        return shape if dim is None else shape[dim]

    def dim(self) -> int:
        return self.ndim

    def _fake_or_value(self) -> Any:
        return self._tracer.fake(self) if self._live else self.value

    def __len__(self) -> int:
        return len(self._fake_or_value())

    def __iter__(self) -> Any:
        if not self._live:
            return iter(self.value)
        return (self[i] for i in range(len(self)))

    def _control_flow(self, what: str) -> Any:
        if not self._live:
            return getattr(self.value, what)()
        raise ProxyControlFlowError.at(
            user_span(), f"a traced value has no concrete value inside the trace ({what[2:-2]}() "
            "was called on it, e.g. by `if`, `while`, `int(...)` or `float(...)`)",
            "compute both branches with torch.where(cond, a, b), or save the value and decide "
            "after the `with` block")

    def __bool__(self) -> bool:
        return self._control_flow("__bool__")

    def __int__(self) -> int:
        return self._control_flow("__int__")

    def __float__(self) -> float:
        return self._control_flow("__float__")

    def __index__(self) -> int:
        return self._control_flow("__index__")

    def __array__(self, *args: Any, **kwargs: Any) -> Any:
        return self.value.__array__(*args, **kwargs)

    def __hash__(self) -> int:
        return id(self)

    def __repr__(self) -> str:
        if self._live:
            return f"Proxy(%{self._id})"
        if self._value is _UNSET:
            return f"Proxy(<{self._missing or 'not saved'}>)"
        return repr(self._value)

    def __str__(self) -> str:
        return repr(self) if self._live or self._value is _UNSET else str(self._value)

    def __format__(self, spec: str) -> str:
        return format(self.value, spec) if not self._live else repr(self)


class Shape(tuple):
    """A concrete shape inside a trace (torch.Size cannot be subclassed); `.save()`, the newer
    nnsight spelling, is accepted and returns it."""

    def save(self) -> "Shape":
        return self

    def numel(self) -> int:
        return int(torch.Size(self).numel())

    def __repr__(self) -> str:
        return repr(torch.Size(self))


def _binary(name: str, reflected: bool = False) -> Callable[[Proxy, Any], Any]:
    fn = ops.functions()[name] if name in ops.functions() else getattr(operator, name)

    def method(self: Proxy, other: Any) -> Any:
        if not self._live:
            a, b = self.value, _unwrap(other)
            return fn(b, a) if reflected else fn(a, b)
        return self._tracer.call(name, (other, self) if reflected else (self, other), {})

    return method


def _unary(name: str) -> Callable[[Proxy], Any]:
    def method(self: Proxy) -> Any:
        return self._call(name, self)

    return method


def _inplace(name: str) -> Callable[[Proxy, Any], Any]:
    def method(self: Proxy, other: Any) -> Any:
        if not self._live:
            return _binary(name)(self, other)
        return self._inplace(name, other)

    return method


for _op in ("add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "matmul", "and_", "or_",
            "xor", "lshift", "rshift"):
    _dunder = _op.rstrip("_")
    setattr(Proxy, f"__{_dunder}__", _binary(_op))
    setattr(Proxy, f"__r{_dunder}__", _binary(_op, reflected=True))
    setattr(Proxy, f"__i{_dunder}__", _inplace(_op))
for _op in ("lt", "le", "gt", "ge", "eq", "ne"):
    setattr(Proxy, f"__{_op}__", _binary(_op))
for _op in ("neg", "pos", "abs", "invert"):
    setattr(Proxy, f"__{_op}__", _unary(_op))


def record_call(tracer: "Tracer", name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """Record a call of vocabulary function `name`, its keyword arguments checked first. An
    in-place method, or `inplace=True`, on a module's value is recorded as the call and a write."""
    inplace = vocabulary.is_inplace(name)
    if name in vocabulary.INPLACE_FLAG and "inplace" in kwargs:
        kwargs = dict(kwargs)
        inplace = bool(kwargs.pop("inplace"))
    problem = vocabulary.keyword_problem(name, list(kwargs))
    if problem:
        raise UnsupportedOperationError.at(user_span(), problem)
    result = tracer.call(name, args, kwargs)
    if inplace and args and isinstance(args[0], Proxy):
        return args[0]._inplace_result(name, result)
    return result


def _without_defaults(func: Callable[..., Any], kwargs: dict[str, Any]) -> dict[str, Any]:
    """Keyword arguments the user gave: Python functions of torch.nn.functional hand every
    parameter to `__torch_function__`, the ones left at their defaults included."""
    defaults = _defaults(func)
    return {k: v for k, v in kwargs.items()
            if not (k in defaults and type(v) is type(defaults[k]) and v == defaults[k])}


@functools.cache
def _defaults(func: Callable[..., Any]) -> dict[str, Any]:
    try:
        parameters = inspect.signature(func).parameters.values()
    except (TypeError, ValueError):  # a builtin without a signature
        return {}
    return {p.name: p.default for p in parameters if p.default is not inspect.Parameter.empty}


def _find_tracer(obj: Any) -> "Tracer | None":
    if isinstance(obj, Proxy):
        return obj._tracer
    if isinstance(obj, (list, tuple)):
        for item in obj:
            found = _find_tracer(item)
            if found is not None:
                return found
    if isinstance(obj, dict):
        return _find_tracer(list(obj.values()))
    return None


def _unwrap(obj: Any) -> Any:
    """Replace finished proxies by their values."""
    if isinstance(obj, Proxy):
        return obj.value
    if isinstance(obj, (list, tuple)) and not hasattr(obj, "_fields"):
        return type(obj)(_unwrap(x) for x in obj)
    if isinstance(obj, dict):
        return {k: _unwrap(v) for k, v in obj.items()}
    return obj
