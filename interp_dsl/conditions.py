"""Conditional interventions and logging inside a trace (seed 004's `tracer.cond` and `tracer.log`),
expressed without callables or control flow in the IR.

`with tracer.cond(c):` — `c` a boolean traced value (a comparison of module values, one element or
broadcasting like `torch.where`: per row, `c[:, None, None]`), a boolean tensor or a Python bool. In the block a write of a module value (or of a
gradient) becomes a select, `site = torch.where(c, new, site)`, so both branches are checked and
compiled like any write; blocks nest (their conditions are and-ed). A save in the block is made
and kept only when `c` holds: otherwise its proxy says that the condition was false. A Python
bool is decided while recording: a false block records no write.

`tracer.log(*values)` prints its values (traced values as their tensors) once the trace has run,
when the conditions of the blocks around it hold. Both keep the values they need as saves under
hidden names (`HIDDEN`), which a trace's results do not show.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from compiler.errors import InterventionError
from compiler.ir import by_name
from interp_dsl.proxy import Proxy
from interp_dsl.spans import user_span

if TYPE_CHECKING:
    from interp_dsl.tracing import Tracer
    from runtime.interpreter import RunResult

HIDDEN = "ivx_hidden_"  # the prefix of saves a frontend makes for itself (conditions, logs, sessions)
FALSE = "its `tracer.cond` condition was false when the trace ran"
NOT_COMPUTED = "its `tracer.cond` condition was not computed: the forward stopped before it"

Condition = bool | Proxy | torch.Tensor


@dataclass
class LogLine:
    """One `tracer.log(...)`: texts and hidden save names, and the condition it was made under."""

    parts: list[tuple[str, Any]]  # ("text", value) or ("saved", hidden name)
    condition: str | bool  # a hidden save name, or a decided Python bool


class CondBlock:
    """`with tracer.cond(c):`"""

    def __init__(self, tracer: "Tracer", condition: Condition):
        self.tracer, self.condition = tracer, condition

    def __enter__(self) -> "CondBlock":
        tracer = self.tracer
        if tracer.fan is not None and not isinstance(self.condition, bool):
            raise InterventionError.at(user_span(), "tracer.cond on a traced value inside a sweep",
                                       "write torch.where(c, new, old) yourself, and save c to filter results")
        if isinstance(self.condition, Proxy):
            _refuse_non_boolean(tracer, self.condition)
        outer = tracer.conditions[-1] if tracer.conditions else True
        tracer.conditions.append(_and(tracer, outer, self.condition))
        return self

    def __exit__(self, *exc: Any) -> None:
        self.tracer.conditions.pop()


def _refuse_non_boolean(tracer: "Tracer", condition: Proxy) -> None:
    if not tracer.invoke_inputs:  # an edit: no shapes yet, the traces of the edited model check it
        return
    dtype = tracer.fake(condition).dtype
    if dtype != torch.bool:
        raise InterventionError.at(user_span(), f"a condition is a boolean, found a {str(dtype).removeprefix('torch.')} "
                                   "value", "compare it: tracer.cond(x.sum() > 0)")


def condition_of(value: Any) -> Condition:
    """A condition as given: a Python bool, or a boolean traced value."""
    if isinstance(value, Proxy) and value._live:
        return value
    if isinstance(value, Proxy):
        value = value.value
    if isinstance(value, torch.Tensor) and value.dtype == torch.bool:
        return bool(value) if value.numel() == 1 else value
    if not isinstance(value, bool):
        raise InterventionError.at(user_span(), f"a condition is a boolean or a boolean traced value, "
                                   f"not a {type(value).__name__}", "compare values: tracer.cond(x.sum() > 0)")
    return value


def _and(tracer: "Tracer", outer: Condition, inner: Condition) -> Condition:
    if isinstance(outer, bool) and isinstance(inner, bool):
        return outer and inner
    if isinstance(outer, bool):
        return inner if outer else False
    if isinstance(inner, bool):
        return outer if inner else False
    return tracer.call("torch.logical_and", (outer, inner), {})


def selected(tracer: "Tracer", new: Any, current: Any) -> Any:
    """The value a write makes under the open conditions: `new` where they hold, else `current`
    (None when a decided condition is false: nothing is written)."""
    condition = tracer.conditions[-1]
    if isinstance(condition, bool):
        return new if condition else None
    return tracer.call("torch.where", (condition, new, current), {})


def keep_condition(tracer: "Tracer") -> str | bool:
    """The open condition, kept for after the run: a hidden save's name, or a decided bool."""
    condition = tracer.conditions[-1] if tracer.conditions else True
    if isinstance(condition, torch.Tensor):  # known while recording
        return bool(condition.all())
    if isinstance(condition, bool):
        return condition
    return hidden_save(tracer, condition)


def hidden_save(tracer: "Tracer", value: Proxy) -> str:
    name = f"{HIDDEN}{len(tracer._saved)}"
    tracer.save(value, name)
    return name


def log(tracer: "Tracer", values: tuple[Any, ...]) -> None:
    """Record `tracer.log(*values)`."""
    if tracer.fan is not None:
        raise InterventionError.at(user_span(), "tracer.log inside a sweep", "save the values instead")
    parts = [("saved", hidden_save(tracer, v)) if isinstance(v, Proxy) and v._live else ("text", v)
             for v in values]
    tracer.logs.append(LogLine(parts, keep_condition(tracer)))


def holds(condition: str | bool, saved: dict[str, Any]) -> bool:
    """Whether a kept condition held in the run (every element, for a tensor); not when the run
    never computed it."""
    if isinstance(condition, bool):
        return condition
    value = saved.get(condition)
    return bool(value.all()) if isinstance(value, torch.Tensor) else bool(value)


def why_missing(condition: str | bool, saved: dict[str, Any]) -> str:
    """Why a save under a condition that did not hold has no value."""
    return NOT_COMPUTED if isinstance(condition, str) and condition not in saved else FALSE


def print_logs(lines: list[LogLine], saved: dict[str, Any]) -> None:
    """Print the log lines whose conditions held, values as the run computed them."""
    for line in lines:
        if holds(line.condition, saved):
            print(*(saved.get(v) if kind == "saved" else v for kind, v in line.parts))


def hide(result: "RunResult") -> None:
    """A run's saves without the hidden ones."""
    result.saved = {k: v for k, v in result.saved.items() if not k.name.startswith(HIDDEN)}
    result.saves = by_name(result.saved)
