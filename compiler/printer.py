"""Readable text for IR records (golden-tested)."""

from __future__ import annotations

import dataclasses

from compiler.ir import (
    Arg,
    Const,
    DictType,
    DTypeArg,
    EllipsisArg,
    ListArg,
    Op,
    OpaqueType,
    Program,
    Ref,
    ScalarType,
    Site,
    SliceArg,
    TensorType,
    TupleArg,
    TupleType,
    Type,
)

DTYPE_SHORT = {
    "float32": "f32", "float64": "f64", "float16": "f16", "bfloat16": "bf16", "int64": "i64",
    "int32": "i32", "int16": "i16", "int8": "i8", "uint8": "u8", "bool": "bool",
}


def format_type(t: Type | None) -> str:
    if t is None:
        return "?"
    if isinstance(t, TensorType):
        return f"{DTYPE_SHORT.get(t.dtype, t.dtype)}[{', '.join(map(str, t.shape))}]"
    if isinstance(t, TupleType):
        return "(" + ", ".join(format_type(i) for i in t.items) + ("," if len(t.items) == 1 else "") + ")"
    if isinstance(t, DictType):
        return "{" + ", ".join(f"{k}: {format_type(v)}" for k, v in zip(t.keys, t.values, strict=True)) + "}"
    if isinstance(t, ScalarType):
        return t.kind
    if isinstance(t, OpaqueType):
        return f"<{t.name}>"
    raise TypeError(f"not a type: {t!r}")


def format_arg(a: Arg) -> str:
    if isinstance(a, Ref):
        return f"%{a.id}"
    if isinstance(a, Const):
        return repr(a.value)
    if isinstance(a, SliceArg):
        parts = ["" if isinstance(x, Const) and x.value is None else format_arg(x)
                 for x in (a.start, a.stop, a.step)]
        return ":".join(parts[:2]) + (f":{parts[2]}" if parts[2] else "")
    if isinstance(a, EllipsisArg):
        return "..."
    if isinstance(a, TupleArg):
        return "(" + ", ".join(map(format_arg, a.items)) + ("," if len(a.items) == 1 else "") + ")"
    if isinstance(a, ListArg):
        return "[" + ", ".join(map(format_arg, a.items)) + "]"
    if isinstance(a, DTypeArg):
        return f"torch.{a.name}"
    raise TypeError(f"not an argument: {a!r}")


def format_site(s: Site) -> str:
    call = f".call{s.call}" if s.call else ""
    return f"{s.module or '<root>'}{call}.{s.kind}@{s.invoke}"


def format_index(path: tuple[Arg, ...]) -> str:
    out = ""
    for step in path:
        inner = ", ".join(map(format_arg, step.items)) if isinstance(step, TupleArg) else format_arg(step)
        out += f"[{inner}]"
    return out


def format_save_place(op: Op) -> str:
    """Where a save was made, when it says more than its name: ` step 2`, ` at layer=#0, pos=#1`
    (`#i`: the i-th value of the vectorised sweep axis)."""
    step = "" if op.step is None else f" step {op.step}"
    point = f" at {', '.join(f'{axis}=#{i}' for axis, i in op.point)}" if op.point else ""
    return step + point


def format_op(op: Op, types: dict[int, Type] | None = None) -> str:
    lhs = f"%{op.result} = " if op.result is not None else ""
    args = [format_arg(a) for a in op.args] + [f"{k}={format_arg(v)}" for k, v in op.kwargs]
    if op.opcode == "read":
        body = f"read {format_site(op.site)}"  # type: ignore[arg-type]
    elif op.opcode == "write":
        body = f"write {format_site(op.site)}{format_index(op.path)} <- {args[0]}"  # type: ignore[arg-type]
    elif op.opcode == "param":
        body = f"param {op.target!r}: {format_type(op.type)}"
    elif op.opcode == "save":
        body = f"save {args[0]} as {op.target!r}{format_save_place(op)}"
    elif op.opcode == "weight":
        body = f"weight {op.target}"
    elif op.opcode == "stop":
        body = "stop" + (f" at {args[0]}" if args else "")
    elif op.opcode == "backward":
        body = f"backward {args[0]}"
    elif op.opcode == "grad":
        body = f"grad {format_site(op.site)}{format_index(op.path)} pass {args[0]}"  # type: ignore[arg-type]
    elif op.opcode == "setgrad":
        body = f"setgrad {format_site(op.site)}{format_index(op.path)} pass {args[0]} <- {args[1]}"  # type: ignore[arg-type]
    else:
        body = f"{'module ' if op.opcode == 'module' else ''}{op.target}({', '.join(args)})"
    if types is not None and op.result in types and op.opcode != "param":
        body += f" : {format_type(types[op.result])}"
    return lhs + body


def format_program(program: Program, types: dict[int, Type] | None = None, spans: bool = False) -> str:
    """The program as text, one op a line; `types` adds each value's type."""
    head = f"program v{program.version} invokes={program.n_invokes}"
    if program.generation is not None:
        settings = ", ".join(f"{f.name}={getattr(program.generation, f.name)}"
                             for f in dataclasses.fields(program.generation)
                             if getattr(program.generation, f.name) is not None)
        head += f" generate({settings})"
    lines = [head]
    for op in program.ops:
        line = "  " + format_op(op, types)
        if spans and op.span.line:
            line = f"{line:<72}  # {op.span}"
        lines.append(line)
    return "\n".join(lines)
