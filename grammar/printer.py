"""Canonical `.ivx` text of a syntax tree (`ivx fmt`); parsing it back gives an equal tree."""

from __future__ import annotations

import json

from grammar import ast

_PRECEDENCE = {"==": 1, "!=": 1, "<": 1, "<=": 1, ">": 1, ">=": 1, "+": 2, "-": 2,
               "*": 3, "/": 3, "//": 3, "%": 3, "@": 3, "**": 5}
_UNARY, _POSTFIX, _ATOM = 4, 6, 7


def _level(e: ast.Expr) -> int:
    if isinstance(e, ast.BinOp):
        return _PRECEDENCE[e.op]
    if isinstance(e, ast.Unary):
        return _UNARY
    if isinstance(e, ast.Literal) and isinstance(e.value, (int, float)) and not isinstance(e.value, bool) \
            and e.value < 0:
        return _UNARY
    if isinstance(e, (ast.Attr, ast.Index, ast.Call)):
        return _POSTFIX
    return _ATOM


def _wrap(e: ast.Expr, minimum: int) -> str:
    text = expr(e)
    return f"({text})" if _level(e) < minimum else text


def expr(e: ast.Expr) -> str:
    """An expression as canonical text, with only the parentheses it needs."""
    if isinstance(e, ast.Name):
        return e.id
    if isinstance(e, ast.ModelRef):
        return "model"
    if isinstance(e, ast.Literal):
        if isinstance(e.value, str):
            return json.dumps(e.value, ensure_ascii=False)
        return repr(e.value)
    if isinstance(e, ast.Attr):
        return f"{_wrap(e.obj, _POSTFIX)}.{e.name}"
    if isinstance(e, ast.Index):
        return f"{_wrap(e.obj, _POSTFIX)}[{', '.join(expr(i) for i in e.items)}]"
    if isinstance(e, ast.Slice):
        parts = ["" if p is None else expr(p) for p in (e.start, e.stop)]
        return ":".join(parts) + (f":{expr(e.step)}" if e.step is not None else "")
    if isinstance(e, ast.EllipsisLit):
        return "..."
    if isinstance(e, ast.Call):
        args = [expr(a) for a in e.args] + [f"{k.name}={expr(k.value)}" for k in e.kwargs]
        return f"{_wrap(e.func, _POSTFIX)}({', '.join(args)})"
    if isinstance(e, ast.BinOp):
        level = _PRECEDENCE[e.op]
        if e.op == "**":  # right-associative, binds tighter than unary on its left
            return f"{_wrap(e.left, _POSTFIX)} ** {_wrap(e.right, _UNARY)}"
        right_min = level + 1 if level > 1 else 2  # comparisons do not chain
        left_min = level if level > 1 else 2
        return f"{_wrap(e.left, left_min)} {e.op} {_wrap(e.right, right_min)}"
    if isinstance(e, ast.Unary):
        return f"{e.op}{_wrap(e.operand, _UNARY)}"
    if isinstance(e, ast.TupleLit):
        inner = ", ".join(expr(i) for i in e.items)
        return f"({inner},)" if len(e.items) == 1 else f"({inner})"
    if isinstance(e, ast.ListLit):
        return f"[{', '.join(expr(i) for i in e.items)}]"
    raise TypeError(f"not an expression: {e!r}")


def statement(s: ast.Decl) -> str:
    if isinstance(s, ast.ModelDecl):
        return f"model {json.dumps(s.source, ensure_ascii=False)}"
    if isinstance(s, ast.PromptDecl):
        return f"prompt {s.name}" + (f" = {expr(s.value)}" if s.value is not None else "")
    if isinstance(s, ast.ParamDecl):
        shape = f"[{', '.join(map(str, s.shape))}]" if s.shape is not None else ""
        return f"param {s.name}: {s.kind}{shape}"
    if isinstance(s, ast.TensorDecl):
        return f"tensor {s.name} = {expr(s.value)}"
    if isinstance(s, ast.SweepDecl):
        return f"sweep {s.name} in {_sweep_values(s.values)}"
    if isinstance(s, ast.ZipSweepDecl):
        return f"sweep {', '.join(s.names)} in zip({', '.join(_sweep_values(v) for v in s.values)})"
    if isinstance(s, ast.Let):
        return f"let {s.name} = {expr(s.value)}"
    if isinstance(s, ast.Assign):
        return f"{expr(s.target)} {s.op} {expr(s.value)}"
    if isinstance(s, ast.Save):
        return f"save {s.name} = {expr(s.value)}"
    if isinstance(s, ast.Stop):
        return "stop"
    if isinstance(s, ast.Cache):
        return f"cache {s.name}" + (f" = {expr(s.modules)}" if s.modules is not None else "")
    if isinstance(s, ast.Generate):
        return "generate " + ", ".join(f"{k.name}={expr(k.value)}" for k in s.kwargs)
    raise TypeError(f"not a statement: {s!r}")


def _sweep_values(values: ast.Range | ast.ListLit) -> str:
    return f"{values.start}..{values.stop}" if isinstance(values, ast.Range) else expr(values)


_Block = ast.Invoke | ast.Steps | ast.Backward | ast.Edit | ast.Trace


def _opening(decl: _Block) -> str:
    if isinstance(decl, ast.Trace):
        return "trace {"
    if isinstance(decl, ast.Invoke):
        return f"invoke {decl.prompt} {{"
    if isinstance(decl, ast.Edit):
        return "edit {"
    if isinstance(decl, ast.Backward):
        return f"backward {expr(decl.metric)} {{"
    if decl.selector is None:
        return "steps all {"
    return f"steps [{', '.join(expr(i) for i in decl.selector)}] {{"


def format_module(module: ast.Module) -> str:
    """The canonical text of a file: one statement a line, four-space blocks, comments kept."""
    own = sorted((c for c in module.comments if c.own_line), key=lambda c: c.line)
    trailing = {c.line: c.text for c in module.comments if not c.own_line}
    out: list[str] = []

    def emit(text: str, line: int, indent: str) -> None:
        while own and own[0].line < line:
            out.append(indent + own.pop(0).text)
        out.append(indent + text + (f"  {trailing[line]}" if line in trailing else ""))

    def block(decl: _Block, indent: str) -> None:
        emit(_opening(decl), decl.span.line, indent)
        for s in decl.body:
            if isinstance(s, (ast.Steps, ast.Backward, ast.Invoke)):
                block(s, indent + "    ")
            else:
                emit(statement(s), s.span.line, indent + "    ")
        end = decl.span.end_line
        while own and own[0].line < end:
            out.append(indent + "    " + own.pop(0).text)
        out.append(indent + "}" + (f"  {trailing[end]}" if end in trailing else ""))

    previous: type | None = None
    for decl in module.body:
        if out and (isinstance(decl, (ast.Invoke, ast.Edit, ast.Trace)) or previous in (ast.Invoke, ast.Edit, ast.Trace) or
                    (type(decl) is not previous and not (own and own[0].line < decl.span.line))):
            out.append("")
        previous = type(decl)
        if isinstance(decl, (ast.Invoke, ast.Steps, ast.Edit, ast.Trace, ast.Backward)):
            block(decl, "")
        else:
            emit(statement(decl), decl.span.line, "")
    out.extend(c.text for c in own)
    return "\n".join(out).strip("\n") + "\n"
