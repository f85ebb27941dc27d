"""An fx graph as plain JSON, and back: how compiled graphs are kept on disk (runtime/graph_cache.py).

Loading runs no pickle and no `eval`. A node's target is a tensor method name, an operator
registered in `torch.ops`, or a function looked up by plain name in one of the namespaces below,
and in each case only from a closed set: tensor math (what torch lets a tensor subclass override,
less what leaves tensors, such as `numpy` or `untyped_storage`), the factories, size helpers and
grad-mode switch dynamo writes into graphs, Python's operators and `compiler.ops.call`; no file,
pickle or thread function is among them. A method runs as `torch.Tensor`'s own, so only on a
tensor, and an in-place write must land in memory the graph allocated, never in an input (the
model's weights are inputs). A graph outside these rules is neither written nor loaded.
Arguments are numbers, strings, dtypes, devices, slices, containers of these, and other nodes of
the same graph.
"""

from __future__ import annotations

import functools
import math
import operator
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F

from compiler import ops
from compiler.splice import VIEWS, writes_in_place

NAMESPACES: dict[str, Any] = {
    "torch": torch, "torch.nn.functional": F, "torch._C._nn": torch._C._nn, "torch._C": torch._C,
    "torch._C.TensorBase": torch._C.TensorBase, "torch.Tensor": torch.Tensor,
    "torch.special": torch.special, "torch.linalg": torch.linalg, "torch.fft": torch.fft,
    "operator": operator, "math": math, "compiler.ops": ops,
}
_NODE_OPS = ("placeholder", "call_function", "call_method", "output")
_CLASSES = (torch.Size,)  # the classes a graph may call (other classes could run arbitrary __init__)
# Beyond tensor math: what dynamo writes into graphs (factories, symbolic sizes, grad mode).
_TORCH_EXTRA = ("arange", "ones", "zeros", "full", "empty", "empty_strided", "tensor", "scalar_tensor",
                "eye", "linspace", "sym_int", "sym_float", "sym_max", "sym_min", "sym_not", "sym_ite",
                "sym_sum", "_sym_sqrt", "_C._set_grad_enabled", "_C._log_api_usage_once")
_TENSOR_EXTRA = ("new_ones", "new_zeros", "new_full", "new_empty", "new_tensor")  # factories on a tensor
_OPERATORS = ("getitem", "setitem", "add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "neg",
              "pos", "abs", "eq", "ne", "lt", "le", "gt", "ge", "and_", "or_", "xor", "not_", "invert",
              "lshift", "rshift", "matmul", "index", "truth", "is_", "is_not", "contains", "iadd", "isub",
              "imul", "itruediv", "ifloordiv", "imod", "ipow", "iand", "ior", "ixor", "imatmul")
_MATH = ("sqrt", "floor", "ceil", "trunc", "log", "log2", "exp", "isfinite", "isinf", "isnan")
# Tensor math that leaves tensors (arrays, storages, pointers, classes, strings) or reaches outside the graph.
_LEAVING = frozenset({"numpy", "tolist", "storage", "untyped_storage", "data_ptr", "const_data_ptr",
                      "storage_type", "type", "share_memory_", "pin_memory", "register_hook",
                      "register_post_accumulate_grad_hook", "backward", "retain_grad", "requires_grad_",
                      "apply_", "map_", "map2_", "set_", "resize_", "resize_as_", "record_stream",
                      "module_load", "dim_order"})
# An in-place write must land in memory the graph allocated: a result of these, or a view of one.
_FRESH = frozenset({"clone", "empty", "zeros", "ones", "full", "empty_like", "zeros_like", "ones_like",
                    "full_like", "arange", "tensor", "scalar_tensor", "empty_strided", "eye", "linspace",
                    *_TENSOR_EXTRA})


class GraphFormatError(Exception):
    """The graph cannot be written as JSON, or a file does not hold a graph this module wrote."""


def dump(graph: fx.Graph) -> list[dict[str, Any]]:
    """The nodes of `graph`, in order, as JSON values."""
    out = []
    for node in graph.nodes:
        if node.op not in _NODE_OPS:
            raise GraphFormatError(f"a {node.op} node ({node.target}) refers to a module attribute")
        out.append({"op": node.op, "name": node.name, "target": _target(node),
                    "args": _value(node.args), "kwargs": _value(dict(node.kwargs))})
    _check_writes(graph)
    return out


def load(nodes: list[dict[str, Any]]) -> fx.GraphModule:
    """The graph module `dump` described; GraphFormatError on anything it would not write."""
    graph = fx.Graph()
    env: dict[str, fx.Node] = {}
    try:
        for entry in nodes:
            op, name = entry["op"], entry["name"]
            if op not in _NODE_OPS or not isinstance(name, str) or name in env:
                raise GraphFormatError(f"bad node {name!r} ({op!r})")
            target = _resolve(op, entry["target"], name)
            args, kwargs = _load_value(entry["args"], env), _load_value(entry["kwargs"], env)
            if not isinstance(args, tuple) or not isinstance(kwargs, dict):
                raise GraphFormatError(f"bad arguments of node {name!r}")
            if op == "call_method":  # torch.Tensor's own method: a receiver that is no tensor fails
                op, target = "call_function", getattr(torch.Tensor, target)
            node = graph.create_node(op, target, args, kwargs, name)
            if node.name != name:
                raise GraphFormatError(f"node name {name!r} is not usable")
            env[name] = node
        graph.lint()
        _check_writes(graph)
    except (KeyError, TypeError, ValueError, AttributeError, RuntimeError, RecursionError) as e:
        raise GraphFormatError(f"{type(e).__name__}: {e}") from None
    return fx.GraphModule(torch.nn.Module(), graph)


def _target(node: fx.Node) -> Any:
    t = node.target
    if node.op == "call_method" and t not in _methods():
        raise GraphFormatError(f"the method {t!r} is not among those a cached graph may call")
    if node.op in ("placeholder", "output", "call_method"):
        return t
    if isinstance(t, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
        name = t._schema.name if isinstance(t, torch._ops.OpOverload) else t._qualified_op_name
        namespace, _, op = name.partition("::")
        overload = t._overloadname if isinstance(t, torch._ops.OpOverload) else None
        if not _op_allowed(t):
            raise GraphFormatError(f"the operator {name} is not among those a cached graph may call")
        return {"op": [namespace, op, overload]}
    name = getattr(t, "__name__", None)
    for space, where in NAMESPACES.items():
        if isinstance(name, str) and getattr(where, name, None) is t and _callable(t):
            return {"fn": [space, name]}
    raise GraphFormatError(f"the call target {t!r} is not among the functions a cached graph may name")


def _resolve(op: str, target: Any, name: str) -> Any:
    if op in ("placeholder", "output", "call_method"):
        if not isinstance(target, str) or not target.isidentifier() \
                or op == "call_method" and target not in _methods():
            raise GraphFormatError(f"bad target of node {name!r}: {target!r}")
        return target
    if isinstance(target, dict) and "op" in target:
        namespace, opname, overload = target["op"]
        packet = getattr(getattr(torch.ops, _identifier(namespace)), _identifier(opname))
        found = packet if overload is None else getattr(packet, _identifier(overload))
        if isinstance(found, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)) and _op_allowed(found):
            return found
    elif isinstance(target, dict) and "fn" in target:
        space, fname = target["fn"]
        found = getattr(NAMESPACES[space], _identifier(fname), None)
        if _callable(found):
            return found
    raise GraphFormatError(f"node {name!r} calls something a cached graph may not name: {target!r}")


def _callable(target: Any) -> bool:
    try:
        return target in _functions()
    except TypeError:  # unhashable
        return False


def _op_allowed(op: torch._ops.OpOverload | torch._ops.OpOverloadPacket) -> bool:
    """Our own operators (`ivx::`), and the aten operators of tensor math (torch.add's aten::add)."""
    packet = op.overloadpacket if isinstance(op, torch._ops.OpOverload) else op
    namespace, _, name = packet._qualified_op_name.partition("::")
    return namespace == "ivx" or namespace == "aten" and (
        _callable(getattr(torch, name, None)) or name in _methods())


def _check_writes(graph: fx.Graph) -> None:
    """An in-place op may write only to memory the graph allocated itself (a clone, a factory's
    result, or a view of one), never to an input: inputs include the model's own weights."""
    for node in graph.nodes:
        if node.op not in ("call_function", "call_method") or not writes_in_place(node):
            continue
        base = node.args[0] if node.args else None
        if "out" in node.kwargs:
            base = node.kwargs["out"]
        while isinstance(base, fx.Node) and _name(base) in VIEWS and base.args:
            base = base.args[0]
        if not (isinstance(base, fx.Node) and base.op != "placeholder" and _name(base) in _FRESH):
            raise GraphFormatError(f"node {node.name!r} writes in place to memory the graph did not allocate")


def _name(node: fx.Node) -> str:
    return node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")


@functools.cache
def _overridable() -> tuple[Any, ...]:
    """Tensor math: the functions and methods torch lets a tensor subclass override, public ones."""
    return tuple(f for fs in torch.overrides.get_overridable_functions().values() for f in fs
                 if callable(f) and not isinstance(f, type) and not getattr(f, "__name__", "_").startswith("_")
                 and f.__name__ not in _LEAVING)


@functools.cache
def _functions() -> frozenset[Any]:
    """Every function a graph may call by name."""
    extra = [functools.reduce(getattr, name.split("."), torch) for name in _TORCH_EXTRA]
    return frozenset([*_overridable(), *extra, *_CLASSES,
                      *(getattr(operator, n) for n in _OPERATORS), *(getattr(math, n) for n in _MATH),
                      ops.call])  # the spliced ops that are no plain torch function


@functools.cache
def _methods() -> frozenset[str]:
    """The method names a graph may call: tensor math's."""
    return frozenset([*(f.__name__ for f in _overridable() if getattr(torch.Tensor, f.__name__, None) is f),
                      *_TENSOR_EXTRA])


def _identifier(text: Any) -> str:
    if not isinstance(text, str) or not text.isidentifier() or text.startswith("__"):
        raise GraphFormatError(f"not a plain name: {text!r}")
    return text


def _value(v: Any) -> Any:
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    if isinstance(v, fx.Node):
        return {"node": v.name}
    if isinstance(v, torch.Size):
        return {"size": [_value(x) for x in v]}
    if isinstance(v, tuple):
        return {"tuple": [_value(x) for x in v]}
    if isinstance(v, list):
        return {"list": [_value(x) for x in v]}
    if isinstance(v, dict) and all(isinstance(k, str) for k in v):
        return {"dict": [[k, _value(x)] for k, x in v.items()]}
    if isinstance(v, slice):
        return {"slice": [_value(v.start), _value(v.stop), _value(v.step)]}
    if v is Ellipsis:
        return {"ellipsis": True}
    if isinstance(v, torch.dtype):
        return {"dtype": str(v).removeprefix("torch.")}
    if isinstance(v, torch.device):
        return {"device": str(v)}
    if isinstance(v, torch.layout):
        return {"layout": str(v).removeprefix("torch.")}
    if isinstance(v, torch.memory_format):
        return {"memory_format": str(v).removeprefix("torch.")}
    raise GraphFormatError(f"a graph argument of type {type(v).__name__} cannot be written as JSON")


_TORCH_CONSTANTS = {"dtype": torch.dtype, "layout": torch.layout, "memory_format": torch.memory_format}


def _load_value(v: Any, env: dict[str, fx.Node]) -> Any:
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    if not isinstance(v, dict) or len(v) != 1:
        raise GraphFormatError(f"bad value {v!r}")
    (tag, body), = v.items()
    if tag == "node":
        return env[body]
    if tag in ("size", "tuple", "list"):
        items = [_load_value(x, env) for x in body]
        return torch.Size(items) if tag == "size" else tuple(items) if tag == "tuple" else items
    if tag == "dict":
        return {str(k): _load_value(x, env) for k, x in body}
    if tag == "slice":
        return slice(*(_load_value(x, env) for x in body))
    if tag == "ellipsis":
        return Ellipsis
    if tag == "device":
        return torch.device(str(body))
    if tag in _TORCH_CONSTANTS:
        found = getattr(torch, _identifier(body), None)
        if isinstance(found, _TORCH_CONSTANTS[tag]):
            return found
    raise GraphFormatError(f"bad value {v!r}")
