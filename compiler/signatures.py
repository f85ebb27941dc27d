"""One fake-tensor forward of the model, recording every site's value and the order of events.

No real computation and no weight memory: parameters are wrapped as fake tensors, inputs are fake.
"""

from __future__ import annotations

import bisect
import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

Event = tuple[str, str, int]  # (module path, "pre" | "post", call index)

_NOISY_LOGGERS = ("torch._subclasses.fake_tensor", "torch.fx.experimental.symbolic_shapes")


@contextlib.contextmanager
def quiet_fake_mode() -> Iterator[None]:
    """Fake mode logs long tracebacks when an op fails; users should see only our message.
    (`disabled`, unlike `setLevel`, does not flush logging's caches: this runs per op typed.)"""
    loggers = [logging.getLogger(n) for n in _NOISY_LOGGERS]
    before = [lg.disabled for lg in loggers]
    for lg in loggers:
        lg.disabled = True
    try:
        yield
    finally:
        for lg, was in zip(loggers, before, strict=True):
            lg.disabled = was


@dataclass
class SiteTable:
    """The model's events in forward order, with the fake value seen at each."""

    mode: FakeTensorMode
    batch_size: int
    order: list[Event] = field(default_factory=list)
    values: dict[Event, Any] = field(default_factory=dict)
    calls: dict[str, int] = field(default_factory=dict)  # module path -> number of calls

    positions: dict[Event, int] = field(default_factory=dict)
    # A generation's table (`generation_table`): where each step's events start, calls per step.
    step_starts: list[int] = field(default_factory=list)
    calls_per_step: dict[str, int] = field(default_factory=dict)

    def index(self, event: Event) -> int | None:
        """Position of `event` in the forward, or None if it never happens."""
        return self.positions.get(event)


def module_paths(model: torch.nn.Module) -> dict[int, str]:
    """id(module) -> canonical dotted path (the first name it is registered under)."""
    return {id(m): name for name, m in model.named_modules()}


def record_sites(model: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any],
                 batch_size: int, mode: FakeTensorMode | None = None) -> SiteTable:
    """Run `model(*args, **kwargs)` on fake tensors and record every module's inputs and output.
    `mode` is the fake mode the model's own parameters live in, if they are fake."""
    mode = mode or FakeTensorMode(allow_non_fake_inputs=True)
    table = SiteTable(mode=mode, batch_size=batch_size)
    handles = []

    def record(path: str, phase: str, value: Any) -> None:
        key = f"{path}/{phase}"
        n = table.calls.get(key, 0)
        table.calls[key] = n + 1
        event = (path, phase, n)
        table.positions[event] = len(table.order)
        table.order.append(event)
        table.values[event] = value

    for path, module in model.named_modules():
        handles.append(module.register_forward_pre_hook(
            lambda m, a, k, p=path: record(p, "pre", (tuple(a), dict(k))), with_kwargs=True))
        handles.append(module.register_forward_hook(
            lambda m, a, k, o, p=path: record(p, "post", o), with_kwargs=True))
    try:
        with quiet_fake_mode(), mode, torch.no_grad():
            fake_args, fake_kwargs = torch.utils._pytree.tree_map_only(
                torch.Tensor, mode.from_tensor, (args, kwargs))
            model(*fake_args, **fake_kwargs)
    finally:
        for h in handles:
            h.remove()
    return table


def call_count(table: SiteTable, path: str, phase: str) -> int:
    return table.calls.get(f"{path}/{phase}", 0)


GENERATOR = "generator"  # the pseudo-module whose output is a generation's ids (`model.generator`)


def generation_table(first: SiteTable, decode: SiteTable, steps: int, ids: Any) -> SiteTable:
    """The sites of a whole generation as one forward: the prompt pass's events, then `steps - 1`
    decode steps', then the generator's output (`ids`). A module's call index keeps counting across
    steps, so call `k * calls_per_step + c` is call `c` of step `k`, and `.next()` walks steps."""
    if first.calls != decode.calls:
        changed = sorted(k for k in set(first.calls) | set(decode.calls)
                         if first.calls.get(k) != decode.calls.get(k))
        raise ValueError(f"modules are called a different number of times in a decode step: {changed[:3]}")
    table = SiteTable(mode=first.mode, batch_size=first.batch_size, calls={})
    for k in range(steps):
        step = first if k == 0 else decode
        for path, phase, call in step.order:
            key = f"{path}/{phase}"
            event = (path, phase, call + k * step.calls[key])
            table.positions[event] = len(table.order)
            table.order.append(event)
            table.values[event] = step.values[(path, phase, call)]
        table.step_starts.append(len(table.order) - len(step.order))
    table.calls = {k: v * steps for k, v in first.calls.items()}
    event = (GENERATOR, "post", 0)
    table.positions[event] = len(table.order)
    table.order.append(event)
    table.values[event] = ids
    table.calls[f"{GENERATOR}/post"] = 1
    table.calls_per_step = dict(first.calls)
    return table


def step_of(table: SiteTable, position: int) -> int:
    """The generation step an event position belongs to (the generator's output: one past the last)."""
    if position == len(table.order) - 1:
        return len(table.step_starts)
    return bisect.bisect_right(table.step_starts, position) - 1
