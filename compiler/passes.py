"""Pure passes over the IR: program in, new program out."""

from __future__ import annotations

import dataclasses

from compiler.ir import Arg, ListArg, Op, Program, Ref, SliceArg, TupleArg


def drop_dead_reads(program: Program) -> tuple[Program, dict[int, int]]:
    """Remove `read`s whose value nothing uses and repeated identical writes; number values densely.

    Frontends emit such reads as a by-product (`m.output[:, 0] = 0` reads `m.output` before
    Python calls `__setitem__`). Returns the new program and old id -> new id.
    Post: every remaining read is used; ids are 0..n-1 in program order.
    """
    used = {r for op in program.ops for r in op.refs()}
    kept = [op for op in program.ops if not (op.opcode == "read" and op.result not in used)]
    # `x[i] += v` on a module value writes twice (the in-place op, then Python's __setitem__).
    kept = [op for i, op in enumerate(kept) if not (op.opcode == "write" and i and kept[i - 1] == op)]
    renumber: dict[int, int] = {}
    for op in kept:
        if op.result is not None:
            renumber[op.result] = len(renumber)
    new_ops = tuple(_renumbered(op, renumber) for op in kept)
    return Program(new_ops, program.n_invokes, program.version), renumber


def _renumbered(op: Op, ids: dict[int, int]) -> Op:
    return dataclasses.replace(
        op,
        result=ids[op.result] if op.result is not None else None,
        args=tuple(_arg(a, ids) for a in op.args),
        kwargs=tuple((k, _arg(v, ids)) for k, v in op.kwargs),
        path=tuple(_arg(a, ids) for a in op.path),
    )


def _arg(arg: Arg, ids: dict[int, int]) -> Arg:
    if isinstance(arg, Ref):
        return Ref(ids[arg.id])
    if isinstance(arg, SliceArg):
        return SliceArg(_arg(arg.start, ids), _arg(arg.stop, ids), _arg(arg.step, ids))
    if isinstance(arg, TupleArg):
        return TupleArg(tuple(_arg(a, ids) for a in arg.items))
    if isinstance(arg, ListArg):
        return ListArg(tuple(_arg(a, ids) for a in arg.items))
    return arg
