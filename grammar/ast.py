"""The `.ivx` syntax tree: frozen records, each with the span of the text it came from.

Spans do not take part in equality, so a printed-and-reparsed file equals the original.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from compiler.ir import NO_SPAN, Span


def _span() -> Span:
    return field(default=NO_SPAN, compare=False, repr=False)  # type: ignore[return-value]


# ----------------------------------------------------------------------------------- expressions
@dataclass(frozen=True)
class Name:
    id: str
    span: Span = _span()


@dataclass(frozen=True)
class ModelRef:
    """The word `model`: the root of every module path."""

    span: Span = _span()


@dataclass(frozen=True)
class Literal:
    value: int | float | str | bool | None
    span: Span = _span()


@dataclass(frozen=True)
class Attr:
    obj: "Expr"
    name: str
    span: Span = _span()


@dataclass(frozen=True)
class Slice:
    start: "Expr | None"
    stop: "Expr | None"
    step: "Expr | None"
    span: Span = _span()


@dataclass(frozen=True)
class EllipsisLit:
    span: Span = _span()


@dataclass(frozen=True)
class Index:
    obj: "Expr"
    items: tuple["Expr", ...]  # Slice and EllipsisLit allowed here
    span: Span = _span()


@dataclass(frozen=True)
class Kwarg:
    name: str
    value: "Expr"
    span: Span = _span()


@dataclass(frozen=True)
class Call:
    func: "Expr"
    args: tuple["Expr", ...]
    kwargs: tuple[Kwarg, ...]
    span: Span = _span()


@dataclass(frozen=True)
class BinOp:
    op: str
    left: "Expr"
    right: "Expr"
    span: Span = _span()


@dataclass(frozen=True)
class Unary:
    op: str
    operand: "Expr"
    span: Span = _span()


@dataclass(frozen=True)
class TupleLit:
    items: tuple["Expr", ...]
    span: Span = _span()


@dataclass(frozen=True)
class ListLit:
    items: tuple["Expr", ...]
    span: Span = _span()


Expr = (Name | ModelRef | Literal | Attr | Slice | EllipsisLit | Index | Call | BinOp | Unary
        | TupleLit | ListLit)


# ------------------------------------------------------------------------------------ statements
@dataclass(frozen=True)
class ModelDecl:
    source: str
    span: Span = _span()


@dataclass(frozen=True)
class PromptDecl:
    name: str
    value: Expr | None  # a string, a list of strings, lines(...) / jsonl(...) / csv(...); None: given at run time
    span: Span = _span()


@dataclass(frozen=True)
class ParamDecl:
    """A typed parameter whose value is given at run time (`param v: f32[576]`, `param c: float`)."""

    name: str
    kind: str  # a dtype short name (f32, bf16, i64, ...) or "float" / "int"
    shape: tuple[int, ...] | None = None  # None for a scalar kind
    span: Span = _span()


@dataclass(frozen=True)
class TensorDecl:
    name: str
    value: Expr  # load("file.safetensors", key="...")
    span: Span = _span()


@dataclass(frozen=True)
class Range:
    start: int
    stop: int
    span: Span = _span()


@dataclass(frozen=True)
class SweepDecl:
    name: str
    values: Range | ListLit
    span: Span = _span()


@dataclass(frozen=True)
class ZipSweepDecl:
    """`sweep a, b in zip([...], [...])`: axes that move together (point i takes each one's i-th value)."""

    names: tuple[str, ...]
    values: tuple[Range | ListLit, ...]
    span: Span = _span()


@dataclass(frozen=True)
class Let:
    name: str
    value: Expr
    span: Span = _span()


@dataclass(frozen=True)
class Assign:
    target: Expr
    op: str  # "=", "+=", "-=", "*=", "/="
    value: Expr
    span: Span = _span()


@dataclass(frozen=True)
class Save:
    name: str
    value: Expr
    span: Span = _span()


@dataclass(frozen=True)
class Stop:
    span: Span = _span()


@dataclass(frozen=True)
class Steps:
    """`steps all { ... }` or `steps [2:5] { ... }`: the body applies at the chosen generation steps."""

    selector: "tuple[Expr, ...] | None"  # None: every step; else the subscript, as in tracer.iter[...]
    body: tuple["Let | Assign | Save", ...]
    span: Span = _span()


@dataclass(frozen=True)
class Backward:
    """`backward metric { ... }`: back-propagate from `metric`; `.grad` in the body is its gradient."""

    metric: "Expr"
    body: tuple["Let | Assign | Save", ...]
    span: Span = _span()


@dataclass(frozen=True)
class Cache:
    """`cache acts` / `cache acts = modules`: save modules' outputs (every module's by default)
    under `acts.<module path>` (nnsight's `tracer.cache()`)."""

    name: str
    modules: "Expr | None"
    span: Span = _span()


Stmt = Let | Assign | Save | Stop | Steps | Backward | Cache


@dataclass(frozen=True)
class Edit:
    """`edit { ... }`: writes applied to every invoke of the experiment (a persistent edit)."""

    body: tuple["Let | Assign", ...]
    span: Span = _span()


@dataclass(frozen=True)
class Invoke:
    prompt: str
    body: tuple[Stmt, ...]
    span: Span = _span()


@dataclass(frozen=True)
class Trace:
    """`trace { ... }`: one forward of a session; names it binds are usable in the traces after it."""

    body: tuple["Invoke | Stmt", ...]
    span: Span = _span()


@dataclass(frozen=True)
class Generate:
    """`generate max_new_tokens=8, seed=0`: the experiment generates, with these arguments."""

    kwargs: tuple[Kwarg, ...]
    span: Span = _span()


Decl = ModelDecl | PromptDecl | ParamDecl | TensorDecl | SweepDecl | ZipSweepDecl | Generate | Invoke | Edit | Trace | Stmt


@dataclass(frozen=True)
class Comment:
    """A `# ...` comment, kept so that `ivx fmt` does not lose it."""

    line: int
    text: str
    own_line: bool


@dataclass(frozen=True)
class Module:
    """A parsed `.ivx` file."""

    body: tuple[Decl, ...]
    comments: tuple[Comment, ...] = field(default=(), compare=False)
    file: str = field(default="<ivx>", compare=False)


# ------------------------------------------------------------------------------------------ JSON
_NODES: dict[str, type] = {}


def _register() -> None:
    import dataclasses
    for obj in list(globals().values()):
        if isinstance(obj, type) and dataclasses.is_dataclass(obj):
            _NODES[obj.__name__] = obj
    _NODES["Span"] = Span


def to_data(node: Any) -> Any:
    """A syntax tree as JSON-compatible data (`{"$": "Call", ...}`), spans included."""
    import dataclasses
    if dataclasses.is_dataclass(node):
        return {"$": type(node).__name__,
                **{f.name: to_data(getattr(node, f.name)) for f in dataclasses.fields(node)}}
    if isinstance(node, tuple):
        return [to_data(x) for x in node]
    return node


def from_data(data: Any) -> Any:
    """Inverse of `to_data`."""
    if isinstance(data, dict):
        if not _NODES:
            _register()
        cls = _NODES[data["$"]]
        return cls(**{k: from_data(v) for k, v in data.items() if k != "$"})
    if isinstance(data, list):
        return tuple(from_data(x) for x in data)
    return data
