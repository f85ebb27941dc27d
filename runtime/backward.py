"""Gradients in the reference interpreter: a program's backward passes, its gradient reads and
its gradient writes (the `backward`, `grad` and `setgrad` ops), run with tensor hooks.

The forward runs with gradients on, the model's floating-point weights made to require them for
its duration (so a frozen model has gradients too; the weights' `.grad` is never written). At
each site whose gradient the program uses, the tensor there is kept, a hook is registered on it
at once, and a copy flows on (in-place work later in the forward cannot touch what is kept). Once
the forward has ended, each backward pass back-propagates from its metric to the kept tensors: in
a hook, in program order, a `grad` takes the gradient arriving there and a `setgrad` replaces it
(the ops its new value needs run there first), so the modules before the site see the new
gradient. Every other op computed from a gradient runs after the last pass, in program order. A
site the metric does not depend on has a zero gradient. Tensors the user bound with
`requires_grad` (a trained intervention) accumulate `.grad` as `backward()` would.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

from compiler import ops
from compiler.check import GRADIENT, TypedProgram
from compiler.errors import ExecutionError, InterventionError
from compiler.ir import Op, Site, refs_of


@contextmanager
def weights_requiring_grad(module: torch.nn.Module) -> Iterator[None]:
    """For a forward and its backward: every floating-point weight of `module` requires a
    gradient (a frozen model gets gradients too; `autograd.grad` never writes the weights' `.grad`)."""
    frozen = [p for p in module.parameters() if p.is_floating_point() and not p.requires_grad]
    for p in frozen:
        p.requires_grad_(True)
    try:
        yield
    finally:
        for p in frozen:
            p.requires_grad_(False)


class BackwardPasses:
    """The gradient part of one run of a typed program. `execute` runs one op of the program;
    `values` are the run's values by id."""

    def __init__(self, typed: TypedProgram, rows: Callable[[Site], slice], batch_size: int,
                 positions: dict[tuple[str, str, int], int], execute: Callable[[Op], None],
                 values: dict[int, Any]):
        self.rows, self.batch_size, self.execute, self.values = rows, batch_size, execute, values
        self.ops = typed.program.ops
        numbered = list(enumerate(self.ops))
        self.passes = [op for _, op in numbered if op.opcode == "backward"]
        self.after = [(i, op) for (i, op), at in zip(numbered, typed.schedule, strict=True)
                      if at == GRADIENT and op.opcode != "backward"]
        self.by_event: dict[int, list[tuple[int, Op]]] = {}
        for i, op in numbered:
            if op.opcode in ("grad", "setgrad"):
                site: Site = op.site  # type: ignore[assignment]
                self.by_event.setdefault(positions[(site.module, site.phase, site.call)], []).append((i, op))
        self.maker = {op.result: i for i, op in numbered if op.result is not None}
        self.kept: dict[int, tuple[torch.Tensor, list[Any]]] = {}  # op index -> (tensor, path left)
        self.copies: dict[int, torch.Tensor] = {}  # id of the copy that flowed on -> the kept tensor
        self.handles: list[Any] = []
        self.current: int | None = None  # the pass running
        self.done: set[int] = set()
        self.failure: InterventionError | None = None

    @property
    def events(self) -> set[int]:
        """The forward events whose values the gradient ops need."""
        return set(self.by_event)

    def keep(self, event: int, kind: str, live: Any) -> Any:
        """At a forward event: keep the tensors whose gradients are taken there, hooked; the
        live value, with copies of them flowing on."""
        for index, op in self.by_event.get(event, []):
            if op.site.kind != kind:  # type: ignore[union-attr]
                continue
            try:
                path = [ops.materialize(a, self.values) for a in op.path]
            except KeyError:
                raise ExecutionError.at(op.span, "this gradient's index is not computed yet when its "
                                                 "site runs") from None
            value, depth = ops.site_value(live, kind), 0
            while depth < len(path) and not isinstance(value, torch.Tensor):
                value, depth = value[path[depth]], depth + 1
            kept = self.copies.get(id(value))
            if kept is None:  # a tensor that needs no gradient (computed from no weight): a leaf
                kept = value if value.requires_grad else value.detach().requires_grad_()
                flowing = kept.clone()
                self.copies[id(flowing)] = kept
                live = ops.write_site(live, kind, path[:depth], flowing, slice(0, self.batch_size), self.batch_size)
            self.handles.append(kept.register_hook(lambda g, index=index: self._arrive(index, g)))
            self.kept[index] = (kept, path[depth:])
        return live

    def run(self, params: dict[str, Any]) -> None:
        """Run every backward pass, then the ops computed from gradients."""
        trained = [v for v in params.values() if isinstance(v, torch.Tensor) and v.requires_grad]
        try:
            for number, op in enumerate(self.passes):
                self._backward(number, op, trained, last=number == len(self.passes) - 1)
        finally:
            for h in self.handles:
                h.remove()
            self.handles = []
        for index, op in self.after:
            if index not in self.done:
                self.execute(op)

    def _backward(self, number: int, op: Op, trained: list[torch.Tensor], last: bool) -> None:
        metric = self.values.get(op.args[0].id)  # type: ignore[union-attr]
        if metric is None:
            raise ExecutionError.at(op.span, "backward(): the forward stopped before the value it "
                                             "differentiates was computed")
        if not metric.requires_grad:
            raise ExecutionError.at(op.span, "backward(): the value does not depend on anything that "
                                             "has a gradient (is it computed from the model's values?)")
        mine = [index for index in self.kept if self.ops[index].backward_pass == number]
        tensors = list({id(self.kept[i][0]): self.kept[i][0] for i in mine}.values())
        if tensors or trained:
            self.current = number
            try:
                found = torch.autograd.grad(metric, [*tensors, *trained], retain_graph=not last, allow_unused=True)
            except RuntimeError as e:
                if self.failure is not None:
                    raise self.failure from None
                raise ExecutionError.at(op.span, f"backward() failed: {str(e).strip().splitlines()[0]}") from None
            finally:
                self.current = None
            self._accumulate(trained, found[len(tensors):])
        by_tensor: dict[int, list[int]] = {}
        for index in mine:  # sites the metric does not depend on: a zero gradient
            if index not in self.done:
                by_tensor.setdefault(id(self.kept[index][0]), []).append(index)
        for indices in by_tensor.values():
            grad = torch.zeros_like(self.kept[indices[0]][0])
            for index in indices:
                grad = self._apply(index, grad)

    @staticmethod
    def _accumulate(trained: list[torch.Tensor], grads: tuple[torch.Tensor | None, ...]) -> None:
        """`.grad` of the user's tensors, as `backward()` gives it: on leaves, and through a
        tensor computed before the trace, on the leaves it was computed from."""
        later = [(t, g) for t, g in zip(trained, grads, strict=True) if g is not None and not t.is_leaf]
        for t, g in zip(trained, grads, strict=True):
            if g is not None and t.is_leaf:
                t.grad = g if t.grad is None else t.grad + g
        if later:
            torch.autograd.backward([t for t, _ in later], [g for _, g in later])

    def _arrive(self, index: int, grad: torch.Tensor) -> torch.Tensor | None:
        """A kept tensor's hook: its op, in the pass it belongs to."""
        op = self.ops[index]
        if op.backward_pass != self.current or index in self.done:
            return None
        try:
            new = self._apply(index, grad)
        except InterventionError as e:
            self.failure = e
            raise
        return None if new is grad else new

    def _apply(self, index: int, grad: torch.Tensor) -> torch.Tensor:
        """Read or rewrite the gradient arriving at op `index`'s tensor; the gradient flowing on."""
        op = self.ops[index]
        rows, path = self.rows(op.site), self.kept[index][1]  # type: ignore[arg-type]
        if op.opcode == "grad":
            value = ops.slice_rows(grad, rows, self.batch_size)
            for step in path:
                value = value[step]
            self.values[op.result] = value  # type: ignore[index]
        else:
            self._compute(op.args[1], op)
            grad = ops.write_site(grad, "output", path, ops.materialize(op.args[1], self.values), rows, self.batch_size)
        self.done.add(index)
        return grad

    def _compute(self, arg: Any, user: Op) -> None:
        """Run the not yet computed ops a gradient write's value needs, in program order."""
        needed: set[int] = set()
        stack = [r for r in refs_of(arg) if r not in self.values]
        while stack:
            index = self.maker[stack.pop()]
            if index in needed:
                continue
            if self.ops[index].opcode == "grad":
                raise ExecutionError.at(user.span, "a gradient written here is computed from a gradient "
                                                   "that the backward has not reached yet")
            needed.add(index)
            stack.extend(r for r in self.ops[index].refs() if r not in self.values)
        for index in sorted(needed):
            self.execute(self.ops[index])
            self.done.add(index)
