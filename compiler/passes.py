"""Pure passes over the IR: program in, new program out."""

from __future__ import annotations

import dataclasses
from typing import Any

from compiler import ops
from compiler.ir import Arg, Const, EllipsisArg, ListArg, Op, Program, Ref, SliceArg, TupleArg
from compiler.shape_rules import is_tensor_like
from compiler.signatures import SiteTable


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


def unbatchable(program: Program, table: SiteTable | None = None) -> str | None:
    """Why copies of `program` cannot share one forward, side by side (see `side_by_side`), or None.
    Every site names its invoke, so a copy reads only its own rows; what reaches past them is
    ending the forward (`stop`), generating, back-propagating (one backward for the whole batch),
    changing a value in place (a site value may be a tensor the rows share), and writing a tensor
    that is not one row per batch row (position embeddings, a shared mask): with `table`, the
    sites of the shared batch, every write is checked to land in a batch-first tensor."""
    if program.generation is not None:
        return "it generates"
    for op in program.ops:
        if op.opcode == "stop":
            return "it ends the forward early"
        if op.opcode in ("backward", "grad", "setgrad"):
            return "it back-propagates"
        if op.opcode == "call" and (op.target == "setitem" or op.target.endswith("_")
                                    and op.target.startswith("Tensor.")):
            return f"it changes a value in place ({op.target})"
        if op.opcode == "write" and table is not None and not _writes_rows(op, table):
            return f"it writes {op.site.module}.{op.site.kind}, a value the rows share"  # type: ignore[union-attr]
    return None


def _writes_rows(op: Op, table: SiteTable) -> bool:
    """Whether a write lands in a tensor with one row per batch row (found by its constant path)."""
    site = op.site
    assert site is not None
    live = table.values.get((site.module, site.phase, site.call))
    target = None if live is None else ops.site_value(live, site.kind)
    for step in op.path:
        if is_tensor_like(target):
            break
        if not isinstance(step, Const) or not isinstance(target, (tuple, list, dict)):
            return False
        try:
            target = target[step.value]
        except (IndexError, KeyError, TypeError):
            return False
    return is_tensor_like(target) and target.dim() > 0 and target.shape[0] == table.batch_size


def side_by_side(programs: list[Program]) -> tuple[Program, list[dict[int, int]]]:
    """One program that runs `programs` (each of the same shape: equal but for spans and parameter
    values) side by side in one batch: copy k takes invokes k*n .. k*n + n-1, and its params and
    saves are named `b<k>_<name>`. Returns it and, per copy, its new value ids -> its own."""
    n = programs[0].n_invokes
    ops: list[Op] = []
    back: list[dict[int, int]] = []
    next_id = 0
    for k, program in enumerate(programs):
        ids = {op.result: next_id + i for i, op in enumerate(o for o in program.ops if o.result is not None)}
        next_id += len(ids)
        for op in program.ops:
            fields: dict[str, Any] = {}
            if op.site is not None:
                fields["site"] = dataclasses.replace(op.site, invoke=op.site.invoke + k * n)
            if op.opcode in ("param", "save"):
                fields["target"] = f"b{k}_{op.target}"
            ops.append(copied(op, ids, ids.get(op.result) if op.result is not None else None, **fields))
        back.append({new: old for old, new in ids.items()})
    return dataclasses.replace(programs[0], ops=tuple(ops), n_invokes=n * len(programs)), back
