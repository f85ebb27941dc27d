"""Declaring a `.ivx` experiment: parse the file, resolve its declarations (model, prompts,
tensors, params, sweeps, generate) into an `Experiment`, with errors at the file's lines."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from compiler.errors import Diagnostic, InterventionError, did_you_mean
from compiler.ir import Span
from grammar import ast
from grammar.parser import parse, read_source
from runtime.datasets import DatasetError, PromptFile, not_a_file


class ExperimentError(InterventionError):
    """A name, prompt, file or value in an `.ivx` experiment is wrong."""


def experiment_error(span: Span, message: str, hint: str = "") -> ExperimentError:
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
            raise experiment_error(decl.span, f"prompt {decl.name} has no text",
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
            raise experiment_error(decl.span, "a second `generate` line", "give every argument on one line")
        exp.generate = {}
        for kwarg in decl.kwargs:
            if kwarg.name not in GENERATE_ARGUMENTS:
                raise experiment_error(kwarg.span, f"generate takes no argument {kwarg.name!r}",
                             did_you_mean(kwarg.name, GENERATE_ARGUMENTS) or
                             f"its arguments: {', '.join(GENERATE_ARGUMENTS)}")
            exp.generate[kwarg.name] = _constant(kwarg.value, f"generate's {kwarg.name} is a number or True/False",
                                                 "e.g. generate max_new_tokens=8, do_sample=True, seed=0")
    elif isinstance(decl, ast.ZipSweepDecl):
        if len(decl.names) != len(decl.values):
            raise experiment_error(decl.span, f"sweep names {len(decl.names)} axes but zips {len(decl.values)} value lists",
                         "one list of values per name: sweep a, b in zip([...], [...])")
        values = [_sweep_values(n, v, decl.span) for n, v in zip(decl.names, decl.values, strict=True)]
        if len({len(v) for v in values}) > 1:
            raise experiment_error(decl.span, "zipped axes need the same number of values: " +
                         ", ".join(f"{n} has {len(v)}" for n, v in zip(decl.names, values, strict=True)))
        exp.sweeps.update(zip(decl.names, values, strict=True))
        exp.zipped.append(decl.names)


GENERATE_ARGUMENTS = ("max_new_tokens", "do_sample", "temperature", "top_k", "top_p", "seed")


MAX_SWEEP_POINTS = 1_000_000  # every combination of sweep values: beyond this a sweep is a mistake


def _sweep_values(name: str, values: ast.Range | ast.ListLit, span: Span) -> Sequence[Any]:
    """A range stays a `range` (checking reads only its ends)."""
    if isinstance(values, ast.Range):
        if values.stop <= values.start:
            raise experiment_error(span, f"sweep {name} is empty: {values.start}..{values.stop}",
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
    return experiment_error(span, f"{found}; an experiment sweeps at most {MAX_SWEEP_POINTS:,} points",
                  "sweep fewer values (a coarser range, or fewer axes), or split the sweep over several runs")


def _given_param(exp: Experiment, decl: ast.ParamDecl) -> Any:
    from compiler.check import type_of
    from compiler.printer import DTYPE_SHORT, format_type

    kinds = ("int", "float", "bool") if decl.shape is None else tuple(DTYPE_SHORT.values())
    if decl.kind not in kinds:
        raise experiment_error(decl.span, f"param {decl.name} has the unknown type {decl.kind!r}",
                     did_you_mean(decl.kind, kinds) or f"types: {', '.join(kinds)}"
                     + ("" if decl.shape is not None else "; a tensor type has a shape, e.g. f32[576]"))
    if decl.name not in exp.given:
        raise experiment_error(decl.span, f"param {decl.name} has no value",
                     f"give it when running: --param {decl.name}=FILE.safetensors[:KEY] or a number")
    value = exp.given[decl.name]
    if decl.kind == "int" and isinstance(value, float) and value.is_integer():
        value = int(value)  # `--param n=3` arrives as a number
    declared = decl.kind + (f"[{', '.join(map(str, decl.shape))}]" if decl.shape is not None else "")
    found = format_type(type_of(value))
    if found != declared:
        raise experiment_error(decl.span, f"param {decl.name} is declared {declared} but given {found}")
    return value


def _constant(e: ast.Expr, what: str = "sweep values are numbers",
              hint: str = "write them as a list: [0.5, 1.0, 2.0]") -> Any:
    if isinstance(e, ast.Literal) and not isinstance(e.value, str):
        return e.value
    if isinstance(e, ast.Unary) and e.op == "-" and isinstance(e.operand, ast.Literal):
        return -e.operand.value  # type: ignore[operator]
    raise experiment_error(e.span, what, hint)


def _string_arg(call: ast.Call, index: int, what: str) -> str:
    if len(call.args) <= index or not isinstance(call.args[index], ast.Literal) \
            or not isinstance(call.args[index].value, str):  # type: ignore[union-attr]
        raise experiment_error(call.span, f"{what} expects a file name as a string")
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
            raise experiment_error(value.span, not_a_file(path))
        return PromptFile(path, kind, _kwarg(value, "column" if kind == "csv" else "field", "text") or "text")
    raise experiment_error(value.span, "a prompt is a string, a list of strings, a list of token ids, or "
                             "lines(\"f.txt\"), jsonl(\"f.jsonl\", field=\"text\"), csv(\"f.csv\", column=\"text\")")


def _first_row(source: PromptFile, span: Span) -> str:
    """The file's first prompt, its record checked (later ones are checked as they stream)."""
    try:
        first = next(source.rows(), None)
    except DatasetError as e:  # named at the declaration, with the record's own file:line
        found = e.diagnostics[0]
        raise experiment_error(span, f"{found.span}: {found.message}", found.hint) from None
    if first is None:
        raise experiment_error(span, f"{source.path} holds no prompts")
    return first


def _load_tensor(value: ast.Expr, base: Path) -> torch.Tensor:
    if not (isinstance(value, ast.Call) and isinstance(value.func, ast.Name) and value.func.id == "load"):
        raise experiment_error(value.span, "a tensor is declared with load(\"file.safetensors\", key=\"name\")")
    return read_tensor(base / _string_arg(value, 0, "load(...)"), _kwarg(value, "key"), value.span)


def read_tensor(path: Path, key: str | None, span: Span) -> torch.Tensor:
    """Tensor `key` of a safetensors file (its only one when `key` is None), read alone; a file
    that is missing, truncated or not safetensors is an error at `span`."""
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        raise experiment_error(span, f"tensor file {path} does not exist")
    try:
        with safe_open(str(path), "pt") as f:
            return f.get_tensor(_tensor_key(path, list(f.keys()), key, span))
    except (SafetensorError, OSError, TypeError, ValueError) as e:
        raise experiment_error(span, f"cannot read {path} as safetensors: {e}",
                     "the file is truncated or not a safetensors file (write one with safetensors.torch.save_file)") from None


def _tensor_key(path: Path, keys: list[str], key: str | None, span: Span) -> str:
    if key is None:
        if len(keys) != 1:
            raise experiment_error(span, f"{path} holds {len(keys)} tensors; say which one", f"keys: {', '.join(sorted(keys))}")
        return keys[0]
    if key not in keys:
        raise experiment_error(span, f"{path} has no tensor {key!r}", did_you_mean(key, keys) or f"keys: {', '.join(sorted(keys))}")
    return key


# --------------------------------------------------------------------------------------- lowering
