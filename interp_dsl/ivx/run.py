"""Running a declared experiment: its model, one run per sweep point (`ivx explain`, tests), or a
sweep over its prompts (`ivx run`)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from compiler.errors import InterventionError
from compiler.ir import Span
from grammar import ast
from interp_dsl.ivx.declare import Experiment, ExperimentError, experiment_error
from interp_dsl.ivx.lower import Lowering, edited, generation_settings, lower
from interp_dsl.models import LanguageModel, Model
from interp_dsl.sweeps import Sweep


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
