"""`ivx check`: every error that can be known before running, for many spec files, without weights.

Each file is lowered on a config-only model (interp_dsl/config_models.py: fake tensors, no weights) and checked:
- at the extremes of every integer sweep axis (an axis indexing `layers` is checked at 0 and 29);
- with the prompts' real token lengths, and again with each prompt's shortest row, since an index
  that fits the padded batch may not fit its shortest prompt;
- prompts whose text is given only at run time are checked at one token, and index errors that
  depend on their length are reported as warnings.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from compiler.errors import Diagnostic, InterventionError
from compiler.ir import Span
from compiler.printer import DTYPE_SHORT
from grammar import ast
from grammar.parser import IvxSyntaxError
from interp_dsl import embedded
from interp_dsl.conditions import HIDDEN
from interp_dsl.config_models import config_model_for
from interp_dsl.ivx.declare import Experiment, experiment_from_text
from interp_dsl.ivx.lower import lower_traces
from interp_dsl.models import LanguageModel
from interp_dsl.tracing import Tracer
from runtime.files import atomic_write_text

_LENGTH_DEPENDENT = ("index out of range", "slice ")


@dataclass
class CheckReport:
    diagnostics: list[Diagnostic] = field(default_factory=list)
    syntax_error: bool = False
    files: int = 0

    @property
    def errors(self) -> list[Diagnostic]:
        return [d for d in self.diagnostics if d.severity == "error"]

    def exit_code(self) -> int:
        return 2 if self.syntax_error else (1 if self.errors else 0)


def check_files(paths: list[Path], model: str | None = None) -> CheckReport:
    """Check every file; all diagnostics, sorted by file and position."""
    report = CheckReport()
    models: dict[str, LanguageModel] = {}
    for path in paths:
        report.files += 1
        try:
            report.diagnostics.extend(check_file(path, model, models))
        except IvxSyntaxError as e:
            report.syntax_error = True
            report.diagnostics.extend(e.diagnostics)
        except InterventionError as e:
            report.diagnostics.extend(e.diagnostics)
    for m in models.values():
        if m.tokenizer is not None:
            m.tokenizer.save()
    report.diagnostics.sort(key=lambda d: (d.span.file, d.span.line, d.span.col))
    return report


def check_file(path: Path, model: str | None, models: dict[str, LanguageModel]) -> list[Diagnostic]:
    text = path.read_text()
    module = cached_parse(text, str(path))
    prompts, params, symbolic = _placeholders(module)
    exp = experiment_from_text(text, path, prompts=prompts, params=params, module=module)
    source = model or exp.model_source
    if source is None:
        return [Diagnostic(Span(str(path), 1), "the experiment names no model",
                           "add a line: model \"smollm2-135m\" (or pass --model)")]
    key = str((path.parent / source).resolve()) if (path.parent / source).exists() else source
    if key not in models:
        models[key] = config_model_for(source, base=path.parent)
    spec = models[key]
    found: dict[tuple[Span, str], Diagnostic] = {}
    points = _extreme_points(exp)
    scenarios = _length_scenarios(exp, spec)
    saves_something = False
    for point, (scenario, prompt_rows) in itertools.product(points, scenarios):
        exp.prompts = prompt_rows
        diagnostics, saved = _check_point(exp, spec, point)
        saves_something |= saved
        for d in diagnostics:
            d = _explain(d, point, scenario, symbolic, len(points) > 1)
            found.setdefault((d.span, d.message.split(" (when ")[0]), d)
    result = list(found.values())
    if not saves_something and not any(d.severity == "error" for d in result):
        result.append(Diagnostic(_first_invoke_span(module, path), "the experiment saves nothing",
                                 "add `save name = expression` to keep a result", "warning"))
    return result


def cached_parse(text: str, file: str) -> ast.Module:
    """Parse, or reuse the tree of an identical file parsed before (specs rarely change between
    CI runs, and parsing is half of a warm check)."""
    import hashlib

    from grammar.parser import parse
    grammar = (Path(parse.__code__.co_filename).parent / "ivx.lark").read_text()
    key = hashlib.sha256(f"{PARSE_CACHE_VERSION}\0{grammar}\0{file}\0{text}".encode()).hexdigest()[:24]
    path = embedded.cache_root() / "parsed" / f"{key}.json"
    try:
        return ast.from_data(json.loads(path.read_text()))
    except (OSError, ValueError, KeyError, TypeError):
        pass
    module = parse(text, file)  # a syntax error raises before anything is cached
    atomic_write_text(path, json.dumps(ast.to_data(module)))
    return module


PARSE_CACHE_VERSION = 1  # bump when the syntax tree's records change (grammar edits key themselves)


def _check_point(exp: Experiment, spec: LanguageModel, point: dict[str, Any]) -> tuple[list[Diagnostic], bool]:
    tracers: list[Tracer] = []
    diagnostics: list[Diagnostic] = []
    try:
        lower_traces(exp, spec, point, execute=False, opened=tracers)
    except InterventionError as e:
        diagnostics = e.diagnostics
    return diagnostics, any(op.opcode == "save" and not op.target.startswith(HIDDEN) for t in tracers for op in t.ops)


def _placeholders(module: ast.Module) -> tuple[dict[str, Any], dict[str, Any], set[str]]:
    """Stand-ins for prompts and params given only at run time: one token, zero tensors."""
    prompts, params, symbolic = {}, {}, set()
    for decl in module.body:
        if isinstance(decl, ast.PromptDecl) and decl.value is None:
            prompts[decl.name] = [[0]]
            symbolic.add(decl.name)
        elif isinstance(decl, ast.ParamDecl):
            if decl.shape is None:
                params[decl.name] = 0 if decl.kind == "int" else 0.0
            else:
                params[decl.name] = torch.zeros(decl.shape, dtype=_DTYPES.get(decl.kind, torch.float32))
    return prompts, params, symbolic


_DTYPES = {short: getattr(torch, name) for name, short in DTYPE_SHORT.items()}  # "f32" -> torch.float32


def _extreme_points(exp: Experiment) -> list[dict[str, Any]]:
    """Sweep points worth checking: the ends of each integer axis (shapes cannot depend on floats);
    for zipped axes, the points where one of them is at an end."""
    per_group = []
    for group in exp.axes():
        points = [dict(zip(group, values, strict=True)) for values in zip(*(exp.sweeps[n] for n in group), strict=True)]
        ends = {n: (min(exp.sweeps[n]), max(exp.sweeps[n])) for n in group
                if all(isinstance(v, int) and not isinstance(v, bool) for v in exp.sweeps[n])}
        chosen = [p for p in points if any(p[n] in ends[n] for n in ends)] or points[:1]
        per_group.append(list({tuple(p.items()): p for p in chosen}.values()))
    return [{k: v for part in combo for k, v in part.items()} for combo in itertools.product(*per_group)]


def _length_scenarios(exp: Experiment, spec: LanguageModel) -> list[tuple[str, dict[str, list[Any]]]]:
    """The prompts as given, and (when it differs) each prompt cut down to its shortest row."""
    scenarios = [("", dict(exp.prompts))]
    if spec.tokenizer is None:
        return scenarios
    shortest: dict[str, list[Any]] = {}
    notes = []
    for name, rows in exp.prompts.items():
        if rows and all(isinstance(r, str) for r in rows) and len(rows) > 1:
            lengths = [len(spec.tokenizer.encode(r)) for r in rows]
            if min(lengths) != max(lengths):
                shortest[name] = [rows[lengths.index(min(lengths))]]
                n = min(lengths)
                notes.append(f"{name}'s shortest prompt, {n} token{'s' if n != 1 else ''}")
                continue
        shortest[name] = rows
    if notes:
        scenarios.append(("; ".join(notes), shortest))
    return scenarios


def _explain(d: Diagnostic, point: dict[str, Any], scenario: str, symbolic: set[str], swept: bool) -> Diagnostic:
    message, hint, severity = d.message, d.hint, d.severity
    if scenario:
        message += f" (for {scenario})"
    if symbolic and message.startswith(_LENGTH_DEPENDENT):
        severity = "warning"
        hint = (f"the text of prompt {', '.join(sorted(symbolic))} is given at run time; checked at "
                "1 token: this holds only for longer prompts") + (f"; {hint}" if hint else "")
    if swept and point:
        message += " (when " + ", ".join(f"{k}={v}" for k, v in point.items()) + ")"
    return dataclasses.replace(d, message=message, hint=hint, severity=severity)


def _first_invoke_span(module: ast.Module, path: Path) -> Span:
    for decl in module.body:
        if isinstance(decl, ast.Invoke):
            return Span(decl.span.file, decl.span.line, decl.span.col, decl.span.line, decl.span.col + 6)
    return Span(str(path), 1)


# ---------------------------------------------------------------------------------------- output
def render(report: CheckReport, fmt: str) -> str:
    if fmt == "json":
        return json.dumps([{
            "file": d.span.file, "line": d.span.line, "col": d.span.col, "end_line": d.span.end_line,
            "end_col": d.span.end_col, "severity": d.severity, "message": d.message, "hint": d.hint,
        } for d in report.diagnostics], indent=1)
    if fmt == "github":
        return "\n".join(_github(d) for d in report.diagnostics)
    lines = [d.render() for d in report.diagnostics]
    errors, warnings = len(report.errors), len(report.diagnostics) - len(report.errors)
    lines.append(f"checked {report.files} file(s): {errors} error(s), {warnings} warning(s)")
    return "\n".join(lines)


def _github(d: Diagnostic) -> str:
    def escape(text: str) -> str:
        return text.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")
    where = f"file={d.span.file},line={d.span.line}"
    if d.span.col:
        where += f",col={d.span.col}"
    if d.span.end_line:
        where += f",endLine={d.span.end_line}"
    if d.span.end_col and d.span.end_line == d.span.line:
        where += f",endColumn={d.span.end_col}"
    text = d.message + (f" ({d.hint})" if d.hint else "")
    return f"::{d.severity} {where}::{escape(text)}"
