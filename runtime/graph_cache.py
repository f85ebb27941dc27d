"""Compiled graphs kept on disk: a second process runs the graph the first one captured, without
dynamo's capture (~12 s for SmolLM2 on a CPU).

An entry is written after a compiled call in `graph` mode and holds: the spliced graph (as JSON,
compiler/graph_json.py); where each of its inputs comes from in a call (an argument, a parameter
or buffer of the model by name, a size of an argument); the shape conditions dynamo's capture
assumed; and how the model's output and the saves are rebuilt from the graph's outputs.

It is used only where everything the capture specialised on is equal (`key`): the entry format,
the torch, transformers and Python versions, the source of the compiler (this package's
`compiler/` and the compiled runtime), the model's structure (`structure`: module classes and
paths, their plain attributes and training flags, the config, every parameter's and buffer's
name, shape, dtype and device), the program's structural hash, the mode, the batch layout and
shape bucket, the argument values that are not tensors, and the program parameters' shapes and
dtypes. Every call checks the entry's shape conditions (fixed sizes, sizes that must be equal,
dynamo's guards on the symbolic sizes); a call they reject captures afresh. Nothing is kept or
used for a model with hooks other than ours or a patched `forward` (dynamo traces them, and they
cannot be fingerprinted), under autocast, or for a capture that changed the model's attributes
(dynamo replays such side effects; the graph alone would not). The shared-prefix schedule's
growth hooks are traced into the graph; the layout tensors they read are inputs found by field
and index on the layout of the call (runtime/shared_prefix.py), and everything else they read is
a function of the schedule and the batch layout, both in the key.

Trust: the directory is trusted as the virtual environment is. Loading runs no pickle and no
`eval`, and a directory or file that another user could have written is not read.
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import hashlib
import json
import os
import re
import sys
import warnings
from functools import cache
from pathlib import Path
from typing import Any

import sympy
import torch
from torch.utils import _pytree as pytree

from compiler import graph_json
from compiler.splice import Slot, Spliced
from runtime.files import atomic_write_text, cache_root
from runtime.shared_prefix import Layout

FORMAT = 1
_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
_GLOBAL_HOOKS = ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
                 "_global_backward_pre_hooks")
_ARG = re.compile(r"L\['args'\]\[(\d+)\]$")
_KWARG = re.compile(r"L\['kwargs'\]\['(\w+)'\]$")
_SIZE = re.compile(r"(.+)\.size\(\)\[(\d+)\]$")
# a parameter or buffer: L['module'], submodule steps, then the tensor (dynamo writes either form)
_MODULE_STEP = re.compile(r"(?:\._modules|\.__dict__\['_modules'\])\['(\w+)'\]")
# a tensor of the shared-prefix layout, read by a growth hook: <hook>.__closure__[0].cell_contents.active<steps>
_PLAN = re.compile(r"L\['module'\].*\._forward(?:_pre)?_hooks\[.*\]\.__closure__\[0\]\.cell_contents\.active(?=[.\[])")
_PLAN_STEP = re.compile(r"\.(\w+)|\[((?:[^\[\]'\"]|'[^']*'|\"[^\"]*\")*)\]")
_STATE_STEP = re.compile(r"(?:\._(parameters|buffers)|\.__dict__\['_(parameters|buffers)'\])\['(\w+)'\]$")
_LAYOUT_FIELDS = frozenset(f.name for f in dataclasses.fields(Layout))
_RELATIONS = {sympy.Eq: "==", sympy.Ne: "!=", sympy.Lt: "<", sympy.Le: "<=", sympy.Gt: ">", sympy.Ge: ">="}
_COMPARE = {"==": int.__eq__, "!=": int.__ne__, "<": int.__lt__, "<=": int.__le__, ">": int.__gt__,
            ">=": int.__ge__}


class Uncacheable(Exception):
    """This capture cannot be kept on disk; the message says why."""


def directory() -> Path | None:
    """Where graphs are kept: `$IVX_GRAPH_CACHE`, else `$INTERP_DSL_CACHE/graphs`; None when
    `IVX_GRAPH_CACHE` is `off`."""
    setting = os.environ.get("IVX_GRAPH_CACHE", "")
    if setting.lower() in ("off", "0", "no", "false"):
        return None
    return Path(setting) if setting else cache_root() / "graphs"


def structure(module: torch.nn.Module, ours: set[int]) -> tuple[Any, ...]:
    """What a captured forward may depend on besides tensor values (see the module docstring),
    as a value to compare (cheap: ~1 ms for SmolLM2) and to `digest`. Uncacheable when a hook
    other than ours (hook ids in `ours`) or a patched `forward` would be traced, or under autocast."""
    for name in _GLOBAL_HOOKS:
        if getattr(torch.nn.modules.module, name, None):
            raise Uncacheable("a global module hook is registered")
    if torch.is_autocast_enabled("cpu") or torch.is_autocast_enabled("cuda"):
        raise Uncacheable("autocast is on")
    config = getattr(module, "config", None)
    parts: list[Any] = [_attributes(vars(config)) if config is not None else None]
    for path, m in module.named_modules(remove_duplicate=False):
        attributes = m.__dict__
        if "forward" in attributes:
            raise Uncacheable(f"{path or 'the model'} has a patched forward")
        for name in _HOOK_DICTS:
            hooks = attributes.get(name)
            if hooks and not hooks.keys() <= ours:
                raise Uncacheable(f"{path or 'the model'} has a hook that is not interp_dsl's")
        parts.append((path, type(m).__module__, type(m).__qualname__, _attributes(attributes),
                      _attributes(attributes["_parameters"]), _attributes(attributes["_buffers"])))
    return tuple(parts)


def digest(snapshot: tuple[Any, ...]) -> str:
    """A hash of a `structure` snapshot, equal across processes for equal models."""
    return hashlib.sha256(repr(snapshot).encode()).hexdigest()


def key(parts: dict[str, Any]) -> str:
    """The file name of an entry: a hash of everything it specialised on (see `structure`)."""
    blob = json.dumps({"format": FORMAT, "versions": _versions(), **parts}, sort_keys=True, default=repr)
    return hashlib.sha256(blob.encode()).hexdigest()


def describe_capture(gm: torch.fx.GraphModule, spliced: Spliced, shape_env: Any) -> dict[str, Any] | None:
    """What a later process needs to run `spliced` without capturing: the graph, its inputs'
    recipes, and the shape conditions. `gm` is dynamo's graph (its placeholders are the first
    of `spliced`'s). None when anything cannot be written down: keeping a graph is never a
    reason for a compiled call to fail."""
    try:
        return _describe_capture(gm, spliced, shape_env)
    except Exception:
        return None


def _describe_capture(gm: torch.fx.GraphModule, spliced: Spliced, shape_env: Any) -> dict[str, Any]:
    graph = graph_json.dump(spliced.module.graph)
    inputs = [_input(node, shape_env) for node in gm.graph.nodes if node.op == "placeholder"]
    placeholders = [n for n in spliced.module.graph.nodes if n.op == "placeholder"]
    extra = [_shape(n.meta.get("example_value"), shape_env) for n in placeholders[len(inputs):]]
    symbols = sorted({d for i in inputs for d in i.get("shape", []) if isinstance(d, str)}
                     | {i["symbol"] for i in inputs if "symbol" in i}
                     | {d for shape in extra for d in shape if isinstance(d, str)})
    return {
        "graph": graph, "inputs": inputs, "extra_shapes": extra,
        "ranges": {s: _range(shape_env, s) for s in symbols},
        "guards": _guards(shape_env, set(symbols)),
        "n_outputs": spliced.n_outputs, "extra": [list(e) for e in spliced.extra],
        "saves": [{"name": name, "vid": vid, "spec": pytree.treespec_dumps(spec),
                   "template": [None if isinstance(t, Slot) else {"const": _const(t)} for t in template]}
                  for name, vid, spec, template in spliced.saves],
        "inserted": {str(at): [n.name for n in nodes] for at, nodes in spliced.inserted.items()},
        "anchors": {str(at): n.name for at, n in spliced.anchors.items()},
    }


def describe_output(output: Any, graph_outputs: list[Any]) -> dict[str, Any] | None:
    """How the model's output is rebuilt from the graph's outputs (dynamo's bytecode did it);
    None where it cannot be written down."""
    try:
        return _describe_output(output, graph_outputs)
    except Exception:
        return None


def _describe_output(output: Any, graph_outputs: list[Any]) -> dict[str, Any]:
    leaves, spec = pytree.tree_flatten(output)
    out = []
    for leaf in leaves:
        if isinstance(leaf, torch.Tensor):
            index = next((k for k, g in enumerate(graph_outputs) if g is leaf), None)
            if index is None:
                raise Uncacheable("an output tensor is not one of the graph's outputs")
            out.append({"out": index})
        else:
            out.append({"const": _const(leaf)})
    return {"spec": pytree.treespec_dumps(spec), "leaves": out}


class Entry:
    """A graph loaded from disk, ready to run."""

    def __init__(self, data: dict[str, Any]):
        self.spliced = _spliced(data)
        self.inputs = data["inputs"]
        self.extra_shapes = data["extra_shapes"]
        self.ranges = {s: tuple(r) for s, r in data["ranges"].items()}
        self.guards = [tuple(g) for g in data["guards"]]
        self.output_spec = pytree.treespec_loads(data["output"]["spec"])
        self.output_leaves = data["output"]["leaves"]

    def arguments(self, module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any],
                  extra: list[torch.Tensor], plan: Any = None) -> list[Any] | None:
        """The graph's inputs for this call, before `extra` (the program's values; `plan`: the
        call's shared-prefix layout, if any); None when a shape condition does not hold."""
        sizes: dict[str, int] = {}
        values = []
        if len(extra) != len(self.extra_shapes) or not all(
                _fits(want, t.shape, sizes) for want, t in zip(self.extra_shapes, extra, strict=True)):
            return None
        for recipe in self.inputs:
            if "state" in recipe:
                values.append(module.get_parameter(recipe["state"]) if recipe["param"]
                              else module.get_buffer(recipe["state"]))
                continue
            if "of" in recipe:  # a size of an argument
                of = _argument(recipe["of"], args, kwargs)
                if not isinstance(of, torch.Tensor) or of.dim() <= recipe["dim"]:
                    return None
                value = of.size(recipe["dim"])
                if not _fits([recipe.get("symbol", recipe.get("size"))], torch.Size([value]), sizes):
                    return None
                values.append(value)
                continue
            if "plan" in recipe:
                t = _plan_value(plan, recipe["plan"]) if plan is not None else None
            else:
                t = _argument(recipe, args, kwargs)
            if (not isinstance(t, torch.Tensor) or str(t.dtype) != recipe["dtype"]
                    or t.device.type != recipe["device"] or t.dim() != len(recipe["shape"])):
                return None
            if not _fits(recipe["shape"], t.shape, sizes):
                return None
            values.append(t)
        for symbol, (low, high) in self.ranges.items():
            if symbol not in sizes or sizes[symbol] < low or (high is not None and sizes[symbol] > high):
                return None
        if not all(_COMPARE[op](sizes[s], v) for s, op, v in self.guards):
            return None
        return values

    def output(self, graph_outputs: list[Any]) -> Any:
        leaves = [graph_outputs[leaf["out"]] if "out" in leaf else leaf["const"] for leaf in self.output_leaves]
        return pytree.tree_unflatten(leaves, self.output_spec)


def _fits(want: list[int | str], have: torch.Size, sizes: dict[str, int]) -> bool:
    """Sizes `have` match `want` (numbers equal, a symbol the same size everywhere); binds symbols."""
    if len(want) != len(have):
        return False
    for w, h in zip(want, have, strict=True):
        if (isinstance(w, int) and w != h) or (isinstance(w, str) and sizes.setdefault(w, h) != h):
            return False
    return True


_KEY = re.compile(r"[0-9a-f]{64}")  # the names `key` gives


class GraphCache:
    """The entries in one directory, by key; at most `limit` of them (the least recently used
    go first: a file's modification time is refreshed when it is read)."""

    def __init__(self, root: Path, limit: int = 256):
        self.root, self.limit = root, limit
        self._warned = False

    def load(self, name: str) -> Entry | None:
        path = self.root / f"{name}.json"
        try:
            if not path.exists() or not self._trusted(path):
                return None
            data = json.loads(path.read_text())
            if data.get("key") != name:
                return None
            entry = Entry(data)
        except OSError:  # unreadable, or pruned by another process meanwhile
            return None
        except (ValueError, KeyError, TypeError, IndexError, AttributeError, RecursionError,
                graph_json.GraphFormatError):
            return None  # a damaged or foreign file: capture afresh (and overwrite it)
        with contextlib.suppress(OSError):  # a read-only disk still serves its graphs
            path.touch()
        return entry

    def save(self, name: str, data: dict[str, Any]) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
            if self._trusted(self.root):
                atomic_write_text(self.root / f"{name}.json", json.dumps({"key": name, **data}))
                self._prune()
        except OSError as e:  # a full or read-only disk costs the next process a capture, nothing more
            self._warn(f"cannot keep compiled graphs in {self.root}: {e}")

    def _prune(self) -> None:
        entries = []
        for path in self.root.glob("*.json"):
            if not _KEY.fullmatch(path.stem):
                continue  # not ours: a directory shared with other files loses none of them
            try:
                entries.append((path.stat().st_mtime_ns, path))
            except FileNotFoundError:  # another process pruned it first
                pass
        for _, path in sorted(entries)[:max(0, len(entries) - self.limit)]:
            path.unlink(missing_ok=True)

    def _trusted(self, path: Path) -> bool:
        for p in (path, path.parent) if path.is_file() else (path,):
            st = p.stat()
            if st.st_uid != os.getuid() or st.st_mode & 0o022:
                self._warn(f"{p} may be written by other users; compiled graphs there are not used "
                           "(chmod go-w it, or set IVX_GRAPH_CACHE to a directory of your own)")
                return False
        return True

    def _warn(self, text: str) -> None:
        if not self._warned:
            self._warned = True
            warnings.warn(text, RuntimeWarning, stacklevel=2)


def _input(node: torch.fx.Node, shape_env: Any) -> dict[str, Any]:
    grapharg = node.meta.get("grapharg")
    source = getattr(grapharg, "source", None)
    name = getattr(source, "name", None)
    name = name() if callable(name) else name
    example = node.meta.get("example_value")
    if not isinstance(name, str):
        raise Uncacheable(f"graph input {node.name} has no source")
    if state := _state(name):
        return state
    plan = _PLAN.match(name)
    if m := _SIZE.match(name):
        of = _tensor_source(m.group(1))
        size = _size(example, shape_env)
        return {"symbol" if isinstance(size, str) else "size": size, "of": of, "dim": int(m.group(2))}
    if not isinstance(example, torch.Tensor):
        raise Uncacheable(f"graph input {name} is not a tensor")
    shape = _shape(example, shape_env)
    source = {"plan": _plan_steps(name[plan.end():])} if plan is not None else _tensor_source(name)
    return {**source, "dtype": str(example.dtype), "device": example.device.type, "shape": shape}


def _state(name: str) -> dict[str, Any] | None:
    """{"state": dotted path, "param": bool} for a parameter's or buffer's source, else None."""
    if not name.startswith("L['module']"):
        return None
    at, path = len("L['module']"), []
    while m := _MODULE_STEP.match(name, at):
        path.append(m.group(1))
        at = m.end()
    m = _STATE_STEP.match(name, at)
    if m is None:
        return None
    return {"state": ".".join([*path, m.group(3)]), "param": "parameters" in (m.group(1), m.group(2))}


def _plan_steps(text: str) -> list[Any]:
    """`.grow[('model.layers.1', 'post', 0)]` -> [["attr", "grow"], ["item", ["model.layers.1", "post", 0]]]."""
    steps, at = [], 0
    while at < len(text):
        m = _PLAN_STEP.match(text, at)
        if m is None:
            raise Uncacheable(f"a layout source {text!r} is not attributes and literal indices")
        steps.append(["attr", m.group(1)] if m.group(1) else ["item", _literal(ast.literal_eval(m.group(2)))])
        at = m.end()
    return steps


def _literal(key: Any) -> Any:
    if isinstance(key, tuple):
        return {"tuple": [_literal(k) for k in key]}
    if isinstance(key, (int, str)):
        return key
    raise Uncacheable(f"a layout index {key!r} is not a number, a string or a tuple of them")


def _from_literal(key: Any) -> Any:
    if isinstance(key, dict):
        return tuple(_from_literal(k) for k in key["tuple"])
    if isinstance(key, (int, str)):
        return key
    raise ValueError(f"bad index {key!r}")


def _plan_value(plan: Any, steps: list[Any]) -> Any:
    """Walk `steps` from the layout: its own fields, then indices into them; nothing else."""
    value = plan
    for kind, what in steps:
        if kind == "attr":
            if value is not plan or what not in _LAYOUT_FIELDS:
                raise ValueError(f"the layout has no field {what!r}")
            value = getattr(plan, what)
        elif isinstance(value, (dict, list, tuple)):
            value = value[_from_literal(what)]
        else:
            raise ValueError(f"cannot index a {type(value).__name__}")
    return value


def _shape(example: Any, shape_env: Any) -> list[int | str]:
    """A fake tensor's sizes: numbers, or the names of the symbols dynamo gave them."""
    if not isinstance(example, torch.Tensor):
        raise Uncacheable("a graph input is not a tensor")
    return [d if isinstance(d, int) else _size(d, shape_env) for d in example.shape]


def _tensor_source(name: str) -> dict[str, Any]:
    if m := _ARG.match(name):
        return {"arg": int(m.group(1))}
    if m := _KWARG.match(name):
        return {"kwarg": m.group(1)}
    raise Uncacheable(f"graph input {name} is not an argument, parameter or buffer of the model")


def _argument(recipe: dict[str, Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    if "arg" in recipe:
        return args[recipe["arg"]] if recipe["arg"] < len(args) else None
    return kwargs.get(recipe["kwarg"])


def _size(value: Any, shape_env: Any) -> int | str:
    """A size as a number, or the name of its (backed, unreplaced) symbol."""
    expr = value.node.expr if isinstance(value, torch.SymInt) else None
    expr = shape_env.simplify(expr) if expr is not None and shape_env is not None else expr
    if isinstance(expr, sympy.Integer):
        return int(expr)
    if not isinstance(expr, sympy.Symbol) or not expr.name.startswith("s"):
        raise Uncacheable(f"a size {value} is not a plain symbol")
    return expr.name


def _range(shape_env: Any, symbol: str) -> list[int | None]:
    vr = next(v for s, v in shape_env.var_to_range.items() if s.name == symbol)
    low = int(vr.lower) if isinstance(vr.lower, sympy.Integer) else 0
    return [low, int(vr.upper) if isinstance(vr.upper, sympy.Integer) else None]


def _guards(shape_env: Any, symbols: set[str]) -> list[list[Any]]:
    """dynamo's guards on sizes, each as (symbol, relation, integer); Uncacheable otherwise."""
    out = []
    for guard in shape_env.guards:
        expr = shape_env.simplify(guard.expr)
        if expr in (sympy.true, True):
            continue
        relation = _RELATIONS.get(type(expr))
        lhs, rhs = (expr.lhs, expr.rhs) if relation else (None, None)
        if isinstance(rhs, sympy.Symbol) and isinstance(lhs, sympy.Integer):
            lhs, rhs, relation = rhs, lhs, {"<": ">", "<=": ">=", ">": "<", ">=": "<="}.get(relation, relation)
        if not (isinstance(lhs, sympy.Symbol) and isinstance(rhs, sympy.Integer) and lhs.name in symbols):
            raise Uncacheable(f"a shape guard is not a bound on one size: {guard.expr}")
        out.append([lhs.name, relation, int(rhs)])
    return out


def _spliced(data: dict[str, Any]) -> Spliced:
    module = graph_json.load(data["graph"])
    by_name = {n.name: n for n in module.graph.nodes}
    saves = [(s["name"], int(s["vid"]), pytree.treespec_loads(s["spec"]),
              [Slot() if t is None else t["const"] for t in s["template"]]) for s in data["saves"]]
    return Spliced(module, int(data["n_outputs"]), [tuple(e) for e in data["extra"]], saves,
                   {int(at): [by_name[n] for n in names] for at, names in data["inserted"].items()},
                   {int(at): by_name[n] for at, n in data["anchors"].items()})


_PLAIN = frozenset({bool, int, float, str, type(None), torch.dtype})
_CONTAINERS = frozenset({tuple, list, dict})
_MODULE_INTERNALS = frozenset(vars(torch.nn.Module()).keys()) - {"training"}  # hooks, submodules...
_TENSORS = frozenset({torch.Tensor, torch.nn.Parameter, torch.nn.Buffer})


def _attributes(attributes: dict[str, Any]) -> tuple[Any, ...]:
    """The values that are numbers, strings, dtypes, or tuples, lists and dicts of them, and
    the signatures of the tensors (one pass: this runs on every module at every call)."""
    out = []
    for k, v in attributes.items():
        kind = type(v)
        if k in _MODULE_INTERNALS:
            continue
        if kind in _PLAIN:
            out.append((k, v))
        elif kind in _TENSORS or (kind not in _CONTAINERS and isinstance(v, torch.Tensor)):
            out.append((k, tensor_signature(v)))
        elif kind in _CONTAINERS and _plain_container(v):
            out.append((k, v))
    return tuple(out)


def _plain_container(v: Any) -> bool:
    if type(v) is dict:
        return all(type(x) in _PLAIN for x in v.values()) and all(type(x) in _PLAIN for x in v)
    return all(type(x) in _PLAIN for x in v)


def _const(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise Uncacheable(f"a value of type {type(value).__name__} cannot be written down")


def tensor_signature(t: torch.Tensor) -> tuple[Any, ...]:
    """What a graph may specialise on in a tensor input: shape, dtype, device, requires_grad."""
    return (t.shape, t.dtype, t.device, t.requires_grad)


@cache
def _versions() -> dict[str, str]:
    """torch, transformers, Python, and a hash of the source that builds graphs."""
    import transformers
    root = Path(__file__).resolve().parent.parent
    h = hashlib.sha256()
    for path in sorted((root / "compiler").glob("*.py")) + [root / "runtime" / "compiled.py",
                                                          root / "runtime" / "graph_cache.py"]:
        h.update(path.name.encode() + path.read_bytes())
    return {"torch": torch.__version__, "transformers": transformers.__version__,
            "python": sys.version.split()[0], "source": h.hexdigest()}
