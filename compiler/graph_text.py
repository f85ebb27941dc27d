"""The patched graph as text, around each site: what `ivx explain --graph` prints."""

from __future__ import annotations

import torch.fx as fx

from compiler.check import TypedProgram, describe_site
from compiler.ir import Site
from compiler.splice import Spliced

_CONTEXT = 2  # model nodes shown before and after each site's inserted nodes


class _Name:
    def __init__(self, name: str):
        self.name = name

    def __repr__(self) -> str:
        return self.name


def node_line(node: fx.Node) -> str:
    """One node as a line of Python: `add = torch.add(clone_3, ivx_param_p0)`."""
    args = fx.node.map_arg(node.args, lambda n: _Name(n.name))
    kwargs = fx.node.map_arg(node.kwargs, lambda n: _Name(n.name))
    parts = [repr(a) for a in args] + [f"{k}={v!r}" for k, v in kwargs.items()]
    if node.op == "call_function":
        target = fx.node._get_qualified_name(node.target)  # type: ignore[arg-type]
    elif node.op == "call_method":
        target, parts = f"{parts[0]}.{node.target}", parts[1:]
    elif node.op == "call_module":
        target = f"self.{node.target}"
    elif node.op == "output":
        return f"return {', '.join(parts)}"
    else:
        return f"{node.name} = <{node.op} {node.target}>"
    return f"{node.name} = {target}({', '.join(parts)})"


def explain_graph(spliced: Spliced, typed: TypedProgram, root: str = "model") -> str:
    """Each site's part of the patched graph: a few model nodes, then `+` lines for the nodes
    the program added (with the source line of each op), then the model's nodes that follow."""
    nodes = list(spliced.module.graph.nodes)
    position = {n: i for i, n in enumerate(nodes)}
    ours = {n for added in spliced.inserted.values() for n in added}
    spans: dict[int, list[str]] = {}
    for op, at in zip(typed.program.ops, typed.schedule, strict=True):
        spans.setdefault(at, []).append(str(op.span))
    lines = [f"# patched graph: {len(nodes)} nodes, {len(ours)} of them from the experiment; "
             f"{len(spliced.extra)} extra inputs, {len(spliced.saves)} saved values"]
    for at in sorted(spliced.inserted):
        added = spliced.inserted[at]
        if not added and at not in spliced.anchors:
            continue
        if at < 0:
            title = "before the forward"
        else:
            path, phase, call = typed.events[at]
            kind = "output" if phase == "post" else "input"
            title = describe_site(Site(path, kind, call, 0), root) if path else f"{root}.{kind}"
        where = ", ".join(dict.fromkeys(spans.get(at, [])))
        lines.append(f"\n# --- {title}   ({where})")
        if not added:
            anchor = spliced.anchors.get(at)
            if anchor is not None:
                lines.append(f"    {node_line(anchor)}   # used as it is")
            continue
        first, last = position[added[0]], position[added[-1]]
        start = max(0, first - _CONTEXT)
        shown = [n for n in nodes[start:first] if n not in ours]
        after = [n for n in nodes[last + 1:] if n not in ours][:_CONTEXT]
        lines += [f"    {node_line(n)}" for n in shown]
        lines += [f"  + {node_line(n)}" for n in added]
        lines += [f"    {node_line(n)}" for n in after]
    return "\n".join(lines)
