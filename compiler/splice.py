"""The splice pass: a typed program and a captured forward graph in, one patched graph out.

The captured graph (from dynamo, with `ivx::site` markers at the program's sites) is copied, never
mutated. In the copy each marker becomes its input (or a `clone` of it, where the site is
written or the model changes the value in place later); each op of the program
becomes graph nodes right after its event's markers, in program order; a `write` re-routes the
model's later uses of the site to the new value; reads that are saved become extra outputs after
the model's own; params and weights become extra inputs after the graph's own. What runs is then
exactly what the reference interpreter runs at its hooks, with the same functions from
`compiler.ops`, but as graph nodes that a compiler can fuse.
"""

from __future__ import annotations

import operator
import types as pytypes
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch.utils import _pytree as pytree

from compiler import ops
from compiler.check import BEFORE_FORWARD, TypedProgram
from compiler.ir import Op, Program
from compiler.markers import SITE_OP, site_key
from compiler.signatures import SiteTable

ExtraInput = tuple[str, str]  # ("param", name) or ("weight", dotted target)


class SpliceError(Exception):
    """The program cannot be spliced into this graph; the message names the reason."""


@dataclass
class Spliced:
    """A patched graph and how to call it: `module(*graph_inputs, *extra)` returns the model's
    `n_outputs` outputs followed by the saved leaves."""

    module: fx.GraphModule
    n_outputs: int
    extra: list[ExtraInput]
    saves: list[tuple[str, int, pytree.TreeSpec, list[Any]]]  # name, value id, spec, leaves
    inserted: dict[int, list[fx.Node]] = field(default_factory=dict)  # event -> our nodes
    anchors: dict[int, fx.Node] = field(default_factory=dict)  # event -> node after its markers

    def unflatten_saves(self, leaves: list[Any]) -> list[tuple[str, int, Any]]:
        """The saved values from the graph's extra outputs."""
        out, it = [], iter(leaves)
        for name, vid, spec, template in self.saves:
            values = [next(it) if isinstance(t, Slot) else t for t in template]
            out.append((name, vid, pytree.tree_unflatten(values, spec)))
        return out


class Slot:
    """Stands for a saved leaf that comes out of the graph."""


@dataclass(frozen=True)
class RowViews:
    """The program's rows live in a batch of other rows (the shared-prefix schedule,
    runtime/shared_prefix.py). Per event, extra inputs ("rows", name) hold: logical row ->
    physical row, and for writes the physical rows some logical row lives in, with one such
    logical row each. A site's per-row tensors are gathered into logical rows before the
    program's ops run there; what they write is scattered back."""

    logical: int  # rows of the batch the program was checked on
    events: dict[Any, tuple[str, str, str]]  # event -> names of (where, taken, owner)

    def inputs(self) -> list[ExtraInput]:
        return [("rows", name) for names in self.events.values() for name in names]


def extra_inputs(program: Program) -> list[ExtraInput]:
    """The values bound at run time, in the order the patched graph takes them."""
    out: list[ExtraInput] = []
    for op in program.ops:
        entry = ("param", op.target) if op.opcode == "param" else ("weight", op.target)
        if op.opcode in ("param", "weight") and entry not in out:
            out.append(entry)
    return out


def site_keys(typed: TypedProgram) -> frozenset[str]:
    """The marker keys the program needs."""
    return frozenset(site_key(typed.events[at][0], typed.events[at][1])
                     for at in set(typed.schedule) if at != BEFORE_FORWARD)


def splice(gm: fx.GraphModule, typed: TypedProgram, table: SiteTable, rows: tuple[slice, ...],
           batch: int, modules: torch.nn.Module, example_extra: list[Any], fake_mode: Any = None,
           views: RowViews | None = None) -> Spliced:
    """Patch a copy of `gm`. `rows` are the invokes' rows of a batch of `batch` (all of it
    when there is one invoke); `example_extra` are fake values for the extra inputs (the
    program's, then `views.inputs()`), in `fake_mode` (dynamo's), which also types the new nodes."""
    return _Splicer(gm, typed, table, rows, batch, modules, fake_mode, views).run(example_extra)


class _Splicer:
    def __init__(self, gm: fx.GraphModule, typed: TypedProgram, table: SiteTable,
                 rows: tuple[slice, ...], batch: int, modules: torch.nn.Module, fake_mode: Any,
                 views: RowViews | None = None):
        self.source, self.typed, self.table = gm, typed, table
        self.views = views
        self.physical: dict[fx.Node, fx.Node] = {}  # a logical view -> the physical node it gathers
        self.replaced: dict[fx.Node, fx.Node] = {}  # a site value -> what a write made the model use instead
        self.fake_mode = fake_mode
        self.rows, self.batch, self.modules = rows, batch, modules
        self.graph = fx.Graph()
        self.ours: set[fx.Node] = set()
        self.values: dict[int, Any] = {}
        self.live: dict[int, Any] = {}  # event -> the site's current value (pytree of nodes)
        self.submodules: dict[str, torch.nn.Module] = {}
        self.cursor: fx.Node | None = None
        self.fakes: dict[fx.Node, Any] = {}  # a site leaf's fake value (this call's shapes)
        self.event = BEFORE_FORWARD  # the event whose ops are being spliced
        self.event_of: dict[fx.Node, int] = {}  # our node -> its event, for explaining

    def run(self, example_extra: list[Any]) -> Spliced:
        outputs = self.graph.graph_copy(self.source.graph, {})
        single = not isinstance(outputs, (tuple, list))
        output = self.graph.output(outputs)  # made now, so re-routed uses reach it too
        old = [n for n in self.source.graph.nodes if n.op == "placeholder"]
        new = [n for n in self.graph.nodes if n.op == "placeholder"]
        for o, n in zip(old, new, strict=True):
            n._dynamo_source = getattr(o, "_dynamo_source", None)  # aot_autograd asks for it
        extra = extra_inputs(self.typed.program) + (self.views.inputs() if self.views else [])
        placeholders = self._add_inputs(new[-1] if new else None, extra, example_extra)
        self.inputs = dict(zip(extra, placeholders, strict=True))
        markers = self._markers()
        by_event: dict[int, list[Op]] = defaultdict(list)
        for op, at in zip(self.typed.program.ops, self.typed.schedule, strict=True):
            by_event[at].append(op)
        spliced = Spliced(fx.GraphModule({}, fx.Graph()), 0, extra, [])
        for at in sorted(by_event):
            if at == BEFORE_FORWARD:
                self.cursor = placeholders[-1] if placeholders else next(iter(self.graph.nodes))
            else:
                if at not in markers:
                    raise SpliceError(f"the captured graph has no marker for {self._event(at)}")
                # a value written at an earlier event (a layer's output, now the next one's input) is the written one
                self.live[at] = pytree.tree_map_only(fx.Node, self._current, markers[at])
                self.cursor = self._last_marker(self.live[at])
                spliced.anchors[at] = self.cursor
                if self.views is not None:
                    self.event = at
                    self.live[at] = self._logical(at, markers[at])
            self.event = at
            for op in by_event[at]:
                self._op(op, at, placeholders, extra, spliced)
        save_leaves = []
        for i, (name, vid, spec, template) in enumerate(spliced.saves):
            slots = []
            for leaf in template:
                if isinstance(leaf, fx.Node):
                    save_leaves.append(leaf)
                    slots.append(Slot())
                else:
                    slots.append(leaf)
            spliced.saves[i] = (name, vid, spec, slots)
        model_outputs = (output.args[0],) if single else tuple(output.args[0])
        spliced.n_outputs = len(model_outputs)
        stops = [at for op, at in zip(self.typed.program.ops, self.typed.schedule, strict=True)
                 if op.opcode == "stop"]
        if stops:
            model_outputs, cut = self._empty_outputs(min(stops), spliced, model_outputs)
        output.args = ((*model_outputs, *save_leaves),)
        if stops:
            self._drop_dead_after(cut)
        self.graph.lint()
        spliced.inserted = {at: [n for n in self.graph.nodes if self.event_of.get(n) == at] for at in by_event}
        alive = set(self.graph.nodes)
        spliced.anchors = {at: n for at, n in spliced.anchors.items() if n in alive}
        spliced.module = fx.GraphModule(self._root(), self.graph)
        return spliced

    def _empty_outputs(self, at: int, spliced: Spliced, outputs: tuple[Any, ...]) -> tuple[tuple[Any, ...], fx.Node]:
        """Early stop: the model's outputs become empty tensors (a stopped forward returns
        nothing), made right after the stop's event."""
        last = (spliced.inserted.get(at) or [spliced.anchors.get(at) or self.cursor])[-1]
        empties = []
        for value in outputs:
            if isinstance(value, fx.Node):
                with self.graph.inserting_after(last):
                    value = self.graph.call_function(torch.empty, (0,))
                self.ours.add(value)
            empties.append(value)
        return tuple(empties), last

    def _drop_dead_after(self, cut: fx.Node) -> None:
        """Drop the nodes after `cut` that feed nothing: the layers after an early stop."""
        order = {n: i for i, n in enumerate(self.graph.nodes)}
        for node in reversed(list(self.graph.nodes)):
            if order[node] > order[cut] and node.op not in ("output", "placeholder") and not node.users:
                self.graph.erase_node(node)

    # ---------------------------------------------------------------------------- structure
    def _add_inputs(self, last: fx.Node | None, extra: list[ExtraInput],
                    examples: list[Any]) -> list[fx.Node]:
        nodes: list[fx.Node] = []
        for (kind, name), example in zip(extra, examples, strict=True):
            anchor = nodes[-1] if nodes else last
            where = self.graph.inserting_after(anchor) if anchor is not None \
                else self.graph.inserting_before(next(iter(self.graph.nodes)))
            with where:
                node = self.graph.placeholder(f"ivx_{kind}_{name}".replace(".", "_"))
            node._dynamo_source = None
            node.meta["example_value"] = example
            nodes.append(node)
        return nodes

    def _markers(self) -> dict[int, Any]:
        """Event index -> the site's value rebuilt from marker nodes (each marker replaced by its
        input, or a clone of it) and the fake value's constant leaves."""
        written = {(site_key(*self.typed.events[at][:2]), self.typed.events[at][2])
                   for op, at in zip(self.typed.program.ops, self.typed.schedule, strict=True)
                   if op.opcode == "write"}
        calls: dict[tuple[str, int], int] = defaultdict(int)
        found: dict[tuple[str, int, int], fx.Node] = {}
        for node in list(self.graph.nodes):
            if node.op == "call_function" and node.target is SITE_OP:
                x, key, leaf = node.args
                n = calls[(key, leaf)]
                calls[(key, leaf)] += 1
                if (key, n) in written or _mutated(x):  # a copy of its own: only the site's users move
                    with self.graph.inserting_before(node):
                        copy = self.graph.call_function(torch.clone, (x,))
                    copy.meta = dict(node.meta)
                else:  # nothing changes x in place later: its value is the site's value
                    copy = x
                node.replace_all_uses_with(copy)
                self.graph.erase_node(node)
                found[(key, n, leaf)] = copy
        positions = {event: i for i, event in enumerate(self.typed.events)}
        values: dict[int, Any] = {}
        for event, index in positions.items():
            path, phase, call = event
            if event not in self.table.values:
                continue
            leaves, spec = pytree.tree_flatten(self.table.values[event])
            key = site_key(path, phase)
            if not any((key, call, i) in found for i in range(len(leaves))):
                continue
            rebuilt = [found.get((key, call, i), leaf) if isinstance(leaf, torch.Tensor) else leaf
                       for i, leaf in enumerate(leaves)]
            for node, leaf in zip(rebuilt, leaves, strict=True):
                if isinstance(node, fx.Node):
                    self.fakes[node] = leaf
            if any(isinstance(leaf, torch.Tensor) for leaf in rebuilt):
                raise SpliceError(f"a tensor of {path} ({phase}) is not marked in the captured graph")
            values[index] = pytree.tree_unflatten(rebuilt, spec)
        return values

    def _last_marker(self, value: Any) -> fx.Node:
        nodes = [leaf for leaf in pytree.tree_leaves(value) if isinstance(leaf, fx.Node)]
        order = {n: i for i, n in enumerate(self.graph.nodes)}
        return max(nodes, key=order.__getitem__)

    def _root(self) -> dict[str, Any]:
        root: dict[str, Any] = {}
        for node in self.graph.nodes:
            if node.op in ("get_attr", "call_module"):
                if node.target in self.submodules:
                    root[node.target] = self.submodules[node.target]
                else:
                    root[node.target] = _fetch(self.source, node.target)
        return root

    def _event(self, at: int) -> str:
        path, phase, call = self.typed.events[at]
        return f"{path or 'the model'} ({phase}, call {call})"

    # ---------------------------------------------------------------------------------- ops
    def _node(self, kind: str, target: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> fx.Node:
        assert self.cursor is not None
        with self.graph.inserting_after(self.cursor):
            node = self.graph.create_node(kind, target, args, kwargs)
        self.cursor = node
        self.ours.add(node)
        self.event_of[node] = self.event
        self._example_value(node)
        return node

    def _example_value(self, node: fx.Node) -> None:
        """Dynamo's `example_value` metadata for a new node, computed on fake values: inductor's
        and AOTAutograd's caches need it. Without a fake mode (or for a module call) the node
        simply has none, and those caches are bypassed."""
        if self.fake_mode is None or node.op not in ("call_function", "call_method"):
            return
        missing = []
        def fake(n: fx.Node) -> Any:
            if "example_value" not in n.meta:
                missing.append(n)
            return n.meta.get("example_value")
        args = fx.node.map_arg(node.args, fake)
        kwargs = fx.node.map_arg(node.kwargs, fake)
        if missing:
            return
        with self.fake_mode:
            if node.op == "call_method":
                node.meta["example_value"] = getattr(args[0], node.target)(*args[1:], **kwargs)
            else:
                node.meta["example_value"] = node.target(*args, **kwargs)

    def _arg(self, arg: Any) -> Any:
        return ops.materialize(arg, self.values)

    def _op(self, op: Op, at: int, placeholders: list[fx.Node], extra: list[ExtraInput],
            spliced: Spliced) -> None:
        args = [self._arg(a) for a in op.args]
        kwargs = {k: self._arg(v) for k, v in op.kwargs}
        code = op.opcode
        if code == "param" or code == "weight":
            self.values[op.result] = placeholders[extra.index((code, op.target))]  # type: ignore
        elif code == "read":
            value = ops.site_value(self.live[at], op.site.kind)  # type: ignore[union-attr]
            self.values[op.result] = self._rows(value, op.site.invoke)  # type: ignore
        elif code == "write":
            path = [self._arg(a) for a in op.path]
            self._write(at, op, path, args[0])
        elif code == "call":
            self.values[op.result] = self._call(op.target, args, kwargs)  # type: ignore[index]
        elif code == "module":
            name = f"ivx_module_{len(self.submodules)}"
            self.submodules[name] = self.modules.get_submodule(op.target)
            self.values[op.result] = self._node("call_module", name, tuple(args), kwargs)  # type: ignore
        elif code == "save":
            ref = op.args[0].id  # type: ignore[union-attr]
            leaves, spec = pytree.tree_flatten(self.values[ref])
            if not all(_tensor_node(leaf) for leaf in leaves if isinstance(leaf, fx.Node)):
                raise SpliceError(f"{op.span}: saves a value computed from shapes, not a tensor; "
                                  "compiled execution saves tensors and constants")
            spliced.saves.append((op.target, ref, spec, leaves))
        # `stop` needs nothing here: the compiled forward runs to the end, and the caller
        # reports it as stopped, as the reference interpreter does.

    def _call(self, name: str, args: list[Any], kwargs: dict[str, Any]) -> Any:
        """Graph nodes for one whitelisted op, spelled with plain torch and operator targets
        (inductor's caches refuse graphs that call our own functions)."""
        fn = ops.functions()[name]
        if name in ("field", "getitem") and not isinstance(args[0], fx.Node):
            return ops.call(name, list(args), {})  # into a site's structure (a tuple, a ModelOutput): known now
        if name == "setitem":  # functional: a copy, written
            out = self._node("call_function", torch.clone, (args[0],), {})
            self._node("call_function", operator.setitem, (out, args[1], args[2]), {})
            return out
        if ops.is_inplace_method(name) and args and isinstance(args[0], fx.Node):
            copy = self._node("call_function", torch.clone, (args[0],), {})
            return self._node("call_method", name.removeprefix("Tensor."), (copy, *args[1:]), kwargs)
        if isinstance(fn, operator.attrgetter):  # Tensor.T and other properties
            return self._node("call_function", getattr, (args[0], name.removeprefix("Tensor.")), {})
        if isinstance(fn, (pytypes.FunctionType, pytypes.BuiltinFunctionType,
                           pytypes.MethodDescriptorType, pytypes.WrapperDescriptorType)):
            return self._node("call_function", fn, tuple(args), kwargs)
        return self._node("call_function", ops.call, (name, list(args), kwargs), {})

    def _batch_rows(self, node: fx.Node) -> bool:
        fake = self.fakes.get(node)
        return fake is not None and fake.dim() > 0 and fake.shape[0] == self.batch

    def _rows(self, value: Any, invoke: int) -> Any:
        rows = self.rows[invoke]
        if rows == slice(0, self.batch):
            return value
        return pytree.tree_map_only(
            fx.Node, lambda n: self._node("call_function", operator.getitem, (n, rows), {})
            if self._batch_rows(n) else n, value)

    def _write(self, at: int, op: Op, path: list[Any], value: Any) -> None:
        rows = self.rows[op.site.invoke]  # type: ignore[union-attr]
        live = self.live[at]
        if op.site.kind == "input":  # type: ignore[union-attr]
            key = ops.first_input_key(live)
            path = [0, key, *path] if isinstance(key, int) else [1, key, *path]
        container, steps = live, list(path)
        trail: list[tuple[Any, Any]] = []
        while steps and not isinstance(container, fx.Node):
            trail.append((container, steps[0]))
            container = container[steps.pop(0)]
        if not isinstance(container, fx.Node):
            raise SpliceError(f"{op.span}: writes a whole {type(container).__name__}; "
                              "compiled execution writes tensors")
        new = self._write_leaf(container, steps, value, rows)
        self.fakes[new] = self.fakes.get(container)
        if self.views is not None:
            self._scatter(at, container, new)
        container.replace_all_uses_with(new, delete_user_cb=lambda user: user not in self.ours)
        self.replaced[container] = new
        for parent, key in reversed(trail):
            new = _replaced(parent, key, new)
        self.live[at] = new

    def _current(self, node: fx.Node) -> fx.Node:
        while node in self.replaced:
            node = self.replaced[node]
        return node

    def _logical(self, at: int, live: Any) -> Any:
        """The site's value with its per-row tensors gathered into the program's rows."""
        assert self.views is not None
        event = self.typed.events[at]
        if event not in self.views.events:
            raise SpliceError(f"no row layout for {self._event(at)}")
        where = self.inputs[("rows", self.views.events[event][0])]
        recorded = pytree.tree_leaves(self.table.values[event])
        leaves, spec = pytree.tree_flatten(live)
        out = []
        for seen, node in zip(recorded, leaves, strict=True):
            if isinstance(node, fx.Node) and isinstance(seen, torch.Tensor) and seen.dim() > 0 \
                    and seen.shape[0] == self.views.logical:
                view = self._node("call_function", torch.index_select, (node, 0, where), {})
                self.fakes[view] = seen
                self.physical[view] = node
                node = view
            out.append(node)
        return pytree.tree_unflatten(out, spec)

    def _scatter(self, at: int, container: fx.Node, new: fx.Node) -> None:
        """Route the model's later uses of the written physical tensor to one with the program's
        new rows scattered in."""
        assert self.views is not None
        physical = self.physical.get(container)
        if physical is None:
            raise SpliceError(f"a write at {self._event(at)} lands in a value without a row per batch row")
        _, taken, owner = self.views.events[self.typed.events[at]]
        picked = self._node("call_function", torch.index_select, (new, 0, self.inputs[("rows", owner)]), {})
        merged = self._node("call_function", torch.index_copy,
                            (physical, 0, self.inputs[("rows", taken)], picked), {})
        physical.replace_all_uses_with(merged, delete_user_cb=lambda user: user not in self.ours)
        self.physical[new] = merged
        self.replaced[physical] = merged

    def _write_leaf(self, t: fx.Node, steps: list[Any], value: Any, rows: slice) -> fx.Node:
        """`ops.write_tensor` as graph nodes: a copy of `t` with `value` written in place."""
        whole = rows == slice(0, self.batch) or not self._batch_rows(t)
        if not steps and whole:
            if isinstance(value, fx.Node):
                return value
            return self._node("call_function", torch.full_like, (t, value), {})
        out = self._node("call_function", torch.clone, (t,), {})
        view = out if whole else self._node("call_function", operator.getitem, (out, rows), {})
        for index in steps[:-1]:
            view = self._node("call_function", operator.getitem, (view, index), {})
        self._node("call_function", operator.setitem, (view, steps[-1] if steps else Ellipsis, value), {})
        return out


_INPLACE_OPERATORS = {operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.setitem,
                      operator.ipow, operator.iand, operator.ior, operator.ixor, operator.imatmul}
_OPERATORS = {f for f in vars(operator).values() if callable(f)}
VIEWS = {"view", "reshape", "transpose", "permute", "expand", "unsqueeze", "squeeze", "flatten",
         "unflatten", "narrow", "select", "as_strided", "t", "contiguous", "view_as", "unbind", "split",
         "chunk", "getitem", "to", "type_as", "float", "double", "half", "bfloat16", "int", "long", "bool",
         "detach", "expand_as", "reshape_as", "swapaxes", "swapdims", "movedim", "moveaxis", "diagonal",
         "unfold", "alias", "real", "imag", "split_with_sizes", "tensor_split", "cpu",
         "cuda"}  # ops whose result may share memory with their first argument (a cast to its own dtype is itself)


def writes_in_place(node: fx.Node) -> bool:
    """Whether `node` changes its first argument (or an `out=` tensor) in place."""
    target = node.target
    if target in _OPERATORS:  # operator.and_, not_, is_: the underscore is no in-place mark there
        return target in _INPLACE_OPERATORS
    name = getattr(target, "__name__", str(target))
    return (name.endswith("_") and not name.endswith("__")
            or isinstance(target, torch._ops.OpOverload) and target._schema.is_mutable
            or "out" in node.kwargs)


def _mutated(x: fx.Node, depth: int = 0) -> bool:
    """Whether a node may change `x` (or a view of it) in place: then a site's value must be a copy."""
    for user in x.users:
        if writes_in_place(user):  # whichever argument it writes
            return True
        name = getattr(user.target, "__name__", str(user.target))
        if name in VIEWS and (depth > 8 or _mutated(user, depth + 1)):
            return True
    return False


def _replaced(container: Any, key: Any, value: Any) -> Any:
    if isinstance(container, tuple):
        items = list(container)
        items[key] = value
        return type(container)(*items) if hasattr(container, "_fields") else tuple(items)
    if isinstance(container, list):
        return [value if i == key else v for i, v in enumerate(container)]
    new = dict(container)
    new[key] = value
    return type(container)(**new) if type(container) is not dict else new


def _tensor_node(node: fx.Node) -> bool:
    """Whether a node computes a tensor (module calls carry no example value: they do)."""
    example = node.meta.get("example_value")
    return example is None and node.op == "call_module" or isinstance(example, torch.Tensor)


def _fetch(module: Any, target: str) -> Any:
    for part in target.split("."):
        module = getattr(module, part)
    return module
