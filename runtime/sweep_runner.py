"""Running one recorded experiment over a stream of prompts and a grid of parameter points.

Prompts are read a window (one shard) at a time. Within a window they are sorted by token length
so that batches hold prompts of similar length (little padding), and rows are put back in prompt
order before the shard is written. Every batch has exactly `batch_size` prompts (the last one of a
window repeats its last prompt, and those rows are dropped), so the program recorded once fits
every batch. Each batch runs once per parameter point; vectorised axes ride inside the batch.
A save whose shape depends on the prompts' length (a whole sequence) is refused as soon as prompts
of different lengths meet, whatever the batch size: padded positions are not the prompt's own.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from compiler.errors import InterventionError
from compiler.ir import Program, SaveKey, Span
from runtime.fingerprints import rows_digest
from runtime.grid import n_points, repeat_rows
from runtime.shards import INDEX, ShardSink

InvokeInput = tuple[tuple[Any, ...], dict[str, Any]]
Execute = Callable[[list[InvokeInput], dict[str, Any]], dict[SaveKey, Any]]  # a run's saves, by key
Lengths = Callable[[dict[str, str]], tuple[int, ...]]


class SweepError(InterventionError):
    """A save cannot be laid out as rows (no batch dimension, or a shape that varies by batch)."""


@dataclass
class SweepPlan:
    """What to run for each batch: the program, how its invokes take rows, and the grid."""

    program: Program
    params: dict[str, Any]  # values that stay fixed (tensors, vectorised-axis row indices)
    points: list[dict[str, Any]]  # parameter-axis values, one dict per point
    fan_axes: dict[str, list[Any]]  # vectorised axes: their points ride inside a batch
    invokes: list[tuple[str, bool]]  # per invoke: its prompt name, and whether it is expanded
    batch_size: int
    shard_prompts: int
    model_kwargs: dict[str, Any] = field(default_factory=dict)  # extra forward arguments
    spans: dict[str, Span] = field(default_factory=dict)  # save name -> where it was written
    length_dependent: frozenset[str] = frozenset()  # saves whose shape follows the prompt length
    shared: tuple[str, int, int] | None = None  # the vectorised axis run with the shared-prefix schedule
    schedule: dict[str, Any] = field(default_factory=dict)  # how the rows run, for the manifest

    @property
    def fan_points(self) -> int:
        return n_points(self.fan_axes)


def run_sweep(plan: SweepPlan, rows: Callable[[], Iterator[dict[str, str]]], execute: Execute,
              sink: ShardSink, lengths: Lengths, advance: Callable[[int], None] = lambda n: None,
              sources: str = "the prompts") -> None:
    """Run every window of prompt rows whose shard `sink` does not hold whole; write a shard per
    window. `rows()` streams the rows from the start (a resumed run first checks that the rows of
    the shards it keeps are unchanged); `lengths`: a row's token count per prompt name (batches
    are sorted by the longest); `sources` names the prompts in messages."""
    shapes: dict[str, tuple[int, ...]] = {}
    for window in pending_windows(plan, rows, sink, lengths, sources):
        sink.write(window.index, run_window(plan, window, execute, advance, shapes), window.first,
                   window.stop, window.rows)
    sink.finish()


@dataclass(frozen=True)
class Window:
    """The prompt rows of one shard, and each row's token count (its longest prompt)."""

    index: int
    first: int  # the first row's prompt number
    rows: list[dict[str, str]]
    lengths: list[int]

    @property
    def stop(self) -> int:
        return self.first + len(self.rows)


def pending_windows(plan: SweepPlan, rows: Callable[[], Iterator[dict[str, str]]], sink: ShardSink,
                    lengths: Lengths, sources: str = "the prompts") -> Iterator[Window]:
    """The windows whose shard `sink` does not hold, read lazily (see `run_sweep`). Claims the
    directory first; refuses changed prompt rows and length-dependent saves over mixed lengths."""
    size = plan.shard_prompts
    if sink.recorded:
        last = max(sink.recorded)
        for index, window in enumerate(_windows(rows(), size)):
            if index > last:
                break
            sink.check_inputs(index, rows_digest(window), sources)
    sink.start()
    seen: set[int] = set()
    for index, window in enumerate(_windows(rows(), size)):
        if sink.has(index):
            continue
        counts = [lengths(row) for row in window]
        seen.update(n for row in counts for n in row)
        _refuse_length_dependent(plan, seen)
        yield Window(index, index * size, window, [max(c) for c in counts])


def _windows(rows: Iterator[dict[str, str]], size: int) -> Iterator[list[dict[str, str]]]:
    while window := list(itertools.islice(rows, size)):
        yield window


def _refuse_length_dependent(plan: SweepPlan, lengths: set[int]) -> None:
    if len(lengths) > 1 and plan.length_dependent:
        name = min(plan.length_dependent)
        short, long = min(lengths), max(lengths)
        raise SweepError.at(
            plan.spans.get(name, Span("<sweep>", 0)),
            f"save {name} has a value per token, and the prompts have different lengths ({short} and "
            f"{long} tokens): a sweep's saves must not depend on prompt length",
            "save per-prompt values, e.g. one position: [:, -1]"
            + ("; the new tokens are kept for you as __ids__:<prompt name>" if plan.program.generation else ""))


def run_window(plan: SweepPlan, window: Window, execute: Execute, advance: Callable[[int], None],
               shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """One shard's tensors: the window's rows in batches of similar length, every point, rows put
    back in prompt order. `shapes` (save name -> shape per row) is checked and filled across calls."""
    first, length = window.first, window.lengths
    order = sorted(range(len(window.rows)), key=lambda i: length[i])
    pieces: dict[str, list[torch.Tensor]] = {}
    prompts: list[int] = []
    for at in range(0, len(order), plan.batch_size):
        chunk = order[at: at + plan.batch_size]
        padded = chunk + [chunk[-1]] * (plan.batch_size - len(chunk))
        invokes: list[InvokeInput] = []
        for i, (name, expanded) in enumerate(plan.invokes):
            texts = [window.rows[j][name] for j in padded]
            invokes.append(((repeat_rows(texts, plan.fan_points) if expanded else texts,),
                            dict(plan.model_kwargs) if i == 0 else {}))
        per_point = [_as_rows(plan, execute(invokes, {**plan.params, **point}), len(chunk), shapes)
                     for point in plan.points]
        for name in per_point[0]:
            # [points, fan points, prompts, ...] -> [prompts, points, fan points, ...]
            pieces.setdefault(name, []).append(torch.stack([p[name] for p in per_point]).movedim(2, 0))
        prompts.extend(first + j for j in chunk)
        advance(len(chunk))
    order_back = torch.tensor(prompts).argsort()
    n, p, k = len(window.rows), len(plan.points), plan.fan_points
    out = {name: torch.cat(parts)[order_back].reshape(n * p * k, *parts[0].shape[3:])
           for name, parts in pieces.items()}
    out["__prompt__"] = torch.arange(first, first + n).repeat_interleave(p * k)
    out["__point__"] = torch.arange(p).repeat_interleave(k).repeat(n)
    out["__fan__"] = torch.arange(k).repeat(n * p)
    return out


def _as_rows(plan: SweepPlan, saves: dict[SaveKey, Any], real: int,
             shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """One run's saves as [fan points, prompts, ...] per save name (padding rows dropped); a save
    made per point of some vectorised axes fills the rows of every full point that agrees."""
    axes = list(plan.fan_axes)
    grouped: dict[str, list[tuple[dict[str, int], Any]]] = {}
    for key, value in saves.items():
        grouped.setdefault(key.name, []).append((dict(key.point), value))
    b, k = plan.batch_size, plan.fan_points
    out = {}
    for base, items in grouped.items():
        rows = []
        for f, key in enumerate(itertools.product(*(range(len(plan.fan_axes[a])) for a in axes))):
            full = dict(zip(axes, key, strict=True))
            value = next(v for p, v in items if all(full[a] == i for a, i in p.items()))
            rows.append(_rows_at(plan, base, value, f, b, k, real))
        out[base] = torch.stack(rows)
        _same_shape(plan, base, tuple(out[base].shape[2:]), shapes)
    return out


def check_shard_shapes(plan: SweepPlan, tensors: dict[str, torch.Tensor],
                       shapes: dict[str, tuple[int, ...]]) -> None:
    """Refuse a shard whose saves have another shape per row than earlier shards (shards computed
    apart, e.g. by Ray workers); `shapes` is filled across calls."""
    for name, value in tensors.items():
        if name not in INDEX:
            _same_shape(plan, name, tuple(value.shape[1:]), shapes)


def _same_shape(plan: SweepPlan, name: str, shape: tuple[int, ...], shapes: dict[str, tuple[int, ...]]) -> None:
    if shapes.setdefault(name, shape) != shape:
        raise SweepError.at(
            plan.spans.get(name, Span("<sweep>", 0)),
            f"save {name} has shape [{', '.join(map(str, shapes[name]))}] per row in one batch and "
            f"[{', '.join(map(str, shape))}] in another",
            "a sweep's saves must not depend on prompt length: save a position, e.g. [:, -1]")


def _rows_at(plan: SweepPlan, name: str, value: Any, f: int, b: int, k: int, real: int) -> torch.Tensor:
    rows = value.shape[0] if isinstance(value, torch.Tensor) and value.dim() else None
    if rows == b * k and k > 1:
        return value[f * b: f * b + real]
    if rows == b:
        return value[:real]
    found = f"a {type(value).__name__}" if not isinstance(value, torch.Tensor) else \
        f"shape [{', '.join(map(str, value.shape))}]"
    raise SweepError.at(plan.spans.get(name, Span("<sweep>", 0)),
                        f"save {name} has {found}; in a sweep a save keeps the batch dimension "
                        f"({b} rows per batch here)", "save per-prompt values: index rows with ':', "
                        "and reduce over other dimensions only")
