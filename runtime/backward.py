"""Gradients in the reference interpreter: a program's backward passes, its gradient reads and
its gradient writes (the `backward`, `grad` and `setgrad` ops), run with tensor hooks.

During the forward, each site whose gradient the program uses keeps the tensor that flows on
(made a leaf that requires grad when nothing before it did, so a frozen model has gradients too).
Once the forward has ended, each backward pass registers one hook per kept tensor and
back-propagates: in a hook, in program order, a `grad` takes the gradient arriving there and a
`setgrad` replaces it (the ops its new value is computed from run there first), so the modules
before the site see the new gradient. Every other op computed from a gradient runs after the last
pass, in program order. A site the metric does not depend on has a zero gradient. Tensors the
user bound with `requires_grad` (a trained intervention) accumulate `.grad` as `backward()` would;
the model's own weights do not.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from compiler import ops
from compiler.check import GRADIENT, TypedProgram
from compiler.errors import ExecutionError
from compiler.ir import Op, Site, refs_of


class BackwardPasses:
    """The gradient part of one run of a typed program."""

    def __init__(self, typed: TypedProgram, rows: Callable[[Site], slice], batch_size: int,
                 positions: dict[tuple[str, str, int], int]):
        self.rows, self.batch_size = rows, batch_size
        self.ops = typed.program.ops
        numbered = list(enumerate(self.ops))
        self.passes = [op for _, op in numbered if op.opcode == "backward"]
        self.after = [(i, op) for (i, op), at in zip(numbered, typed.schedule, strict=True)
                      if at == GRADIENT and op.opcode != "backward"]
        self.by_event: dict[int, list[tuple[int, Op]]] = {}
        for i, op in numbered:
            if op.opcode in ("grad", "setgrad"):
                site: Site = op.site  # type: ignore[assignment]
                event = positions[(site.module, site.phase, site.call)]
                self.by_event.setdefault(event, []).append((i, op))
        self.maker = {op.result: i for i, op in numbered if op.result is not None}
        self.kept: dict[int, tuple[torch.Tensor, list[Any]]] = {}  # op index -> (tensor, path left)
        self.done: set[int] = set()

    @property
    def events(self) -> set[int]:
        """The forward events whose values the gradient ops need."""
        return set(self.by_event)

    def keep(self, event: int, kind: str, live: Any, values: dict[int, Any]) -> Any:
        """At a forward event, keep the tensors whose gradients are taken there; the live value,
        with a tensor that required no gradient replaced by a leaf that does."""
        for index, op in self.by_event.get(event, []):
            if op.site.kind != kind:  # type: ignore[union-attr]
                continue
            path = [ops.materialize(a, values) for a in op.path]
            value, depth = ops.site_value(live, kind), 0
            while depth < len(path) and not isinstance(value, torch.Tensor):
                value, depth = value[path[depth]], depth + 1
            if not value.requires_grad:
                value = value.detach().requires_grad_()
                live = ops.write_site(live, kind, path[:depth], value, slice(0, self.batch_size), self.batch_size)
            self.kept[index] = (value, path[depth:])
        return live

    def run(self, execute: Callable[[Op], None], values: dict[int, Any],
            params: dict[str, Any]) -> None:
        """Run every backward pass, then the ops computed from gradients (`execute` runs one op)."""
        trained = [v for v in params.values() if isinstance(v, torch.Tensor) and v.requires_grad and v.is_leaf]
        for number, op in enumerate(self.passes):
            self._backward(number, op, execute, values, trained, last=number == len(self.passes) - 1)
        for index, op in self.after:
            if index not in self.done:
                execute(op)

    def _backward(self, number: int, op: Op, execute: Callable[[Op], None], values: dict[int, Any],
                  trained: list[torch.Tensor], last: bool) -> None:
        metric = values[op.args[0].id]  # type: ignore[union-attr]
        if not metric.requires_grad:
            raise ExecutionError.at(op.span, "backward(): the value does not depend on anything that "
                                             "has a gradient (is it computed from the model's values?)")
        groups: dict[int, tuple[torch.Tensor, list[tuple[int, Op]]]] = {}
        for index, (tensor, _) in self.kept.items():
            grad_op = self.ops[index]
            if grad_op.backward_pass == number:
                groups.setdefault(id(tensor), (tensor, []))[1].append((index, grad_op))
        handles = [tensor.register_hook(lambda g, todo=todo: self._arrive(g, todo, execute, values))
                   for tensor, todo in groups.values()]
        tensors = [tensor for tensor, _ in groups.values()]
        if not tensors and not trained:
            return  # nothing asks for a gradient of this pass
        try:
            found = torch.autograd.grad(metric, [*tensors, *trained], retain_graph=not last, allow_unused=True)
        except RuntimeError as e:
            raise ExecutionError.at(op.span, f"backward() failed: {str(e).strip().splitlines()[0]}") from None
        finally:
            for h in handles:
                h.remove()
        for tensor, grad in zip(trained, found[len(tensors):], strict=True):
            if grad is not None:
                tensor.grad = grad if tensor.grad is None else tensor.grad + grad
        for _, todo in groups.values():  # sites the metric does not depend on: a zero gradient
            self._arrive(None, todo, execute, values)

    def _arrive(self, grad: torch.Tensor | None, todo: list[tuple[int, Op]],
                execute: Callable[[Op], None], values: dict[int, Any]) -> torch.Tensor | None:
        """The gradient reaching a kept tensor: read and rewritten by its ops, in program order."""
        if all(index in self.done for index, _ in todo):
            return None
        tensor = self.kept[todo[0][0]][0]
        live = torch.zeros_like(tensor) if grad is None else grad
        for index, op in todo:
            rows, path = self.rows(op.site), self.kept[index][1]  # type: ignore[arg-type]
            if op.opcode == "grad":
                value = ops.slice_rows(live, rows, self.batch_size)
                for step in path:
                    value = value[step]
                values[op.result] = value  # type: ignore[index]
            else:
                self._compute(op.args[1], execute, values, op)
                live = ops.write_site(live, "output", path, ops.materialize(op.args[1], values), rows, self.batch_size)
            self.done.add(index)
        return live if grad is not None and live is not grad else None

    def _compute(self, arg: Any, execute: Callable[[Op], None], values: dict[int, Any], user: Op) -> None:
        """Run the not yet computed ops a gradient write's value needs, in program order."""
        needed: set[int] = set()
        stack = [r for r in refs_of(arg) if r not in values]
        while stack:
            index = self.maker[stack.pop()]
            op = self.ops[index]
            if index in needed:
                continue
            if op.opcode == "grad":
                raise ExecutionError.at(user.span, "a gradient written here is computed from a gradient "
                                                   "that the backward has not reached yet")
            needed.add(index)
            stack.extend(r for r in op.refs() if r not in values)
        for index in sorted(needed):
            execute(self.ops[index])
            self.done.add(index)
