"""Print IR back as `.ivx`: every op becomes a statement, so parsing and lowering the text gives
the same IR again (given the same model, prompts and parameter values)."""

from __future__ import annotations

import dataclasses

from compiler.errors import InterventionError
from compiler.ir import (
    NO_SPAN,
    Arg,
    Const,
    DTypeArg,
    EllipsisArg,
    Generation,
    ListArg,
    Op,
    Program,
    Ref,
    Site,
    SliceArg,
    TupleArg,
)
from compiler.ops import OPERATOR_SYMBOLS
from compiler.printer import format_type
from grammar import ast

_BINARY = OPERATOR_SYMBOLS
_UNARY = {"neg": "-", "pos": "+", "invert": "~"}
_NAMESPACES = {"torch.nn.functional": "F", "torch.linalg": "linalg", "torch.special": "special",
               "torch.fft": "fft", "torch": "torch", "einops": "einops"}
_PROPERTIES = ("T", "mT", "H", "mH", "real", "imag", "data")


class NotPrintable(InterventionError):
    """The program uses an op the `.ivx` language cannot spell."""


def prompt_name(invoke: int) -> str:
    return f"invoke{invoke}"


class _Decompiler:
    def __init__(self, program: Program):
        self.program = program
        self.names: dict[int, str] = {}
        self.calls: dict[str, int] = {}
        self.header: list[ast.Decl] = [ast.PromptDecl(prompt_name(i), None) for i in range(program.n_invokes)]
        if program.generation is not None:
            self.header.append(_generate(program.generation))
        self.blocks: list[ast.Decl] = []
        self.invoke: int | None = None
        self.opened = 0  # invokes are numbered in the order their blocks open
        self.body: list[ast.Stmt] = []

    def run(self) -> ast.Module:
        for op in self.program.ops:
            getattr(self, f"_{op.opcode}")(op)
        self._open_through(self.program.n_invokes - 1, None)
        self._close()
        return ast.Module(tuple(self.header + self.blocks))

    # structure
    def _emit(self, stmt: ast.Stmt, invoke: int | None = None, op: Op | None = None) -> None:
        if invoke is not None and invoke != self.invoke:
            self._open_through(invoke, op)
        self.body.append(stmt)

    def _open_through(self, invoke: int, op: Op | None) -> None:
        """Open invoke `invoke`'s block, after empty blocks for any earlier invoke not yet seen."""
        if invoke < self.opened:
            if invoke == self.invoke:
                return
            raise NotPrintable.at(op.span if op else NO_SPAN,
                                  f"invoke {invoke} is used again after a later invoke; in .ivx each "
                                  "block is a new invoke")
        while self.opened <= invoke:
            self._close()
            self.invoke = self.opened
            self.opened += 1

    def _close(self) -> None:
        if self.invoke is not None:
            self.blocks.append(ast.Invoke(prompt_name(self.invoke), tuple(self.body)))
        else:
            self.blocks.extend(self.body)
        self.body, self.invoke = [], None

    def _name(self, op: Op) -> ast.Name:
        self.names[op.result] = f"v{op.result}"  # type: ignore[index]
        return ast.Name(f"v{op.result}")

    # expressions
    def arg(self, a: Arg) -> ast.Expr:
        if isinstance(a, Ref):
            return ast.Name(self.names[a.id])
        if isinstance(a, Const):
            return ast.Literal(a.value)
        if isinstance(a, SliceArg):
            parts = [None if isinstance(p, Const) and p.value is None else self.arg(p)
                     for p in (a.start, a.stop, a.step)]
            return ast.Slice(*parts)
        if isinstance(a, EllipsisArg):
            return ast.EllipsisLit()
        if isinstance(a, TupleArg):
            return ast.TupleLit(tuple(self.arg(i) for i in a.items))
        if isinstance(a, ListArg):
            return ast.ListLit(tuple(self.arg(i) for i in a.items))
        if isinstance(a, DTypeArg):
            return ast.Name(a.name)
        raise TypeError(f"not an argument: {a!r}")

    def index_items(self, a: Arg) -> tuple[ast.Expr, ...]:
        return tuple(self.arg(i) for i in a.items) if isinstance(a, TupleArg) else (self.arg(a),)

    def module(self, path: str) -> ast.Expr:
        e: ast.Expr = ast.ModelRef()
        for part in path.split(".") if path else ():
            e = ast.Index(e, (ast.Literal(int(part)),)) if part.isdigit() else ast.Attr(e, part)
        return e

    def site(self, site: Site, op: Op) -> ast.Expr:
        e = self.module(site.module)
        current = self.calls.get(site.module, 0)
        if site.call < current:
            raise NotPrintable.at(op.span, f"call {site.call} of {site.module} after call {current}: "
                                           "`.next()` only moves forward")
        if site.call > current:
            e = ast.Call(ast.Attr(e, "next"), (ast.Literal(site.call - current),) if site.call - current > 1 else (), ())
            self.calls[site.module] = site.call
        return ast.Attr(e, site.kind)

    # ops
    def _read(self, op: Op) -> None:
        value = self.site(op.site, op)  # type: ignore[arg-type]
        self._emit(ast.Assign(self._name(op), "=", value), op.site.invoke, op)  # type: ignore[union-attr]

    def _write(self, op: Op) -> None:
        target = self.site(op.site, op)  # type: ignore[arg-type]
        for step in op.path:
            target = ast.Index(target, self.index_items(step))
        self._emit(ast.Assign(target, "=", self.arg(op.args[0])), op.site.invoke, op)  # type: ignore[union-attr]

    def _param(self, op: Op) -> None:
        t = format_type(op.type)
        kind, _, rest = t.partition("[")
        shape = tuple(int(d) for d in rest.rstrip("]").split(", ") if d) if rest or t.endswith("[]") else None
        self.header.append(ast.ParamDecl(op.target, kind, shape if "[" in t else None))
        self.names[op.result] = op.target  # type: ignore[index]

    def _weight(self, op: Op) -> None:
        path, _, name = op.target.rpartition(".")
        self._emit(ast.Assign(self._name(op), "=", ast.Attr(self.module(path), name)))

    def _module(self, op: Op) -> None:
        call = ast.Call(self.module(op.target), tuple(self.arg(a) for a in op.args),
                        tuple(ast.Kwarg(k, self.arg(v)) for k, v in op.kwargs))
        self._emit(ast.Assign(self._name(op), "=", call))

    def _save(self, op: Op) -> None:
        """A save at a generation step is a one-step `steps [k] { save ... }` block."""
        if op.point:
            raise NotPrintable.at(op.span, f"save {op.target} is one point of a vectorised sweep, which "
                                  "has no .ivx spelling of its own", "decompile the program before the sweep fans it out")
        save = ast.Save(op.target, self.arg(op.args[0]))
        self._emit(save if op.step is None else ast.Steps((ast.Literal(op.step),), (save,)))

    def _stop(self, op: Op) -> None:
        if op.args:
            self._emit(ast.Assign(ast.Name("_"), "=", ast.Call(ast.Attr(self.arg(op.args[0]), "stop"), (), ())))
        else:
            self._emit(ast.Stop())

    def _call(self, op: Op) -> None:
        self._emit(ast.Assign(self._name(op), "=", self.call_expr(op)))

    def call_expr(self, op: Op) -> ast.Expr:
        name, args = op.target, [self.arg(a) for a in op.args]
        kwargs = tuple(ast.Kwarg(k, self.arg(v)) for k, v in op.kwargs)
        if name in _BINARY and len(args) == 2 and not kwargs:
            return ast.BinOp(_BINARY[name], args[0], args[1])
        if name in _UNARY and len(args) == 1:
            return ast.Unary(_UNARY[name], args[0])
        if name == "abs":
            return ast.Call(ast.Name("abs"), tuple(args), ())
        if name == "getitem":
            return ast.Index(args[0], self.index_items(op.args[1]))
        if name == "field" and isinstance(op.args[1], Const):
            return ast.Attr(args[0], str(op.args[1].value))
        if name.startswith("Tensor."):
            method = name.removeprefix("Tensor.")
            if method in _PROPERTIES:
                return ast.Attr(args[0], method)
            return ast.Call(ast.Attr(args[0], method), tuple(args[1:]), kwargs)
        prefix, _, function = name.rpartition(".")
        if prefix in _NAMESPACES:
            return ast.Call(ast.Attr(ast.Name(_NAMESPACES[prefix]), function), tuple(args), kwargs)
        raise NotPrintable.at(op.span or NO_SPAN, f"the op {name!r} has no .ivx spelling",
                              "the language has no bitwise operators or functional setitem")

    def _gradient(self, op: Op) -> None:
        raise NotPrintable.at(op.span or NO_SPAN, "a program with gradients is not printed as .ivx yet",
                              "keep it as IR (JSON), which holds every op")

    _backward = _grad = _setgrad = _gradient


def _generate(generation: Generation) -> ast.Generate:
    """The `generate` line: every setting that differs from its default."""
    return ast.Generate(tuple(ast.Kwarg(f.name, ast.Literal(getattr(generation, f.name)))
                              for f in dataclasses.fields(generation) if getattr(generation, f.name) != f.default))


def to_ivx(program: Program) -> ast.Module:
    """The `.ivx` syntax tree of `program`: prompts `invoke0..` and params are given at run time."""
    return _Decompiler(program).run()
