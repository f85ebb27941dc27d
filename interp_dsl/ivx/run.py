"""Running a declared experiment: its model, one run per sweep point (`ivx explain`, tests), or a
sweep over its prompts (`ivx run`)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from compiler.errors import InterventionError
from compiler.ir import Span, to_json
from compiler.shape_rules import is_tensor_like
from grammar import ast
from grammar.printer import format_module
from interp_dsl.conditions import HIDDEN
from interp_dsl.ivx.declare import Experiment, ExperimentError, experiment_error
from interp_dsl.ivx.lower import Lowering, edited, generation_settings, lower_traces
from interp_dsl.models import LanguageModel, Model
from interp_dsl.sweeps import Sweep, plain_value
from interp_dsl.tracing import Tracer
from runtime.files import versions
from runtime.fingerprints import value_digest, weights_fingerprint
from runtime.shards import Results, ShardSink, load_results


def resolve_model(exp: Experiment, override: str | None = None, weights: str = "random") -> Model:
    """The experiment's model (`--model` overrides its `model` line); `weights="fake"` reads only
    its config (for a remote run, or the driver of a Ray run)."""
    source = override or exp.model_source
    if source is None:
        raise experiment_error(Span(str(exp.path), 1), "the experiment names no model",
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
    """Run every sweep point and collect the saves (of every trace of a session). Sweep values are
    parameters, so every point of a sweep runs the same compiled graph (see `Model.trace` for the
    `compile` modes)."""
    points = exp.points()
    per_point: list[dict[str, Any]] = []
    hashes: list[str] = []
    for point in points:
        tracers = lower_traces(exp, model, point, compile=compile)
        per_point.append({n: v for tracer in tracers for n, v in tracer.result.saves.items()})
        hashes.append(_hash(tracers))
    names = list(per_point[0])
    if exp.sweeps:
        axes = [len(exp.sweeps[g[0]]) for g in exp.axes()]
        saves = {n: torch.stack([_as_tensor(p[n]) for p in per_point]).reshape(*axes, *_as_tensor(per_point[0][n]).shape)
                 for n in names}
    else:
        saves = {n: _as_tensor(per_point[0][n]) for n in names}
    return RunOutput(saves, points, hashes)


def _hash(tracers: list[Tracer]) -> str:
    """The structural hash of a trace's program; of a session, of its programs in order."""
    hashes = [t.typed.program.structural_hash() for t in tracers]
    return hashes[0] if len(hashes) == 1 else hashlib.sha256("\0".join(hashes).encode()).hexdigest()


def _session_hash(exp: Experiment, tracers: list[Tracer]) -> str:
    """A session's identity: its programs, and its statements (arithmetic on an earlier trace's
    values runs between traces, so the programs alone do not show it); comments do not count."""
    text = format_module(ast.Module(exp.module.body))
    return hashlib.sha256(f"{_hash(tracers)}\0{text}".encode()).hexdigest()


@dataclass
class SessionRun:
    """An `ivx run` of a session: its results (one row per sweep point) and whether it ran."""

    results: Results
    ran: int


def run_session(exp: Experiment, model: Model, out: Path, compile: str | None = None,
                restart: bool = False) -> SessionRun:
    """Run a session (`trace` blocks) at every sweep point and write the saves of all its traces
    as one shard in `out` (a row per point), under a manifest like a sweep's. A session is run
    whole: a directory holding its complete results is not run again."""
    for name in exp.sources:
        line = next(d.span for d in exp.module.body if isinstance(d, ast.PromptDecl) and d.name == name)
        raise experiment_error(line, f"prompt {name} streams rows from a file, and a session runs each trace once",
                               "give a session its prompts as text or a list: prompt p = [\"a\", \"b\"]")
    points = exp.points()
    scanned, shapes = _scan_session(exp, model, points)
    header = {
        "experiment": str(exp.path), "text": exp.text, "session": len(scanned),
        "ir_hash": _session_hash(exp, scanned), "values": {n: value_digest(v) for n, v in sorted(exp.tensors.items())},
        "model": model._engine.name, "weights": weights_fingerprint(model._engine.module),
        "prompts": {n: {"literal": rows[:2], "rows": len(rows)} for n, rows in exp.prompts.items()},
        "n_prompts": 1, "points": [{k: plain_value(v) for k, v in p.items()} for p in points], "fan_axes": {},
        "dims": [("+".join(g), len(exp.sweeps[g[0]])) for g in exp.axes()], "batch_size": 1, "shard_prompts": 1,
        "passes": [], "versions": versions(), "ir": [to_json(t.typed.program, spans=False) for t in scanned],
    }
    with ShardSink(out, header, restart=restart) as sink:
        if sink.complete:
            return SessionRun(load_results(out), 0)
        sink.start()
        tensors = {n: v.reshape(len(points), *shapes[n]) for n, v in run(exp, model, compile).saves.items()}
        tensors |= {"__prompt__": torch.zeros(len(points), dtype=torch.long), "__point__": torch.arange(len(points)),
                    "__fan__": torch.zeros(len(points), dtype=torch.long)}
        sink.write(0, tensors, 0, 1, [{n: json.dumps(rows) for n, rows in exp.prompts.items()}])
        sink.finish()
    return SessionRun(load_results(out), 1)


def _as_tensor(value: Any) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    return torch.as_tensor(value)


def _scan_session(exp: Experiment, model: Model, points: list[dict[str, Any]]
                  ) -> tuple[list[Tracer], dict[str, tuple[int, ...]]]:
    """Check the session at every point before anything runs: its results stack each save over
    the points, so every save is a tensor of one shape at all of them. The first point's traces,
    and each save's shape."""
    first: list[Tracer] = []
    seen: dict[str, tuple[tuple[int, ...], dict[str, Any]]] = {}
    for point in points:
        tracers = lower_traces(exp, model, point, execute=False)
        first = first or tracers
        for tracer in tracers:
            for op in tracer.typed.program.ops:
                if op.opcode != "save" or op.target.startswith(HIDDEN):
                    continue
                value = tracer.result.values.get(op.args[0].id)  # type: ignore[union-attr]
                if not is_tensor_like(value):
                    raise experiment_error(op.span, f"save {op.target}: a session's results are tensors, and this is "
                                           f"a {type(value).__name__}", "save a tensor (index the part you want)")
                shape, where = seen.setdefault(op.target, (tuple(value.shape), point))
                if shape != tuple(value.shape):
                    raise experiment_error(op.span, f"save {op.target} is {list(value.shape)} at {point} and "
                                           f"{list(shape)} at {where}; a session's saves are stacked over its sweep points",
                                           "save a value whose shape does not change with the sweep")
    return first, {name: shape for name, (shape, _) in seen.items()}


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
        generation_settings(exp, model)  # a bad argument is an error at the `generate` line
    model = edited(exp, model, {})
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
        lowering = Lowering(exp, model, run.tracer, values, sweep=run)
        lowering.run()
    return run
