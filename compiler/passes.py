"""Pure passes over the IR: program in, new program out."""

from __future__ import annotations

import dataclasses
from typing import Any

from compiler.ir import Arg, Const, EllipsisArg, ListArg, Op, Program, Ref, SliceArg, TupleArg


def drop_dead_reads(program: Program) -> tuple[Program, dict[int, int]]:
    """Remove `read`s and `grad`s whose value nothing uses and repeated identical writes; number
    values densely.

    Frontends emit such reads as a by-product (`m.output[:, 0] = 0` reads `m.output` before
    Python calls `__setitem__`; `h.grad[:] = 0` reads the gradient). Returns the new program and
    old id -> new id.
    Post: every remaining read is used; ids are 0..n-1 in program order.
    """
    used = {r for op in program.ops for r in op.refs()}
    kept = [op for op in program.ops if not (op.opcode in ("read", "grad") and op.result not in used)]
    # `x[i] += v` on a module value writes twice (the in-place op, then Python's __setitem__).
    kept = [op for i, op in enumerate(kept) if not (op.opcode == "write" and i and kept[i - 1] == op)]
    renumber: dict[int, int] = {}
    for op in kept:
        if op.result is not None:
            renumber[op.result] = len(renumber)
    new_ops = tuple(_renumbered(op, renumber) for op in kept)
    return dataclasses.replace(program, ops=new_ops), renumber


def _renumbered(op: Op, ids: dict[int, int]) -> Op:
    return copied(op, ids, ids[op.result] if op.result is not None else None)


def copied(op: Op, ids: dict[int, int], result: int | None, **fields: Any) -> Op:
    """`op` with the values it uses renamed by `ids` (others kept), its result `result`, and other
    `fields` replaced: a renumbered op, or one copy of a repeated block (a generation step, an
    edit applied to an invoke)."""
    return dataclasses.replace(op, result=result, args=tuple(remap(a, ids) for a in op.args),
                               kwargs=tuple((k, remap(v, ids)) for k, v in op.kwargs),
                               path=tuple(remap(a, ids) for a in op.path), **fields)


def remap(arg: Arg, ids: dict[int, int]) -> Arg:
    """`arg` with each reference to a value in `ids` replaced by its new id (others kept)."""
    if isinstance(arg, Ref):
        return Ref(ids.get(arg.id, arg.id))
    if isinstance(arg, SliceArg):
        return SliceArg(remap(arg.start, ids), remap(arg.stop, ids), remap(arg.step, ids))
    if isinstance(arg, TupleArg):
        return TupleArg(tuple(remap(a, ids) for a in arg.items))
    if isinstance(arg, ListArg):
        return ListArg(tuple(remap(a, ids) for a in arg.items))
    return arg


def stop_after_last_site(program: Program) -> Program:
    """End the forward right after the last site the program touches: nothing later is computed.
    A program that already stops is returned unchanged."""
    if any(op.opcode == "stop" for op in program.ops):
        return program
    return dataclasses.replace(program, ops=(*program.ops, Op("stop")))


def reads_last_position_only(program: Program, head: str) -> bool:
    """Whether the program uses module `head`'s output only as `[:, -1]` (`[:, -1, i]`) and never
    the model's own output: then the head can run on the last position alone."""
    reads = {op.result for op in program.ops if op.opcode == "read" and op.site.module == head}  # type: ignore[union-attr]
    for op in program.ops:
        if op.site is not None and (op.site.module == "" or (op.site.module == head and
                                                              (op.opcode != "read" or op.site.kind != "output"))):
            return False
        used = reads.intersection(op.refs())
        if used and not (op.opcode == "call" and op.target == "getitem" and op.refs() == [op.args[0].id]  # type: ignore[union-attr]
                         and _last_position(op.args[1])):
            return False
    return bool(reads)


def _last_position(index: Arg) -> bool:
    if not isinstance(index, TupleArg) or len(index.items) < 2:
        return False
    full = SliceArg(Const(None), Const(None), Const(None))  # later items index the vocabulary: any will do
    return index.items[0] == full and index.items[1] == Const(-1) and not any(
        isinstance(i, EllipsisArg) for i in index.items[2:])
