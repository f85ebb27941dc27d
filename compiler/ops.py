"""What each op name does (its function, from the vocabulary), and how site values are read and written.

The same table runs on fake tensors (checking) and on real ones (the reference interpreter), so
the two cannot disagree about what an op does.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import Any

import torch

from compiler import vocabulary
from compiler.ir import (
    Arg,
    Const,
    DTypeArg,
    EllipsisArg,
    ListArg,
    Ref,
    SliceArg,
    TupleArg,
)
from compiler.shape_rules import is_tensor_like

# The Python operators' spellings, for messages and for printing IR back as source.
OPERATOR_SYMBOLS = {
    "add": "+", "sub": "-", "mul": "*", "truediv": "/", "floordiv": "//", "mod": "%", "pow": "**",
    "matmul": "@", "eq": "==", "ne": "!=", "lt": "<", "le": "<=", "gt": ">", "ge": ">=",
}


def functions() -> dict[str, Callable[..., Any]]:
    """The vocabulary's callables: op name -> function (see compiler/vocabulary.py)."""
    return _functions()


@functools.cache
def _functions() -> dict[str, Callable[..., Any]]:
    return {name: entry.func for name, entry in vocabulary.vocabulary().items()}


name_of = vocabulary.name_of
is_inplace_method = vocabulary.is_inplace


def call(name: str, args: list[Any], kwargs: dict[str, Any]) -> Any:
    """Run the op `name`. In-place tensor methods run on a copy: IR values are immutable. Python
    operators on plain numbers are bounded (see `vocabulary.python_operator`)."""
    entry = vocabulary.vocabulary()[name]
    if entry.kind == "operator" and name not in ("setitem", "field") \
            and not any(is_tensor_like(a) for a in args):
        return vocabulary.python_operator(name, *args)
    if entry.kind == "inplace" and args and isinstance(args[0], torch.Tensor):
        args = [args[0].clone(), *args[1:]]
    return entry.func(*args, **kwargs)


# ------------------------------------------------------------------------------------ arguments
def materialize(arg: Arg, values: Mapping[int, Any]) -> Any:
    """The Python value of an argument, looking references up in `values`."""
    if isinstance(arg, Ref):
        return values[arg.id]
    if isinstance(arg, Const):
        return arg.value
    if isinstance(arg, SliceArg):
        return slice(*(materialize(a, values) for a in (arg.start, arg.stop, arg.step)))
    if isinstance(arg, EllipsisArg):
        return Ellipsis
    if isinstance(arg, TupleArg):
        return tuple(materialize(a, values) for a in arg.items)
    if isinstance(arg, ListArg):
        return [materialize(a, values) for a in arg.items]
    if isinstance(arg, DTypeArg):
        return vocabulary.DTYPES[arg.name]
    raise TypeError(f"not an argument: {arg!r}")


# ---------------------------------------------------------------------------------- site values
def map_rows(value: Any, fn: Callable[[torch.Tensor], Any], batch: int) -> Any:
    """Apply `fn` to every tensor in `value` whose first dimension is the batch."""
    if is_tensor_like(value):
        return fn(value) if value.dim() > 0 and value.shape[0] == batch else value
    if isinstance(value, tuple) and not hasattr(value, "_fields"):
        return tuple(map_rows(v, fn, batch) for v in value)
    if isinstance(value, list):
        return [map_rows(v, fn, batch) for v in value]
    if dataclasses.is_dataclass(value) and isinstance(value, Mapping):  # HF ModelOutput
        return type(value)(**{k: map_rows(v, fn, batch) for k, v in value.items()})
    if isinstance(value, dict):
        return type(value)((k, map_rows(v, fn, batch)) for k, v in value.items())
    return value


def slice_rows(value: Any, rows: slice, batch: int) -> Any:
    """The part of a site value that belongs to one invoke (rows of the batch)."""
    if rows == slice(0, batch):
        return value
    return map_rows(value, lambda t: t[rows], batch)


def first_input_key(inputs: tuple[tuple[Any, ...], dict[str, Any]]) -> int | str:
    """Where `.input` lives: the first positional argument, else the first keyword argument."""
    args, kwargs = inputs
    if args:
        return 0
    if kwargs:
        return next(iter(kwargs))
    raise IndexError("the module was called with no arguments")


def site_value(live: Any, kind: str) -> Any:
    """The value of a site given the hook's live value: output, or (args, kwargs) for inputs."""
    if kind == "input":
        key = first_input_key(live)
        return live[0][key] if isinstance(key, int) else live[1][key]
    return live


def write_site(live: Any, kind: str, path: list[Any], value: Any, rows: slice, batch: int) -> Any:
    """A new live value with `value` written at `path` within the invoke's `rows`."""
    if kind == "input":
        key = first_input_key(live)
        path = [0, key, *path] if isinstance(key, int) else [1, key, *path]
    return _write(live, path, value, rows, batch)


def _write(container: Any, path: list[Any], value: Any, rows: slice, batch: int) -> Any:
    if isinstance(container, torch.Tensor):
        return _write_tensor(container, path, value, rows, batch)
    if not path:
        if rows == slice(0, batch):
            return value
        raise TypeError(
            f"cannot replace a whole {type(container).__name__} for one invoke of a batch; "
            "write its tensors instead"
        )
    key, rest = path[0], path[1:]
    if isinstance(container, tuple):
        items = list(container)
        items[key] = _write(items[key], rest, value, rows, batch)
        return type(container)(items) if not hasattr(container, "_fields") else type(container)(*items)
    if isinstance(container, list):
        items = list(container)
        items[key] = _write(items[key], rest, value, rows, batch)
        return items
    if isinstance(container, Mapping):
        new = dict(container)
        new[key] = _write(container[key], rest, value, rows, batch)
        return type(container)(**new) if dataclasses.is_dataclass(container) else new
    raise TypeError(f"cannot index into {type(container).__name__} to write")


def _write_tensor(t: torch.Tensor, path: list[Any], value: Any, rows: slice, batch: int) -> torch.Tensor:
    whole_batch = rows == slice(0, batch) or t.dim() == 0 or t.shape[0] != batch
    if not path and whole_batch:
        if isinstance(value, torch.Tensor):
            return value
        return torch.full_like(t, value)
    out = t.clone()
    view = out if whole_batch else out[rows]
    for index in path[:-1]:
        view = view[index]
    if path:
        view[path[-1]] = value
    else:
        view[...] = value
    return out
