"""Persistent edits (nnsight's `model.edit()`): interventions recorded once and made part of the
program of every later trace on the edited model.

`with model.edit() as edited:` records its body like a trace body, without an input; afterwards
every trace (and sweep, and generation) on `edited` begins with those ops, applied to each of its
invokes (and, in a generation, at every step), so they are checked, compiled and spliced like the
trace's own interventions. `model.edit(inplace=True)` edits `model` itself; `clear_edits()` removes
a model's edits. The edit holds IR ops and their parameter values, nothing else.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from compiler.errors import InterventionError
from compiler.ir import Op
from compiler.passes import copied

if TYPE_CHECKING:
    from interp_dsl.models import Model
    from interp_dsl.tracing import Tracer

EDIT_OPCODES = ("read", "write", "call", "module", "weight", "param")


@dataclass(frozen=True)
class Edit:
    """The ops of one edit block, recorded for invoke 0 at step 0, and its parameter values."""

    ops: tuple[Op, ...]
    params: dict[str, Any]


class Editor:
    """`model.edit(inplace=...)`: the context that records an edit."""

    def __init__(self, model: "Model", inplace: bool):
        self.model, self.inplace = model, inplace
        self.edited: Model | None = None
        self.tracer: Tracer | None = None

    def __enter__(self) -> "Model":
        """The edited model (`with model.edit() as edited:`, seed 004); it also unpacks as
        nnsight 0.8.1's `(tracer, edited)`. With `inplace=True`, the model itself."""
        from interp_dsl.tracing import Tracer
        self.edited = self.model if self.inplace else with_edits(self.model, self.model._edits, self)
        tracer = self.tracer = Tracer(self.model._target, None, execute=False)
        tracer.__enter__()
        tracer.current_invoke = 0  # every invoke of a later trace: recorded as the first
        return self.edited

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> bool:
        tracer = self.tracer
        assert tracer is not None and self.edited is not None
        tracer.recording = False
        if tracer.target.open is tracer:
            tracer.target.open = None
        if exc_type is not None:
            return False
        refused = next((op for op in tracer.ops if op.opcode not in EDIT_OPCODES), None)
        if refused is not None:
            raise InterventionError.at(refused.span, f"an edit changes the forward; a {refused.opcode} "
                                       "belongs in a trace", "record saves, stops and gradients in "
                                       "`with model.trace(...)`, on the edited model")
        if not any(op.opcode == "write" for op in tracer.ops):
            raise InterventionError.at(tracer.span_source(), "this edit writes no module value",
                                       "assign a module's .output/.input in the edit block")
        edit = Edit(tuple(tracer.ops), dict(tracer.params))
        object.__setattr__(self.edited, "_edits", (*self.edited._edits, edit))
        return False


def with_edits(model: "Model", edits: tuple[Edit, ...], editor: Editor) -> "Model":
    """Another wrapper of the same module (same engine, site tables and compiled graphs) whose
    traces carry `edits`; unpacked, it is `(editor, itself)`."""
    new = object.__new__(_edited_class(type(model)))
    new.__dict__.update(model.__dict__)
    object.__setattr__(new, "_edits", edits)
    object.__setattr__(new, "_editor", editor)
    return new


@functools.cache
def _edited_class(base: type) -> type:
    def __iter__(self: Any) -> Iterator[Any]:
        return iter((self._editor, self))
    return type(base.__name__, (base,), {"__iter__": __iter__, "__module__": base.__module__})


def edit_params(edits: tuple[Edit, ...]) -> dict[str, Any]:
    """The edits' parameter values under the names their ops have in a trace's program."""
    return {_name(k, name): value for k, edit in enumerate(edits) for name, value in edit.params.items()}


def edit_ops(edits: tuple[Edit, ...], n_invokes: int, first_id: int, steps: int,
             calls_per_step: Callable[[str, str], int]) -> list[Op]:
    """The edits' ops for a program of `n_invokes` invokes (and `steps` generation steps), with
    value ids from `first_id` on: parameters and weights once per edit, the rest per invoke and
    step (a site's call moved on by whole steps)."""
    out: list[Op] = []
    next_id = first_id
    for k, edit in enumerate(edits):
        shared: dict[int, int] = {}
        for op in edit.ops:
            if op.opcode in ("param", "weight"):
                shared[op.result] = next_id  # type: ignore[index]
                target = _name(k, op.target) if op.opcode == "param" else op.target
                out.append(dataclasses.replace(op, result=next_id, target=target))
                next_id += 1
        for invoke in range(n_invokes):
            for step in range(steps):
                ids = dict(shared)
                for op in edit.ops:
                    if op.opcode in ("param", "weight"):
                        continue
                    site = op.site
                    if site is not None:
                        site = dataclasses.replace(site, invoke=invoke,
                                                   call=site.call + step * calls_per_step(site.module, site.phase))
                    result = None
                    if op.result is not None:
                        result = ids[op.result] = next_id
                        next_id += 1
                    out.append(copied(op, ids, result, site=site))
    return out


def _name(k: int, name: str) -> str:
    return f"edit{k}_{name}"
