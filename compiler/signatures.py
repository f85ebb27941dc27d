"""One fake-tensor forward of the model, recording every site's value and the order of events.

No real computation and no weight memory: parameters are wrapped as fake tensors, inputs are fake.
"""

from __future__ import annotations

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
