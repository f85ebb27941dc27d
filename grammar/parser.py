"""Parse `.ivx` text into `grammar.ast`, reporting every syntax error with its line and a hint."""

from __future__ import annotations

import functools
import linecache
from pathlib import Path
from typing import Any

from lark import Lark, Token, Transformer, UnexpectedCharacters, UnexpectedInput, UnexpectedToken, v_args
from lark.exceptions import VisitError

from compiler.errors import Diagnostic, InterventionError
from compiler.ir import Span
from grammar import ast

_MAX_REPORTED = 20

_READABLE = {
    "RSQB": "]", "LSQB": "[", "RPAR": ")", "LPAR": "(", "RBRACE": "}", "LBRACE": "{",
    "COMMA": ",", "COLON": ":", "DOT": ".", "NAME": "a name", "INT": "an integer",
    "FLOAT": "a number", "STRING": "a string", "_NL": "end of line", "$END": "end of file",
    "ASSIGN_OP": "=", "EQUAL": "=", "MUL_OP": "an operator", "ADD_OP": "an operator",
    "COMP_OP": "a comparison", "POW_OP": "**", "UNARY_OP": "-", "MODEL": "model",
    "IN": "in", "__ANON_0": "..", "ALL_STEPS": "all",
}

# Known mistakes, recognised by the parser state they leave (lark's match_examples).
_EXAMPLES: dict[str, list[str]] = {
    "missing `]` to close the index": [
        "x = a[0\n", "x = a[:, -1\n", "x = f(a[0)\n", "save s = a[0\n", "x = a[0, 1\n",
        "model.a[0].output[:, 0 = 1\n",
    ],
    "missing `)` to close the call or parenthesis": [
        "x = f(a\n", "x = (a + b\n", "x = f(a, b=1\n", "save s = f(a\n", "save s = (a + b\n",
    ],
    "a statement assigns: write `target = expression` (`==` only compares)": [
        "x == a\n", "x == a.b\n", "x == a[0]\n", "x == f(a)\n", "x == a.b[0].c\n", "x == 1\n",
        "model.a.output == 0\n", "a[0] == 1\n", "x\n", "x.y\n", "x[0]\n", "model.a.output\n", "f(x)\n",
    ],
    "`=` assigns and cannot appear inside an expression; to compare, write `==`": [
        "x = a = b\n", "save s = a = b\n",
    ],
    "the invoke block is not closed: add `}` on its own line": ["invoke p {\n x = 1\n"],
    "`save` needs a name of letters, digits and _: `save name = expression`": [
        "save a.b\n", "save f(x)\n", "save = x\n"],
    "a sweep takes a range `a..b` or a list `[v1, v2]`": ["sweep x in 3\n", "sweep x in a\n", "sweep x = [1]\n"],
}


_CONTEXTS = ("", "q = 1\n", "invoke p {\n", "q = 1\ninvoke p {\n", "invoke p {\nq = 1\n",
             "q = 1\ninvoke p {\nq = 1\n")


@functools.cache
def _in_contexts() -> dict[str, list[str]]:
    """Each example after other statements and inside blocks: lark matches by parser state,
    which includes the depth of the stack."""
    out = {}
    for label, snippets in _EXAMPLES.items():
        top_only = snippets[0].startswith(("invoke", "sweep"))
        contexts = [c for c in _CONTEXTS if not (top_only and "invoke" in c)]
        out[label] = [c + x for x in snippets for c in contexts]
    return out


_CLOSERS = {"]": "missing `]` to close the index", ")": "missing `)` to close the call or parenthesis",
            "}": "the invoke block is not closed: add `}` on its own line"}


class IvxSyntaxError(InterventionError):
    """The text is not valid `.ivx`."""


@functools.cache
def _lark() -> Lark:
    grammar = (Path(__file__).parent / "ivx.lark").read_text()
    return Lark(grammar, parser="lalr", propagate_positions=True, maybe_placeholders=True, cache=True)


def _span(file: str, meta: Any) -> Span:
    if getattr(meta, "empty", True):
        return Span(file, 0)
    return Span(file, meta.line, meta.column, meta.end_line, meta.end_column)


@v_args(meta=True)
class _ToAst(Transformer):  # type: ignore[type-arg]
    def __init__(self, file: str):
        super().__init__()
        self.file = file

    def _s(self, meta: Any) -> Span:
        return _span(self.file, meta)

    # expressions
    def name(self, meta: Any, c: list[Any]) -> ast.Name:
        return ast.Name(str(c[0]), self._s(meta))

    def model_ref(self, meta: Any, c: list[Any]) -> ast.ModelRef:
        return ast.ModelRef(self._s(meta))

    def int(self, meta: Any, c: list[Any]) -> ast.Literal:
        return ast.Literal(int(c[0]), self._s(meta))

    def float(self, meta: Any, c: list[Any]) -> ast.Literal:
        return ast.Literal(float(c[0]), self._s(meta))

    def string(self, meta: Any, c: list[Any]) -> ast.Literal:
        return ast.Literal(_unquote(str(c[0])), self._s(meta))

    def none(self, meta: Any, c: list[Any]) -> ast.Literal:
        return ast.Literal(None, self._s(meta))

    def true(self, meta: Any, c: list[Any]) -> ast.Literal:
        return ast.Literal(True, self._s(meta))

    def false(self, meta: Any, c: list[Any]) -> ast.Literal:
        return ast.Literal(False, self._s(meta))

    def attr(self, meta: Any, c: list[Any]) -> ast.Attr:
        return ast.Attr(c[0], str(c[1]), self._s(meta))

    def index(self, meta: Any, c: list[Any]) -> ast.Index:
        return ast.Index(c[0], c[1], self._s(meta))

    def subscripts(self, meta: Any, c: list[Any]) -> tuple[Any, ...]:
        return tuple(x for x in c if x is not None)

    def slice(self, meta: Any, c: list[Any]) -> ast.Slice:
        return ast.Slice(c[0], c[1], c[2], self._s(meta))

    def ellipsis(self, meta: Any, c: list[Any]) -> ast.EllipsisLit:
        return ast.EllipsisLit(self._s(meta))

    def call(self, meta: Any, c: list[Any]) -> ast.Call:
        items = c[1] or ()
        args = tuple(x for x in items if not isinstance(x, ast.Kwarg))
        kwargs = tuple(x for x in items if isinstance(x, ast.Kwarg))
        return ast.Call(c[0], args, kwargs, self._s(meta))

    def arguments(self, meta: Any, c: list[Any]) -> tuple[Any, ...]:
        return tuple(x for x in c if x is not None)

    def kwarg(self, meta: Any, c: list[Any]) -> ast.Kwarg:
        return ast.Kwarg(str(c[0]), c[1], self._s(meta))

    def binop(self, meta: Any, c: list[Any]) -> ast.BinOp:
        return ast.BinOp(str(c[1]), c[0], c[2], self._s(meta))

    def power(self, meta: Any, c: list[Any]) -> Any:
        return ast.BinOp("**", c[0], c[2], self._s(meta)) if c[1] is not None else c[0]

    def comparison(self, meta: Any, c: list[Any]) -> Any:
        return ast.BinOp(str(c[1]), c[0], c[2], self._s(meta)) if c[1] is not None else c[0]

    def unary(self, meta: Any, c: list[Any]) -> ast.Unary:
        return ast.Unary(str(c[0]), c[1], self._s(meta))

    def tuple(self, meta: Any, c: list[Any]) -> ast.TupleLit:
        return ast.TupleLit(tuple(x for x in c if x is not None), self._s(meta))

    def list(self, meta: Any, c: list[Any]) -> ast.ListLit:
        return ast.ListLit(tuple(x for x in c if x is not None), self._s(meta))

    # statements
    def model_decl(self, meta: Any, c: list[Any]) -> ast.ModelDecl:
        return ast.ModelDecl(_unquote(str(c[0])), self._s(meta))

    def prompt_decl(self, meta: Any, c: list[Any]) -> ast.PromptDecl:
        return ast.PromptDecl(str(c[0]), c[1], self._s(meta))

    def param_decl(self, meta: Any, c: list[Any]) -> ast.ParamDecl:
        return ast.ParamDecl(str(c[0]), str(c[1]), c[2], self._s(meta))

    def shape(self, meta: Any, c: list[Any]) -> tuple[int, ...]:
        return tuple(int(x) for x in c if x is not None)

    def tensor_decl(self, meta: Any, c: list[Any]) -> ast.TensorDecl:
        return ast.TensorDecl(str(c[0]), c[1], self._s(meta))

    def sweep_decl(self, meta: Any, c: list[Any]) -> ast.SweepDecl:
        return ast.SweepDecl(str(c[0]), c[1], self._s(meta))

    def zip_sweep_decl(self, meta: Any, c: list[Any]) -> ast.ZipSweepDecl:
        names = tuple(str(x) for x in c if isinstance(x, Token))
        return ast.ZipSweepDecl(names, tuple(x for x in c if not isinstance(x, Token)), self._s(meta))

    def range(self, meta: Any, c: list[Any]) -> ast.Range:
        return ast.Range(c[0], c[1], self._s(meta))

    def signed_int(self, meta: Any, c: list[Any]) -> int:
        return int(c[0])

    def neg_int(self, meta: Any, c: list[Any]) -> int:
        return -int(c[0])

    def let_stmt(self, meta: Any, c: list[Any]) -> ast.Let:
        return ast.Let(str(c[0]), c[1], self._s(meta))

    def invoke_block(self, meta: Any, c: list[Any]) -> ast.Invoke:
        return ast.Invoke(str(c[0]), tuple(x for x in c[1:] if x is not None), self._s(meta))

    def generate_decl(self, meta: Any, c: list[Any]) -> ast.Generate:
        return ast.Generate(tuple(c), self._s(meta))

    def steps_block(self, meta: Any, c: list[Any]) -> ast.Steps:
        selector = None if isinstance(c[0], Token) else c[0]
        return ast.Steps(selector, tuple(x for x in c[1:] if x is not None), self._s(meta))

    def edit_block(self, meta: Any, c: list[Any]) -> ast.Edit:
        return ast.Edit(tuple(x for x in c if x is not None), self._s(meta))

    def trace_block(self, meta: Any, c: list[Any]) -> ast.Trace:
        return ast.Trace(tuple(x for x in c if x is not None), self._s(meta))

    def cache_stmt(self, meta: Any, c: list[Any]) -> ast.Cache:
        return ast.Cache(str(c[0]), c[1], self._s(meta))

    def backward_block(self, meta: Any, c: list[Any]) -> ast.Backward:
        return ast.Backward(c[0], tuple(x for x in c[1:] if x is not None), self._s(meta))

    def assign(self, meta: Any, c: list[Any]) -> ast.Assign:
        return ast.Assign(c[0], str(c[1]), c[2], self._s(meta))

    def save_stmt(self, meta: Any, c: list[Any]) -> ast.Save:
        return ast.Save(str(c[0]), c[1], self._s(meta))

    def stop_stmt(self, meta: Any, c: list[Any]) -> ast.Stop:
        return ast.Stop(self._s(meta))

    def start(self, meta: Any, c: list[Any]) -> tuple[Any, ...]:
        return tuple(x for x in c if x is not None)


def _unquote(text: str) -> str:
    import ast as python_ast
    return python_ast.literal_eval(text)


def parse(text: str, file: str = "<ivx>") -> ast.Module:
    """Parse `.ivx` source. Raises IvxSyntaxError listing every syntax error, in line order."""
    linecache.cache[file] = (len(text), None, text.splitlines(True), file)  # for underlined messages
    lines = text.split("\n")
    diagnostics: list[Diagnostic] = []
    while True:
        try:
            tree = _lark().parse("\n".join(lines).rstrip("\n") + "\n")
            break
        except UnexpectedInput as e:
            diagnostics.append(_diagnostic(e, file, lines))
            line = getattr(e, "line", -1)
            at_end = isinstance(e, UnexpectedToken) and e.token.type == "$END"
            if at_end or not 1 <= line <= len(lines) or not lines[line - 1].strip() \
                    or len(diagnostics) >= _MAX_REPORTED:
                break
            lines[line - 1] = ""  # skip the bad line and look for more errors
    if diagnostics:
        raise IvxSyntaxError(diagnostics)
    try:
        body = _ToAst(file).transform(tree)
    except VisitError as e:  # a literal lark accepted but Python does not (an odd escape)
        raise IvxSyntaxError.at(Span(file, 1), f"cannot read this file: {e.orig_exc}") from None
    return ast.Module(body, _comments(text.split("\n")), file)


def _comments(lines: list[str]) -> tuple[ast.Comment, ...]:
    """`# ...` comments, found outside string literals."""
    out = []
    for number, line in enumerate(lines, 1):
        quote = ""
        for i, ch in enumerate(line):
            if quote:
                if ch == "\\":
                    continue
                if ch == quote and line[i - 1] != "\\":
                    quote = ""
            elif ch in "\"'":
                quote = ch
            elif ch == "#":
                out.append(ast.Comment(number, line[i:].rstrip(), not line[:i].strip()))
                break
    return tuple(out)


def _diagnostic(e: UnexpectedInput, file: str, lines: list[str]) -> Diagnostic:
    line, col = getattr(e, "line", 1), getattr(e, "column", 1)
    named = e.match_examples(_lark().parse, _in_contexts(), use_accepts=True)
    span = Span(file, line, col, line, col + 1)
    if isinstance(e, UnexpectedCharacters):
        found = repr(lines[line - 1][col - 1]) if line <= len(lines) and col <= len(lines[line - 1]) else "?"
        if found in ("'\"'", '"\'"'):
            named = "unterminated string: close it with the same quote on this line"
    elif isinstance(e, UnexpectedToken):
        found = {"_NL": "end of line", "$END": "end of file"}.get(e.token.type, repr(str(e.token)))
        if e.token.type == "$END":
            line = max((i + 1 for i, text in enumerate(lines) if text.strip()), default=1)
        if e.token.type in ("_NL", "$END"):
            end = len(lines[line - 1]) + 1 if line <= len(lines) else 1
            span = Span(file, line, max(1, end - 1), line, end)
    else:
        found = "unexpected input"
    expected = sorted({_READABLE.get(t, t.lower()) for t in (getattr(e, "expected", None) or
                                                             getattr(e, "allowed", None) or ())})
    if not named and found in ("end of line", "end of file"):
        named = next((text for closer, text in _CLOSERS.items() if closer in expected), None)
    message = named or f"unexpected {found}"
    hint = f"found {found}" if named else ""
    if expected and not named:
        shown = [x if x.startswith(("a ", "an ", "end")) else f"`{x}`" for x in expected[:8]]
        hint = "expected " + (", ".join(shown[:-1]) + " or " + shown[-1] if len(shown) > 1 else shown[0])
        hint += ", ..." if len(expected) > 8 else ""
    return Diagnostic(span, f"syntax error: {message}", hint)


def parse_file(path: str | Path) -> ast.Module:
    path = Path(path)
    return parse(read_source(path), str(path))


def read_source(path: Path) -> str:
    """The text of an `.ivx` file, newlines made `\\n`; a binary or non-UTF-8 file is an
    IvxSyntaxError naming the first bad byte's line and offset."""
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _unreadable(path, data, e.start, f"byte 0x{data[e.start]:02x} is not UTF-8") from None
    if "\0" in text:
        raise _unreadable(path, data, data.index(b"\0"), "a NUL byte: this is a binary file")
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _unreadable(path: Path, data: bytes, offset: int, found: str) -> IvxSyntaxError:
    """The error at byte `offset`, its line shown with undecodable bytes replaced."""
    start = data.rfind(b"\n", 0, offset) + 1
    line = data.count(b"\n", 0, offset) + 1
    col = len(data[start:offset].decode("utf-8", "replace")) + 1
    shown = data.decode("utf-8", "replace").replace("\0", "\ufffd")
    linecache.cache[str(path)] = (len(shown), None, shown.splitlines(True), str(path))
    return IvxSyntaxError.at(Span(str(path), line, col, line, col + 1),
                             f"cannot read this file as .ivx text: {found} (byte offset {offset})",
                             "save it as UTF-8 text")
