"""The vectorised part of a sweep's grid: the points of its integer axes ride in one batch as
repeated rows, point-major (row r of an expanded invoke of `rows` prompts is prompt r % rows at
point r // rows, points in `itertools.product` order of the axes). Recording (interp_dsl/fan.py)
and running (runtime/sweep_runner.py) both lay rows out with these."""

from __future__ import annotations

import itertools
from typing import Any

import torch


def n_points(axes: dict[str, list[Any]]) -> int:
    """How many points the vectorised axes make together (1 without any)."""
    out = 1
    for values in axes.values():
        out *= len(values)
    return out


def repeat_rows(inputs: Any, times: int) -> Any:
    """An invoke's inputs with every row repeated `times` times, the whole batch after itself."""
    if isinstance(inputs, str):
        return [inputs] * times
    if isinstance(inputs, torch.Tensor):
        return inputs.repeat(times, *([1] * (inputs.dim() - 1))) if inputs.dim() else inputs
    if isinstance(inputs, list) and inputs and isinstance(inputs[0], (str, int)):
        return inputs * times if isinstance(inputs[0], str) else [inputs] * times
    if isinstance(inputs, (list, tuple)):
        return type(inputs)(repeat_rows(x, times) for x in inputs)
    if isinstance(inputs, dict):
        return {k: repeat_rows(v, times) for k, v in inputs.items()}
    return inputs


def row_values(axes: dict[str, list[Any]], rows: int) -> dict[str, torch.Tensor]:
    """Per axis, the index of its value on each row of an expanded invoke of `rows` prompts."""
    points = list(itertools.product(*(range(len(v)) for v in axes.values())))
    return {name: torch.tensor([p[k] for p in points for _ in range(rows)], dtype=torch.int64)
            for k, name in enumerate(axes)}
