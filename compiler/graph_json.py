"""An fx graph as plain JSON, and back: how compiled graphs are kept on disk (runtime/graph_cache.py).

Loading runs no pickle and no `eval`. A node's target is a tensor method name, an operator
registered in `torch.ops`, or a function looked up by plain name in one of the namespaces below
(torch, its functional modules, `operator`, `math`, `compiler.ops`); a file naming anything else
does not load. Arguments are numbers, strings, dtypes, devices, slices, containers of these, and
other nodes of the same graph.
"""

from __future__ import annotations

import math
import operator
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F

from compiler import ops

NAMESPACES: dict[str, Any] = {
    "torch": torch, "torch.nn.functional": F, "torch._C._nn": torch._C._nn, "torch._C": torch._C,
    "torch._C.TensorBase": torch._C.TensorBase, "torch.Tensor": torch.Tensor,
    "torch.special": torch.special, "torch.linalg": torch.linalg, "torch.fft": torch.fft,
    "operator": operator, "math": math, "compiler.ops": ops,
}
_NODE_OPS = ("placeholder", "call_function", "call_method", "output")
_CLASSES = (torch.Size,)  # the classes a graph may call (other classes could run arbitrary __init__)


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
            node = graph.create_node(op, target, args, kwargs, name)
            if node.name != name:
                raise GraphFormatError(f"node name {name!r} is not usable")
            env[name] = node
        graph.lint()
    except (KeyError, TypeError, ValueError, AttributeError, RuntimeError) as e:
        raise GraphFormatError(f"{type(e).__name__}: {e}") from None
    return fx.GraphModule(torch.nn.Module(), graph)


def _target(node: fx.Node) -> Any:
    t = node.target
    if node.op in ("placeholder", "output", "call_method"):
        return t
    if isinstance(t, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
        name = t._schema.name if isinstance(t, torch._ops.OpOverload) else t._qualified_op_name
        namespace, _, op = name.partition("::")
        overload = t._overloadname if isinstance(t, torch._ops.OpOverload) else None
        return {"op": [namespace, op, overload]}
    name = getattr(t, "__name__", None)
    for space, where in NAMESPACES.items():
        if isinstance(name, str) and getattr(where, name, None) is t and _callable(t):
            return {"fn": [space, name]}
    raise GraphFormatError(f"the call target {t!r} is not in the namespaces a cached graph may name")


def _resolve(op: str, target: Any, name: str) -> Any:
    if op in ("placeholder", "output", "call_method"):
        if not isinstance(target, str) or not target.isidentifier():
            raise GraphFormatError(f"bad target of node {name!r}")
        return target
    if isinstance(target, dict) and "op" in target:
        namespace, opname, overload = target["op"]
        packet = getattr(getattr(torch.ops, _identifier(namespace)), _identifier(opname))
        found = packet if overload is None else getattr(packet, _identifier(overload))
        if isinstance(found, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
            return found
    elif isinstance(target, dict) and "fn" in target:
        space, fname = target["fn"]
        found = getattr(NAMESPACES[space], _identifier(fname), None)
        if _callable(found):
            return found
    raise GraphFormatError(f"node {name!r} calls something a cached graph may not name: {target!r}")


def _callable(target: Any) -> bool:
    return callable(target) and (not isinstance(target, type) or target in _CLASSES)


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
