"""`.ivx` experiments: declarations, lowering to IR through the proxy API's own IR builder, running.

Lowering drives a `Tracer` exactly as Python code would (attribute access on the model, operators,
`with tracer.invoke(...)`), with spans taken from the file, so an experiment written in `.ivx` and
its proxy-API twin produce the same IR by construction.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from compiler import vocabulary
from compiler.errors import Diagnostic, InterventionError, did_you_mean
from compiler.ir import SITE_KINDS, Generation, Span
from grammar import ast
from grammar.parser import parse, read_source
from interp_dsl import fan
from interp_dsl.envoy import Envoy
from interp_dsl.fan import Fanned
from interp_dsl.models import GeneratorEnvoy, LanguageModel, Model
from interp_dsl.proxy import Proxy, record_call
from interp_dsl.sweeps import Sweep
from interp_dsl.tracing import Tracer
from runtime.datasets import DatasetError, PromptFile, not_a_file

_BINARY: dict[str, Callable[[Any, Any], Any]] = {
    "+": operator.add, "-": operator.sub, "*": operator.mul, "/": operator.truediv,
    "//": operator.floordiv, "%": operator.mod, "@": operator.matmul, "**": operator.pow,
    "==": operator.eq, "!=": operator.ne, "<": operator.lt, "<=": operator.le,
    ">": operator.gt, ">=": operator.ge,
}
_INPLACE = {"+=": operator.iadd, "-=": operator.isub, "*=": operator.imul, "/=": operator.itruediv}
_UNARY = {"-": operator.neg, "+": operator.pos, "~": operator.invert}
_NAMESPACES = {"torch": "torch", "F": "torch.nn.functional", "einops": "einops",
               "linalg": "torch.linalg", "special": "torch.special", "fft": "torch.fft"}
_BUILTINS = {"abs": abs}  # Python's own, recorded as the `abs` operator like in the proxy API
_DTYPES = vocabulary.DTYPES  # "float32" -> torch.float32
_VALUE_ATTRIBUTES = ("shape", "dtype", "ndim", "size", "dim")


class ExperimentError(InterventionError):
    """A name, prompt, file or value in an `.ivx` experiment is wrong."""


def _error(span: Span, message: str, hint: str = "") -> ExperimentError:
    return ExperimentError([Diagnostic(span, message, hint)])


@dataclass
class Experiment:
    """A parsed `.ivx` file with its declarations resolved (prompts read, tensors loaded)."""

    module: ast.Module
    path: Path
    text: str
    model_source: str | None = None
    prompts: dict[str, list[str]] = field(default_factory=dict)
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)  # loaded and `param` values
    sweeps: dict[str, Sequence[Any]] = field(default_factory=dict)  # a range stays a range
    given: dict[str, Any] = field(default_factory=dict)  # prompts and params given at run time
    sources: dict[str, PromptFile] = field(default_factory=dict)  # prompts read from files, as streams
    zipped: list[tuple[str, ...]] = field(default_factory=list)  # sweep axes declared with zip(...)
    generate: dict[str, Any] | None = None  # `generate ...` arguments: the experiment generates

    def axes(self) -> list[tuple[str, ...]]:
        """The sweep axes in declaration order: one name, or the names of a zipped group."""
        grouped = {n for names in self.zipped for n in names}
        out: list[tuple[str, ...]] = []
        for name in self.sweeps:
            group = next((g for g in self.zipped if name in g), (name,))
            if name not in grouped or name == group[0]:
                out.append(group)
        return out

    def points(self) -> list[dict[str, Any]]:
        """Every combination of sweep values (one empty point when nothing is swept); zipped
        axes move together."""
        groups = [[dict(zip(g, values, strict=True)) for values in zip(*(self.sweeps[n] for n in g), strict=True)]
                  for g in self.axes()]
        return [{k: v for part in combo for k, v in part.items()} for combo in itertools.product(*groups)]


def load_experiment(path: str | Path, prompts: dict[str, Any] | None = None,
                    params: dict[str, Any] | None = None) -> Experiment:
    """Parse `path` and resolve its declarations; raises IvxSyntaxError or ExperimentError.
    `prompts` and `params` give values to `prompt name` and `param name: type` declarations."""
    path = Path(path)
    return experiment_from_text(read_source(path), path, prompts, params)


def experiment_from_text(text: str, path: str | Path, prompts: dict[str, Any] | None = None,
                         params: dict[str, Any] | None = None, module: ast.Module | None = None) -> Experiment:
    """Like `load_experiment` for text in memory (`path` names it in messages and anchors files;
    `module` is the text already parsed)."""
    path = Path(path)
    module = module or parse(text, str(path))
    experiment = Experiment(module, path, text, given={**(prompts or {}), **(params or {})})
    diagnostics: list[Diagnostic] = []
    for decl in module.body:
        try:
            _declare(experiment, decl)
        except InterventionError as e:
            diagnostics.extend(e.diagnostics)
    diagnostics.extend(_sweep_size(experiment) + _undeclared(experiment))
    if diagnostics:
        raise ExperimentError(diagnostics)
    return experiment


def _undeclared(exp: Experiment) -> list[Diagnostic]:
    """Values given for names the file declares no `prompt` or `param` for (a misspelt --param)."""
    declared = [d.name for d in exp.module.body if isinstance(d, (ast.PromptDecl, ast.ParamDecl))]
    return [Diagnostic(Span(str(exp.path), 0), f"a value is given for {name!r}, which is not a prompt or param "
                       "of this experiment", did_you_mean(name, declared) or f"it declares: {', '.join(declared) or 'none'}")
            for name in exp.given if name not in declared]


def _declare(exp: Experiment, decl: ast.Decl) -> None:
    if isinstance(decl, ast.ModelDecl):
        exp.model_source = decl.source
    elif isinstance(decl, ast.PromptDecl):
        if decl.name in exp.given:
            value = exp.given[decl.name]
            if isinstance(value, PromptFile):  # a file streamed by a sweep (`ivx run --prompts`)
                exp.sources[decl.name] = value
                value = _first_row(value, decl.span)
            exp.prompts[decl.name] = [value] if isinstance(value, str) else list(value)
        elif decl.value is None:
            raise _error(decl.span, f"prompt {decl.name} has no text",
                         f"give it when running: --prompt {decl.name}=\"...\"")
        else:
            rows = _prompt_rows(decl.value, exp.path.parent)
            if isinstance(rows, PromptFile):  # streamed by a sweep; checking and `lower` see its first row
                exp.sources[decl.name] = rows
                rows = [_first_row(rows, decl.value.span)]
            exp.prompts[decl.name] = rows
    elif isinstance(decl, ast.ParamDecl):
        exp.tensors[decl.name] = _given_param(exp, decl)
    elif isinstance(decl, ast.TensorDecl):
        exp.tensors[decl.name] = _load_tensor(decl.value, exp.path.parent)
    elif isinstance(decl, ast.SweepDecl):
        exp.sweeps[decl.name] = _sweep_values(decl.name, decl.values, decl.span)
    elif isinstance(decl, ast.Generate):
        if exp.generate is not None:
            raise _error(decl.span, "a second `generate` line", "give every argument on one line")
        exp.generate = {}
        for kwarg in decl.kwargs:
            if kwarg.name not in GENERATE_ARGUMENTS:
                raise _error(kwarg.span, f"generate takes no argument {kwarg.name!r}",
                             did_you_mean(kwarg.name, GENERATE_ARGUMENTS) or
                             f"its arguments: {', '.join(GENERATE_ARGUMENTS)}")
            exp.generate[kwarg.name] = _constant(kwarg.value, f"generate's {kwarg.name} is a number or True/False",
                                                 "e.g. generate max_new_tokens=8, do_sample=True, seed=0")
    elif isinstance(decl, ast.ZipSweepDecl):
        if len(decl.names) != len(decl.values):
            raise _error(decl.span, f"sweep names {len(decl.names)} axes but zips {len(decl.values)} value lists",
                         "one list of values per name: sweep a, b in zip([...], [...])")
        values = [_sweep_values(n, v, decl.span) for n, v in zip(decl.names, decl.values, strict=True)]
        if len({len(v) for v in values}) > 1:
            raise _error(decl.span, "zipped axes need the same number of values: " +
                         ", ".join(f"{n} has {len(v)}" for n, v in zip(decl.names, values, strict=True)))
        exp.sweeps.update(zip(decl.names, values, strict=True))
        exp.zipped.append(decl.names)


MAX_SWEEP_POINTS = 1_000_000  # every combination of sweep values: beyond this a sweep is a mistake


def _sweep_values(name: str, values: ast.Range | ast.ListLit, span: Span) -> Sequence[Any]:
    """A range stays a `range` (checking reads only its ends)."""
    if isinstance(values, ast.Range):
        if values.stop <= values.start:
            raise _error(span, f"sweep {name} is empty: {values.start}..{values.stop}",
                         "a range a..b runs from a up to b-1")
        if values.stop - values.start > MAX_SWEEP_POINTS:
            raise _too_many(span, f"sweep {name} has {values.stop - values.start:,} values")
        return range(values.start, values.stop)
    return [_constant(item) for item in values.items]


def _sweep_size(exp: Experiment) -> list[Diagnostic]:
    """An error at the sweep line where the number of points (the product of the axes so far)
    passes MAX_SWEEP_POINTS."""
    points = 1
    for decl in exp.module.body:
        if isinstance(decl, (ast.SweepDecl, ast.ZipSweepDecl)):
            first = decl.name if isinstance(decl, ast.SweepDecl) else decl.names[0]
            points *= len(exp.sweeps.get(first, ()))  # an axis in error has no values yet
            if points > MAX_SWEEP_POINTS:
                return _too_many(decl.span, f"the sweep has {points:,} points with this axis").diagnostics
    return []


def _too_many(span: Span, found: str) -> ExperimentError:
    return _error(span, f"{found}; an experiment sweeps at most {MAX_SWEEP_POINTS:,} points",
                  "sweep fewer values (a coarser range, or fewer axes), or split the sweep over several runs")


def _given_param(exp: Experiment, decl: ast.ParamDecl) -> Any:
    from compiler.check import type_of
    from compiler.printer import DTYPE_SHORT, format_type

    kinds = ("int", "float", "bool") if decl.shape is None else tuple(DTYPE_SHORT.values())
    if decl.kind not in kinds:
        raise _error(decl.span, f"param {decl.name} has the unknown type {decl.kind!r}",
                     did_you_mean(decl.kind, kinds) or f"types: {', '.join(kinds)}"
                     + ("" if decl.shape is not None else "; a tensor type has a shape, e.g. f32[576]"))
    if decl.name not in exp.given:
        raise _error(decl.span, f"param {decl.name} has no value",
                     f"give it when running: --param {decl.name}=FILE.safetensors[:KEY] or a number")
    value = exp.given[decl.name]
    if decl.kind == "int" and isinstance(value, float) and value.is_integer():
        value = int(value)  # `--param n=3` arrives as a number
    declared = decl.kind + (f"[{', '.join(map(str, decl.shape))}]" if decl.shape is not None else "")
    found = format_type(type_of(value))
    if found != declared:
        raise _error(decl.span, f"param {decl.name} is declared {declared} but given {found}")
    return value


def _constant(e: ast.Expr, what: str = "sweep values are numbers",
              hint: str = "write them as a list: [0.5, 1.0, 2.0]") -> Any:
    if isinstance(e, ast.Literal) and not isinstance(e.value, str):
        return e.value
    if isinstance(e, ast.Unary) and e.op == "-" and isinstance(e.operand, ast.Literal):
        return -e.operand.value  # type: ignore[operator]
    raise _error(e.span, what, hint)


def _string_arg(call: ast.Call, index: int, what: str) -> str:
    if len(call.args) <= index or not isinstance(call.args[index], ast.Literal) \
            or not isinstance(call.args[index].value, str):  # type: ignore[union-attr]
        raise _error(call.span, f"{what} expects a file name as a string")
    return call.args[index].value  # type: ignore[union-attr,return-value]


def _kwarg(call: ast.Call, name: str, default: str | None = None) -> str | None:
    for k in call.kwargs:
        if k.name == name and isinstance(k.value, ast.Literal) and isinstance(k.value.value, str):
            return k.value.value
    return default


def _prompt_rows(value: ast.Expr, base: Path) -> list[str] | PromptFile:
    if isinstance(value, ast.Literal) and isinstance(value.value, str):
        return [value.value]
    if isinstance(value, ast.ListLit) and value.items and all(
            isinstance(i, ast.Literal) and isinstance(i.value, str) for i in value.items):
        return [i.value for i in value.items]  # type: ignore[union-attr,misc]
    if isinstance(value, ast.ListLit) and value.items and all(
            isinstance(i, ast.Literal) and type(i.value) is int for i in value.items):
        return [[i.value for i in value.items]]  # type: ignore[list-item,misc]  one row of token ids
    if isinstance(value, ast.Call) and isinstance(value.func, ast.Name) \
            and value.func.id in ("lines", "jsonl", "csv"):
        kind = value.func.id
        path = base / _string_arg(value, 0, f"{kind}(...)")
        if not path.is_file():
            raise _error(value.span, not_a_file(path))
        return PromptFile(path, kind, _kwarg(value, "column" if kind == "csv" else "field", "text") or "text")
    raise _error(value.span, "a prompt is a string, a list of strings, a list of token ids, or "
                             "lines(\"f.txt\"), jsonl(\"f.jsonl\", field=\"text\"), csv(\"f.csv\", column=\"text\")")


def _first_row(source: PromptFile, span: Span) -> str:
    """The file's first prompt, its record checked (later ones are checked as they stream)."""
    try:
        first = next(source.rows(), None)
    except DatasetError as e:  # named at the declaration, with the record's own file:line
        found = e.diagnostics[0]
        raise _error(span, f"{found.span}: {found.message}", found.hint) from None
    if first is None:
        raise _error(span, f"{source.path} holds no prompts")
    return first


def _load_tensor(value: ast.Expr, base: Path) -> torch.Tensor:
    if not (isinstance(value, ast.Call) and isinstance(value.func, ast.Name) and value.func.id == "load"):
        raise _error(value.span, "a tensor is declared with load(\"file.safetensors\", key=\"name\")")
    return read_tensor(base / _string_arg(value, 0, "load(...)"), _kwarg(value, "key"), value.span)


def read_tensor(path: Path, key: str | None, span: Span) -> torch.Tensor:
    """Tensor `key` of a safetensors file (its only one when `key` is None), read alone; a file
    that is missing, truncated or not safetensors is an error at `span`."""
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        raise _error(span, f"tensor file {path} does not exist")
    try:
        with safe_open(str(path), "pt") as f:
            return f.get_tensor(_tensor_key(path, list(f.keys()), key, span))
    except (SafetensorError, OSError, TypeError, ValueError) as e:
        raise _error(span, f"cannot read {path} as safetensors: {e}",
                     "the file is truncated or not a safetensors file (write one with safetensors.torch.save_file)") from None


def _tensor_key(path: Path, keys: list[str], key: str | None, span: Span) -> str:
    if key is None:
        if len(keys) != 1:
            raise _error(span, f"{path} holds {len(keys)} tensors; say which one", f"keys: {', '.join(sorted(keys))}")
        return keys[0]
    if key not in keys:
        raise _error(span, f"{path} has no tensor {key!r}", did_you_mean(key, keys) or f"keys: {', '.join(sorted(keys))}")
    return key


# --------------------------------------------------------------------------------------- lowering
class _Namespace:
    """`torch`, `F`, `einops` inside an experiment: only whitelisted functions resolve."""

    def __init__(self, prefix: str):
        self.prefix = prefix


class _Lowering:
    def __init__(self, exp: Experiment, model: Model, tracer: Tracer, point: dict[str, Any],
                 sweep: Sweep | None = None):
        self.exp, self.model, self.tracer, self.sweep = exp, model, tracer, sweep
        self.env: dict[str, Any] = {**exp.tensors, **point}
        self.current = Span(str(exp.path), 0)
        self.diagnostics: list[Diagnostic] = []
        tracer.span_source = lambda: self.current

    # statements
    def run(self) -> None:
        for decl in self.exp.module.body:
            if isinstance(decl, ast.Invoke):
                self._invoke(decl)
            elif isinstance(decl, (ast.Let, ast.Assign, ast.Save, ast.Stop)):
                self._statement(decl)
        if self.diagnostics:
            raise ExperimentError(self.diagnostics)

    def _invoke(self, block: ast.Invoke) -> None:
        if block.prompt not in self.exp.prompts:
            self.diagnostics.append(Diagnostic(
                block.span, f"unknown prompt {block.prompt!r}",
                did_you_mean(block.prompt, self.exp.prompts) or
                f"declare it: prompt {block.prompt} = \"...\""))
            return
        invoker = self.sweep.invoke(block.prompt) if self.sweep else self.tracer.invoke(self.exp.prompts[block.prompt])
        with invoker:
            for statement in block.body:
                self._statement(statement)

    def _statement(self, s: ast.Stmt) -> None:
        self.current = s.span
        try:
            if isinstance(s, ast.Let):
                self.env[s.name] = self.eval(s.value)
            elif isinstance(s, ast.Save):
                self._save(s)
            elif isinstance(s, ast.Stop):
                self.tracer.stop()
            elif isinstance(s, ast.Steps):
                self._steps(s)
            else:
                self._assign(s)
        except InterventionError as e:
            file = str(self.exp.path)
            self.diagnostics.extend(d if d.span.file == file else dataclasses.replace(d, span=s.span)
                                    for d in e.diagnostics)

    def _steps(self, s: ast.Steps) -> None:
        if self.exp.generate is None:
            raise _error(s.span, "a steps block is for generation, and this experiment does not generate",
                         "add a line: generate max_new_tokens=8")
        key = slice(None) if s.selector is None else self._subscript(s.selector)
        with self.tracer.iter[key]:
            for statement in s.body:
                self._statement(statement)
        self.current = s.span

    def _save(self, s: ast.Save) -> None:
        value = self.eval(s.value)
        if not isinstance(value, (Proxy, Fanned)):
            raise _error(s.span, f"save {s.name}: the value is not computed by the model",
                         "save values derived from module .output, .input or .inputs")
        self.current = s.span
        value.save(s.name)

    def _assign(self, s: ast.Assign) -> None:
        """Evaluate in Python's order: `t = v` computes v first; `t op= v` computes t's parts,
        reads t, then v, then writes back (so the IR equals the same line in Python)."""
        target, augmented = s.target, s.op != "="
        value = None if augmented else self.eval(s.value)
        if isinstance(target, ast.Name):
            if augmented:
                current = self.eval(target)
                value = self._operator(_INPLACE[s.op], current, self.eval(s.value))
            self.env[target.id] = value
        elif isinstance(target, ast.Attr) and target.name in SITE_KINDS:
            owner = self.eval(target.obj)
            if not isinstance(owner, (Envoy, Model)):
                raise _error(target.span, f"only a module's .{target.name} can be assigned")
            self.current = s.span
            if augmented:
                current = getattr(owner, target.name)
                value = self._operator(_INPLACE[s.op], current, self.eval(s.value))
            self.current = s.span
            setattr(owner, target.name, value)
        elif isinstance(target, ast.Index):
            owner = self.eval(target.obj)
            index = self._subscript(target.items)
            self.current = s.span
            if augmented:
                current = owner[index]
                value = self._operator(_INPLACE[s.op], current, self.eval(s.value))
            self.current = s.span
            owner[index] = value
        else:
            raise _error(target.span, "cannot assign to this",
                         "assign a name, a module's .output/.input/.inputs, or an index of one")

    # expressions
    def eval(self, e: ast.Expr) -> Any:
        outer = self.current
        try:
            return getattr(self, f"_e_{type(e).__name__}")(e)
        except InterventionError as err:
            # The proxy machinery located this in Python; the innermost expression is the place.
            if all(d.span.file == str(self.exp.path) for d in err.diagnostics):
                raise
            raise type(err)([d if d.span.file == str(self.exp.path) else dataclasses.replace(d, span=e.span)
                             for d in err.diagnostics]) from None
        finally:
            self.current = outer

    def _e_Name(self, e: ast.Name) -> Any:
        if e.id in self.env:
            return self.env[e.id]
        if e.id in _NAMESPACES:
            return _Namespace(_NAMESPACES[e.id])
        if e.id in _DTYPES:
            return _DTYPES[e.id]
        known = [*self.env, *_NAMESPACES, *_DTYPES, "model"]
        raise _error(e.span, f"unknown name {e.id!r}",
                     did_you_mean(e.id, known) or "define it first: name = expression, or let name = ...")

    def _e_ModelRef(self, e: ast.ModelRef) -> Any:
        return self.model

    def _e_Literal(self, e: ast.Literal) -> Any:
        return e.value

    def _e_EllipsisLit(self, e: ast.EllipsisLit) -> Any:
        return Ellipsis

    def _e_TupleLit(self, e: ast.TupleLit) -> Any:
        return tuple(self.eval(i) for i in e.items)

    def _e_ListLit(self, e: ast.ListLit) -> Any:
        return [self.eval(i) for i in e.items]

    def _e_Slice(self, e: ast.Slice) -> Any:
        return slice(*(None if p is None else self.eval(p) for p in (e.start, e.stop, e.step)))

    def _subscript(self, items: tuple[ast.Expr, ...]) -> Any:
        values = tuple(self.eval(i) for i in items)
        return values[0] if len(values) == 1 else values

    def _e_Attr(self, e: ast.Attr) -> Any:
        owner = self.eval(e.obj)
        self.current = e.span
        if isinstance(owner, _Namespace):
            if owner.prefix == "torch" and e.name in _DTYPES:
                return _DTYPES[e.name]
            return self._function(f"{owner.prefix}.{e.name}", e.span)
        if isinstance(owner, Fanned):
            return fan.apply(lambda o: self._attribute(o, e.name, e.span), owner)
        return self._attribute(owner, e.name, e.span)

    def _attribute(self, owner: Any, name: str, span: Span) -> Any:
        """`owner.name`, for the names the language declares: a module's submodules, parameters,
        sites and `next`; a value's shape attributes, vocabulary methods and output fields."""
        if name.startswith("_"):
            raise _error(span, f"`.{name}`: private and special names are not part of the language",
                         "use module paths, .output/.input/.inputs, and functions of the vocabulary")
        if isinstance(owner, GeneratorEnvoy) and name == "output":
            return owner.output
        if isinstance(owner, (Envoy, Model)):
            module = owner._module
            if name in SITE_KINDS or name == "next" or name in module._modules or name in module._parameters \
                    or name in module._buffers or (name == "generator" and isinstance(owner, LanguageModel)):
                return getattr(owner, name)
            declared = [*SITE_KINDS, "next", *module._modules, *module._parameters, *module._buffers]
            raise _error(span, f"{owner._display} ({type(module).__name__}) has no submodule, parameter or site {name!r}",
                         did_you_mean(name, declared) or f"its submodules: {', '.join(list(module._modules)[:8]) or 'none'}")
        if isinstance(owner, Proxy):
            if name in _VALUE_ATTRIBUTES or not hasattr(Proxy, name):
                return getattr(owner, name)  # the proxy allows vocabulary methods and output fields only
        elif isinstance(owner, torch.Tensor):  # a loaded tensor: its methods are recorded like a value's
            if name in _VALUE_ATTRIBUTES:
                return getattr(owner, name)
            entry = vocabulary.vocabulary().get(f"Tensor.{name}")
            if entry is not None:
                method = self._function(f"Tensor.{name}", span)
                return method(owner) if entry.kind == "property" else functools.partial(method, owner)
        raise _error(span, f"a {_kind(owner)} has no attribute {name!r} in the language",
                     "tensor methods are listed in docs/vocabulary.md")

    def _e_Index(self, e: ast.Index) -> Any:
        owner = self.eval(e.obj)
        index = self._subscript(e.items)
        self.current = e.span
        if isinstance(owner, (Envoy, Model)) and isinstance(index, bool | float):
            raise _error(e.span, "a module list is indexed with an integer")
        return owner[index]

    def _e_BinOp(self, e: ast.BinOp) -> Any:
        left, right = self.eval(e.left), self.eval(e.right)
        self.current = e.span
        return self._operator(_BINARY[e.op], left, right)

    def _e_Unary(self, e: ast.Unary) -> Any:
        operand = self.eval(e.operand)
        self.current = e.span
        return self._operator(_UNARY[e.op], operand)

    def _operator(self, fn: Callable[..., Any], *operands: Any) -> Any:
        """Operators on traced values are recorded by the proxies. On loaded tensors with numbers
        they run now (as in Python: the result is no larger than the tensor); between loaded
        tensors they are recorded, since broadcasting could allocate without bound; on numbers
        they are bounded."""
        if any(isinstance(o, (Proxy, Fanned)) for o in operands):
            return fn(*operands)
        name = fn.__name__.removeprefix("i") if fn in _INPLACE.values() else fn.__name__
        tensors = sum(isinstance(o, torch.Tensor) for o in operands)
        if tensors == 1 and all(isinstance(o, (torch.Tensor, int, float, bool)) for o in operands):
            return getattr(operator, name)(*operands)  # `t += 1` on a loaded tensor makes a new one
        if tensors:
            return self.tracer.call(name, operands, {})
        try:
            return vocabulary.python_operator(name, *operands)
        except (TypeError, OverflowError, ZeroDivisionError, ValueError) as err:
            raise _error(self.current, str(err)) from None

    def _e_Call(self, e: ast.Call) -> Any:
        if isinstance(e.func, ast.Name) and e.func.id not in self.env:
            if e.func.id == "token":
                return self._token(e)
            func = _BUILTINS.get(e.func.id) or self._function(f"torch.{e.func.id}", e.func.span, short=e.func.id)
        else:
            func = self.eval(e.func)
        args = [self.eval(a) for a in e.args]
        kwargs = {k.name: self.eval(k.value) for k in e.kwargs}
        self.current = e.span
        if not callable(func):
            raise _error(e.func.span, f"{type(func).__name__} is not callable")
        return func(*args, **kwargs)

    def _function(self, name: str, span: Span, short: str | None = None) -> Callable[..., Any]:
        """A vocabulary function as a recorder: calling it records an op (a factory included:
        nothing is computed or allocated while lowering)."""
        if name in vocabulary.vocabulary() and vocabulary.vocabulary()[name].kind not in ("operator", "property"):
            return lambda *args, **kwargs: record_call(self.tracer, name, args, kwargs)
        prefix = name.rpartition(".")[0]
        candidates = [n.rpartition(".")[2] for n in vocabulary.vocabulary() if n.rpartition(".")[0] == prefix]
        hint = did_you_mean(short or name.rpartition(".")[2], candidates)
        raise _error(span, f"unknown function {short or name!r}",
                     hint or "functions are torch's (softmax, topk, ...), torch.nn.functional as F.*, "
                             "einops.*, and token(\"text\"); docs/vocabulary.md lists them")

    def _token(self, e: ast.Call) -> int:
        tokenizer = getattr(self.model, "tokenizer", None)
        if len(e.args) != 1 or not isinstance(e.args[0], ast.Literal) or not isinstance(e.args[0].value, str):
            raise _error(e.span, "token(...) takes one string: token(\" Paris\")")
        if tokenizer is None:
            raise _error(e.span, "token(...) needs a model with a tokenizer")
        ids = tokenizer.encode(e.args[0].value, add_special_tokens=False)
        if len(ids) != 1:
            pieces = [tokenizer.decode([i]) for i in ids]
            raise _error(e.span, f"{e.args[0].value!r} is {len(ids)} tokens, not one: {pieces}",
                         "use the text of a single token, often with its leading space")
        return ids[0]


def _kind(value: Any) -> str:
    if isinstance(value, tuple):
        return "shape" if all(type(v) is int for v in value) else "tuple"
    return {bool: "boolean", int: "number", float: "number", str: "string"}.get(type(value), type(value).__name__)


def lower(exp: Experiment, model: Model, point: dict[str, Any], execute: bool = True,
          compile: str | None = None) -> Tracer:
    """Record `exp` at one sweep point as a trace on `model`; on return it has run (or, with
    `execute=False`, only been checked). Raises ExperimentError / CheckError at the file's lines."""
    tracer = model.trace(compile=compile) if execute else model.scan()
    if exp.generate is not None:
        tracer.generation = _generation_settings(exp, model)
    with tracer:
        _Lowering(exp, model, tracer, point).run()
    return tracer


GENERATE_ARGUMENTS = ("max_new_tokens", "do_sample", "temperature", "top_k", "top_p", "seed")


def _generation_settings(exp: Experiment, model: Model) -> Generation:
    line = next(d.span for d in exp.module.body if isinstance(d, ast.Generate))
    if not isinstance(model, LanguageModel):
        raise _error(line, "only a language model generates")
    try:
        return model.generation_settings(**exp.generate)  # type: ignore[arg-type]
    except InterventionError as e:
        raise ExperimentError([dataclasses.replace(d, span=line) for d in e.diagnostics]) from None


def resolve_model(exp: Experiment, override: str | None = None, weights: str = "random") -> Model:
    """The experiment's model (`--model` overrides its `model` line); `weights="fake"` reads only
    its config (for a remote run, or the driver of a Ray run)."""
    source = override or exp.model_source
    if source is None:
        raise _error(Span(str(exp.path), 1), "the experiment names no model",
                     "add a line: model \"smollm2-135m\" (or pass --model)")
    if exp.model_source and not override and not Path(source).is_absolute() \
            and (exp.path.parent / source).exists():
        source = str(exp.path.parent / source)
    try:
        return LanguageModel(source, weights=weights)
    except InterventionError as e:  # located in our own loader: point at the `model` line
        line = next((d.span for d in exp.module.body if isinstance(d, ast.ModelDecl)), None)
        if override or line is None:
            raise ExperimentError([dataclasses.replace(d, span=Span(f"--model {override or ''}".strip(), 0))
                                   for d in e.diagnostics]) from None
        raise ExperimentError([dataclasses.replace(d, span=line) for d in e.diagnostics]) from None


@dataclass
class RunOutput:
    """Saved tensors (stacked over sweep points when the experiment sweeps) and their context."""

    saves: dict[str, torch.Tensor]
    points: list[dict[str, Any]]
    ir_hashes: list[str]


def run(exp: Experiment, model: Model, compile: str | None = None) -> RunOutput:
    """Run every sweep point and collect the saves. Sweep values are parameters, so every point
    of a sweep runs the same compiled graph (see `Model.trace` for the `compile` modes)."""
    points = exp.points()
    per_point: list[dict[str, Any]] = []
    hashes: list[str] = []
    for point in points:
        tracer = lower(exp, model, point, compile=compile)
        per_point.append({n: v for n, v in tracer.result.saves.items()})
        hashes.append(tracer.typed.program.structural_hash())
    names = list(per_point[0])
    if exp.sweeps:
        axes = [len(exp.sweeps[g[0]]) for g in exp.axes()]
        saves = {n: torch.stack([_as_tensor(p[n]) for p in per_point]).reshape(*axes, *_as_tensor(per_point[0][n]).shape)
                 for n in names}
    else:
        saves = {n: _as_tensor(per_point[0][n]) for n in names}
    return RunOutput(saves, points, hashes)


def _as_tensor(value: Any) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    return torch.as_tensor(value)


def sweep(exp: Experiment, model: Model, *, prompts: dict[str, Any] | None = None, batch_size: int = 32,
          out: str | Path | None = None, compile: str | None = None, shard_size: int = 1024,
          progress: bool | None = None, restart: bool = False, remote: Any = False,
          executor: Any = "local") -> Sweep:
    """Run `exp` over every row of its prompts (files stream; a single prompt repeats for every
    row; `prompts` replaces sources by name) and every point of its sweeps, as `model.sweep` does.
    Integer sweeps are vectorised into the batch; the others run the same graph per value."""
    sources: dict[str, Any] = {}
    for name, rows in exp.prompts.items():
        sources[name] = exp.sources.get(name, rows)
    sources.update(prompts or {})
    invoked = [d.prompt for d in exp.module.body if isinstance(d, ast.Invoke)]
    sources = {n: s for n, s in sources.items() if n in invoked} or sources
    describe = {"experiment": str(exp.path), "text": exp.text}
    if exp.generate is not None:
        _generation_settings(exp, model)  # a bad argument is an error at the `generate` line
    run = Sweep(model, sources, batch_size=batch_size, out=out, compile=compile, shard_size=shard_size,
                progress=progress, describe=describe, restart=restart, generate=exp.generate, remote=remote,
                executor=executor)
    with run:
        values: dict[str, Any] = {}
        for group in exp.axes():
            if len(group) == 1:
                values[group[0]] = run.param(group[0], exp.sweeps[group[0]])
            else:
                values.update(zip(group, run.zip(**{n: exp.sweeps[n] for n in group}), strict=True))
        lowering = _Lowering(exp, model, run.tracer, values, sweep=run)
        lowering.run()
    return run
