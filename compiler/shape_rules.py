"""Shape rules: the result type of common ops computed directly, without a fake-tensor dispatch.

A check types hundreds of ops; each fake-tensor dispatch costs 0.1-0.3 ms. For the ops specs use
most (indexing, elementwise arithmetic, reductions, softmax, transposes, dtype casts) the result
shape follows from a few lines of arithmetic. A rule returns an `Abstract` value, or None when the
case is not one it knows; the checker then falls back to fake tensors. `tests/test_shape_rules.py`
checks every rule against torch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class Abstract:
    """A tensor known by shape and dtype only (duck-types the parts of a tensor a check reads)."""

    shape: torch.Size
    dtype: torch.dtype
    device: torch.device = torch.device("cpu")

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def dim(self) -> int:
        return len(self.shape)

    def size(self, dim: int | None = None) -> Any:
        return self.shape if dim is None else self.shape[dim]

    def numel(self) -> int:
        return self.shape.numel()

    def __len__(self) -> int:
        if not self.shape:
            raise TypeError("len() of a 0-d tensor")
        return self.shape[0]

    def __getitem__(self, index: Any) -> "Abstract":
        result = _getitem([self, index], {})
        if result is None:
            raise TypeError(f"index {index!r} needs a tensor, not an abstract value")
        return result

    def materialize(self) -> torch.Tensor:
        """A tensor of this type (inside a FakeTensorMode: a fake one)."""
        return torch.empty(self.shape, dtype=self.dtype, device=self.device)


def is_tensor_like(x: Any) -> bool:
    return isinstance(x, (torch.Tensor, Abstract))


def _abstract(shape: Any, dtype: torch.dtype, like: Any) -> Abstract:
    return Abstract(torch.Size(shape), dtype, like.device)


# ---------------------------------------------------------------------------------------- rules
def _getitem(args: list[Any], kwargs: dict[str, Any]) -> Abstract | None:
    x, index = args
    if not is_tensor_like(x) or kwargs:
        return None
    items = list(index) if isinstance(index, tuple) else [index]
    if any(not (i is None or i is Ellipsis or type(i) is int or isinstance(i, slice)) for i in items):
        return None
    if any(isinstance(i, slice) and not all(b is None or type(b) is int for b in (i.start, i.stop, i.step))
           for i in items):
        return None
    consumed = sum(1 for i in items if i is not None and i is not Ellipsis)
    if consumed > x.ndim or sum(1 for i in items if i is Ellipsis) > 1:
        return None
    shape: list[int] = []
    dim = 0
    for item in items:
        if item is None:
            shape.append(1)
        elif item is Ellipsis:
            rest = x.ndim - consumed
            shape.extend(x.shape[dim:dim + rest])
            dim += rest
        elif type(item) is int:
            if not -x.shape[dim] <= item < x.shape[dim]:
                return None
            dim += 1
        else:
            if item.step is not None and item.step <= 0:
                return None
            shape.append(len(range(*item.indices(x.shape[dim]))))
            dim += 1
    shape.extend(x.shape[dim:])
    return _abstract(shape, x.dtype, x)


def _float_dtype(*values: Any) -> torch.dtype | None:
    """The result dtype of arithmetic on float tensors of one dtype and Python numbers."""
    dtypes = {v.dtype for v in values if is_tensor_like(v)}
    if len(dtypes) != 1:
        return None
    dtype = dtypes.pop()
    if not dtype.is_floating_point:
        return None
    if any(not is_tensor_like(v) and type(v) not in (int, float) for v in values):
        return None  # bools, complex numbers: torch's rules differ per op
    return dtype


def _broadcast(*values: Any) -> torch.Size | None:
    try:
        return torch.broadcast_shapes(*(v.shape for v in values if is_tensor_like(v)))
    except RuntimeError:
        return None  # the checker reports it with its own message


def _elementwise(comparison: bool) -> Callable[[list[Any], dict[str, Any]], Abstract | None]:
    def rule(args: list[Any], kwargs: dict[str, Any]) -> Abstract | None:
        if len(args) != 2 or kwargs or not any(is_tensor_like(a) for a in args):
            return None
        dtype, shape = _float_dtype(*args), _broadcast(*args)
        if dtype is None or shape is None:
            return None
        like = next(a for a in args if is_tensor_like(a))
        return _abstract(shape, torch.bool if comparison else dtype, like)
    return rule


def _same(args: list[Any], kwargs: dict[str, Any]) -> Abstract | None:
    """Ops whose result has the input's type: clone, contiguous, detach."""
    if len(args) != 1 or kwargs or not is_tensor_like(args[0]):
        return None
    return _abstract(args[0].shape, args[0].dtype, args[0])


def _same_float(args: list[Any], kwargs: dict[str, Any]) -> Abstract | None:
    """Arithmetic on one float tensor: neg, abs, relu (torch refuses some of them on bools)."""
    result = _same(args, kwargs)
    return result if result is not None and result.dtype.is_floating_point else None


def _softmax(args: list[Any], kwargs: dict[str, Any]) -> Abstract | None:
    x = args[0] if args else None
    dim = args[1] if len(args) > 1 else kwargs.get("dim")
    if not is_tensor_like(x) or type(dim) is not int or set(kwargs) - {"dim"} or len(args) > 2:
        return None
    if not -x.ndim <= dim < max(x.ndim, 1) or not x.dtype.is_floating_point:
        return None
    return _abstract(x.shape, x.dtype, x)


def _reduction(args: list[Any], kwargs: dict[str, Any]) -> Abstract | None:
    x = args[0] if args else None
    if not is_tensor_like(x) or not x.dtype.is_floating_point or len(args) > 2:
        return None
    if set(kwargs) - {"dim", "keepdim"}:
        return None
    dim = args[1] if len(args) > 1 else kwargs.get("dim")
    keepdim = kwargs.get("keepdim", False)
    if type(keepdim) is not bool:
        return None
    if dim is None:
        return None if "keepdim" in kwargs else _abstract([], x.dtype, x)
    dims = [dim] if type(dim) is int else list(dim) if isinstance(dim, (tuple, list)) else None
    if not dims or any(type(d) is not int or not -x.ndim <= d < x.ndim for d in dims):
        return None  # dim=() means "all dims" to torch: leave it to fake tensors
    dims = [d % x.ndim for d in dims]
    if len(set(dims)) != len(dims):
        return None
    shape = [1 if i in dims else n for i, n in enumerate(x.shape)] if keepdim else \
        [n for i, n in enumerate(x.shape) if i not in dims]
    return _abstract(shape, x.dtype, x)


def _transpose(args: list[Any], kwargs: dict[str, Any]) -> Abstract | None:
    if len(args) != 3 or kwargs or not is_tensor_like(args[0]):
        return None
    x, a, b = args
    if type(a) is not int or type(b) is not int or not (-x.ndim <= a < x.ndim and -x.ndim <= b < x.ndim):
        return None
    shape = list(x.shape)
    shape[a], shape[b] = shape[b], shape[a]
    return _abstract(shape, x.dtype, x)


def _to(args: list[Any], kwargs: dict[str, Any]) -> Abstract | None:
    if len(args) != 2 or kwargs or not is_tensor_like(args[0]) or not isinstance(args[1], torch.dtype):
        return None
    return _abstract(args[0].shape, args[1], args[0])


RULES: dict[str, Callable[[list[Any], dict[str, Any]], Abstract | None]] = {
    "getitem": _getitem,
    **{name: _elementwise(False) for name in ("add", "sub", "mul", "truediv")},
    **{name: _elementwise(True) for name in ("eq", "ne", "lt", "le", "gt", "ge")},
    **{name: _same for name in ("Tensor.clone", "Tensor.contiguous", "Tensor.detach")},
    **{name: _same_float for name in ("neg", "pos", "Tensor.abs", "torch.abs", "Tensor.relu", "torch.relu")},
    **{name: _softmax for name in ("torch.softmax", "torch.log_softmax", "Tensor.softmax",
                                   "Tensor.log_softmax", "torch.nn.functional.softmax",
                                   "torch.nn.functional.log_softmax")},
    **{name: _reduction for name in ("Tensor.sum", "Tensor.mean", "torch.sum", "torch.mean",
                                     "Tensor.amax", "Tensor.amin")},
    "Tensor.norm": lambda args, kwargs: (  # its second positional is p; several dims mean a matrix norm
        _reduction(args, kwargs) if len(args) == 1 and type(kwargs.get("dim", 0)) is int else None),
    "Tensor.transpose": _transpose,
    "torch.transpose": _transpose,
    "Tensor.to": _to,
}


def infer(name: str, args: list[Any], kwargs: dict[str, Any]) -> Abstract | None:
    """The result type of op `name` by rule, or None to fall back to fake tensors."""
    rule = RULES.get(name)
    return rule(args, kwargs) if rule is not None else None


def materialize(value: Any) -> Any:
    """Replace abstract values by tensors (inside a FakeTensorMode: fake ones), recursively."""
    if isinstance(value, Abstract):
        return value.materialize()
    if isinstance(value, (list, tuple)) and not hasattr(value, "_fields"):
        return type(value)(materialize(v) for v in value)
    if isinstance(value, dict):
        return type(value)((k, materialize(v)) for k, v in value.items())
    if isinstance(value, slice):
        return slice(materialize(value.start), materialize(value.stop), materialize(value.step))
    return value
