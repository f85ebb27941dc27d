"""Validation of IR against the vocabulary: what a program may name, before anything is looked up.

`problems(program)` lists every op that names something outside the vocabulary or holds a value
of the wrong kind; `check` refuses such programs, whichever frontend built them. `load(text)`
decodes a JSON payload record by record, bounding its size and depth, and validates it: a bad
payload is one `PayloadError` naming the op index and the reason.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

from compiler import vocabulary
from compiler.errors import Diagnostic, InterventionError
from compiler.ir import (
    Const,
    DictType,
    DTypeArg,
    EllipsisArg,
    Generation,
    ListArg,
    Op,
    OpaqueType,
    Program,
    Ref,
    ScalarType,
    Site,
    SliceArg,
    Span,
    TensorType,
    TupleArg,
    TupleType,
    from_json,
)

MAX_PAYLOAD_BYTES = 64 * 2**20
MAX_DEPTH = 32  # nesting of arguments and types
MAX_TEXT = 4096  # characters in a string constant, a name or a file name
MAX_INDEX = 2**31  # value ids, call and invoke indices
MAX_INVOKES = 65536
MAX_NEW_TOKENS = 65536
_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]*|[0-9]+")
MODULE_ROOTS = ("", "generator")


class PayloadError(InterventionError, ValueError):
    """An IR payload that is not a valid program of the vocabulary."""


def module_path_problem(path: Any) -> str | None:
    """Why `path` is not a dotted module path (`model.layers.3`: names and indices, nothing private)."""
    if not isinstance(path, str) or len(path) > MAX_TEXT:
        return f"a module path is a short string, not {type(path).__name__}"
    if path in MODULE_ROOTS:
        return None
    bad = next((part for part in path.split(".") if not _NAME.fullmatch(part)), None)
    if bad is not None:
        return f"module path {path!r} has the part {bad!r}: parts are names (not private) or indices"
    return None


# ------------------------------------------------------------------------------------ values
def _arg_problem(arg: Any, depth: int = 0) -> str | None:
    if depth > MAX_DEPTH:
        return "arguments nest too deeply"
    if isinstance(arg, Ref):
        return None if type(arg.id) is int and 0 <= arg.id < MAX_INDEX else f"bad value id {arg.id!r}"
    if isinstance(arg, Const):
        v = arg.value
        if isinstance(v, bool) or v is None:
            return None
        if type(v) is int:
            return None if -vocabulary.INT_BOUND <= v < vocabulary.INT_BOUND else "an integer outside int64"
        if type(v) is str:
            return None if len(v) <= MAX_TEXT else f"a string of {len(v)} characters (at most {MAX_TEXT})"
        return f"a constant {type(v).__name__}: constants are numbers, strings, booleans or None"
    if isinstance(arg, SliceArg):
        return next((p for p in (_arg_problem(a, depth + 1) for a in (arg.start, arg.stop, arg.step)) if p), None)
    if isinstance(arg, EllipsisArg):
        return None
    if isinstance(arg, (TupleArg, ListArg)):
        if not isinstance(arg.items, tuple):
            return "a tuple argument holds a list of arguments"
        return next((p for p in (_arg_problem(a, depth + 1) for a in arg.items) if p), None)
    if isinstance(arg, DTypeArg):
        return None if arg.name in vocabulary.DTYPES else f"unknown dtype {arg.name!r}"
    return f"not an argument: {type(arg).__name__}"


def _type_problem(t: Any, depth: int = 0) -> str | None:
    if depth > MAX_DEPTH:
        return "a type nests too deeply"
    if isinstance(t, TensorType):
        if t.dtype not in vocabulary.DTYPES:
            return f"unknown dtype {t.dtype!r}"
        if not isinstance(t.shape, tuple) or any(
                (type(d) is int and not 0 <= d < 2**48) or (type(d) is str and not d.isidentifier())
                for d in t.shape):
            return f"bad tensor shape {t.shape!r}"
        return None
    if isinstance(t, TupleType):
        return next((p for p in (_type_problem(i, depth + 1) for i in _tuple(t.items)) if p), None)
    if isinstance(t, DictType):
        if not all(isinstance(k, str) for k in _tuple(t.keys)):
            return "dict type keys are strings"
        return next((p for p in (_type_problem(v, depth + 1) for v in _tuple(t.values)) if p), None)
    if isinstance(t, (ScalarType, OpaqueType)):
        return None if isinstance(getattr(t, "kind", getattr(t, "name", "")), str) else "bad type name"
    return f"not a type: {type(t).__name__}"


def _tuple(items: Any) -> tuple[Any, ...]:
    return items if isinstance(items, tuple) else (object(),)


def _site_problem(site: Any) -> str | None:
    if not isinstance(site, Site):
        return f"not a site: {type(site).__name__}"
    if not all(type(i) is int and 0 <= i < MAX_INDEX for i in (site.call, site.invoke)):
        return "site call and invoke are small non-negative integers"
    return module_path_problem(site.module)


# ---------------------------------------------------------------------------------------- ops
def op_problem(op: Op) -> str | None:
    """Why `op` is outside the vocabulary or malformed, or None."""
    if op.result is not None and not (type(op.result) is int and 0 <= op.result < MAX_INDEX):
        return f"bad result id {op.result!r}"
    if not isinstance(op.target, str) or len(op.target) > MAX_TEXT:
        return "a target is a short string"
    for container in (op.args, op.kwargs, op.path):
        if not isinstance(container, tuple):
            return "args, kwargs and path are lists"
    for arg in (*op.args, *op.path):
        problem = _arg_problem(arg)
        if problem:
            return problem
    for item in op.kwargs:
        if not (isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str)
                and item[0].isidentifier() and not item[0].startswith("_")):
            return "keyword arguments are (name, value) pairs with plain names"
        problem = _arg_problem(item[1])
        if problem:
            return problem
    if op.type is not None and _type_problem(op.type):
        return _type_problem(op.type)
    if op.site is not None and _site_problem(op.site):
        return _site_problem(op.site)
    if not isinstance(op.span, Span):
        return "bad span"
    return _save_fields_problem(op) or _target_problem(op)


def _save_fields_problem(op: Op) -> str | None:
    """A save's step and point: only saves carry them; a step is a small non-negative integer, a
    point (axis name, index into its values) pairs with distinct axis names."""
    if op.opcode != "save":
        return None if op.step is None and op.point == () else "only a save has a step or a point"
    if not (op.step is None or (type(op.step) is int and 0 <= op.step < MAX_NEW_TOKENS)):
        return f"a save's step is an integer from 0 to {MAX_NEW_TOKENS - 1}, not {op.step!r}"
    pairs = op.point if isinstance(op.point, tuple) else (None,)
    if not all(isinstance(p, tuple) and len(p) == 2 and isinstance(p[0], str) and p[0].isidentifier()
               and len(p[0]) <= MAX_TEXT and type(p[1]) is int and 0 <= p[1] < MAX_INDEX for p in pairs):
        return "a save's point is a list of [axis name, index] pairs (indices from 0)"
    if len({axis for axis, _ in pairs}) != len(pairs):
        return "a save's point names each axis once"
    return None


def _save_problems(ops: tuple[Op, ...], generation: Generation | None) -> Iterator[tuple[int, str]]:
    """Saves whose step is not in the generation, or whose name is also used for a save of
    another kind (once, per step, per point): results keep one kind per name."""
    kinds: dict[str, str] = {}
    for i, op in enumerate(ops):
        if op.opcode != "save":
            continue
        kind = "per step" if op.step is not None else "per point" if op.point else "once"
        first = kinds.setdefault(op.target, kind)
        if op.step is not None and generation is None:
            yield i, f"a save at step {op.step} in a program that does not generate"
        elif op.step is not None and op.step >= generation.max_new_tokens:  # type: ignore[union-attr]
            yield i, f"a save at step {op.step} of a generation of {generation.max_new_tokens} steps"  # type: ignore
        elif kind != first:
            yield i, f"the name {op.target} is saved {first} and {kind}: give one of them another name"


def _target_problem(op: Op) -> str | None:
    code, target = op.opcode, op.target
    if code == "call":
        entry = vocabulary.vocabulary().get(target)
        if entry is None:
            return f"{target!r} is not in the vocabulary (docs/vocabulary.md lists what is)"
        problem = vocabulary.keyword_problem(target, [k for k, _ in op.kwargs])
        if problem:
            return problem
        if target == "Tensor.to" and any(isinstance(a, Const) for a in op.args[1:]):
            return "Tensor.to converts dtypes only (`.to(torch.float16)`); the engine places tensors"
        if target == "field" and not (len(op.args) == 2 and isinstance(op.args[1], Const)
                                      and isinstance(op.args[1].value, str)
                                      and op.args[1].value.isidentifier() and not op.args[1].value.startswith("_")):
            return "field takes a value and a plain field name"
        if target == "einops.reduce":
            reduction = dict(op.kwargs).get("reduction", op.args[2] if len(op.args) > 2 else None)
            if not (isinstance(reduction, Const) and reduction.value in vocabulary.EINOPS_REDUCTIONS):
                return f"einops.reduce takes one of {', '.join(vocabulary.EINOPS_REDUCTIONS)} as its reduction"
        return None
    if code in ("module", "weight"):
        return module_path_problem(target) or (
            "a weight names its module and parameter" if code == "weight" and "." not in target and target else None)
    if code == "save" and not (len(op.args) == 1 and isinstance(op.args[0], Ref)):
        return "a save keeps one value"
    if code in ("param", "save"):
        return None if target else f"a {code} has a name"
    if code in ("read", "write", "stop", "backward", "grad", "setgrad"):
        if target:
            return f"a {code} has no target"
        if code == "backward" and not (len(op.args) == 1 and isinstance(op.args[0], Ref) and not op.path):
            return "a backward takes one value (the scalar it differentiates)"
        if code in ("backward", "grad", "setgrad") and op.kwargs:
            return f"a {code} takes no keyword arguments"
        if code in ("grad", "setgrad") and not op.args[0].value < MAX_INDEX:  # type: ignore[union-attr]
            return "a backward pass is a small non-negative integer"
        return None
    return f"unknown opcode {code!r}"


def problems(program: Program) -> list[Diagnostic]:
    """Every op of `program` outside the vocabulary, at its span (op index in the message)."""
    found = []
    for i, op in enumerate(program.ops):
        problem = op_problem(op)
        if problem:
            found.append(Diagnostic(op.span, f"op {i} ({op.opcode} {op.target}): {problem}".replace(" )", ")")))
    if not found:
        found = [Diagnostic(program.ops[i].span, f"op {i} (save {program.ops[i].target}): {problem}")
                 for i, problem in _save_problems(program.ops, program.generation)]
    return found


# -------------------------------------------------------------------------------------- JSON
def load(text: str | bytes, source: str = "<payload>") -> Program:
    """Decode and validate a JSON program; raises PayloadError naming the op and the reason."""
    if len(text) > MAX_PAYLOAD_BYTES:
        raise _payload(source, f"the payload is {len(text)} bytes; at most {MAX_PAYLOAD_BYTES}")
    try:
        data = json.loads(text)
    except (ValueError, RecursionError) as e:
        raise _payload(source, f"not JSON: {str(e).splitlines()[0][:200]}") from None
    if not isinstance(data, dict) or data.get("$") != "Program":
        raise _payload(source, "the payload is not a Program record ({\"$\": \"Program\", ...})")
    unknown = set(data) - {"$", "ops", "n_invokes", "version", "generation"}
    if unknown:
        raise _payload(source, f"a Program has no field {sorted(unknown)[0]!r}")
    if not isinstance(data.get("ops"), list):
        raise _payload(source, "a Program's ops are a list")
    ops, defined = [], set()
    for i, raw in enumerate(data["ops"]):
        op = _decode(raw, Op, f"op {i}", source)
        problem = op_problem(op) or _use_problem(op, defined)
        if problem:
            raise _payload(source, f"op {i} ({op.opcode} {op.target}): {problem}".replace(" )", ")"))
        if op.result is not None:
            defined.add(op.result)
        ops.append(op)
    generation = None
    if data.get("generation") is not None:
        generation = _decode(data["generation"], Generation, "generation", source)
        problem = _generation_problem(generation)
        if problem:
            raise _payload(source, f"generation: {problem}")
    for i, problem in _save_problems(tuple(ops), generation):
        raise _payload(source, f"op {i} (save {ops[i].target}): {problem}")
    n_invokes, version = data.get("n_invokes", 1), data.get("version", 1)
    if type(n_invokes) is not int or not 1 <= n_invokes <= MAX_INVOKES:
        raise _payload(source, f"n_invokes is an integer from 1 to {MAX_INVOKES}")
    try:
        return Program(tuple(ops), n_invokes, version, generation)
    except (TypeError, ValueError) as e:
        raise _payload(source, str(e)) from None


def _use_problem(op: Op, defined: set[int]) -> str | None:
    missing = [r for r in op.refs() if r not in defined]
    if missing:
        return f"uses %{missing[0]} before it is defined"
    if op.result is not None and op.result in defined:
        return f"defines %{op.result} twice"
    return None


def _generation_problem(g: Generation) -> str | None:
    if type(g.max_new_tokens) is not int or not 1 <= g.max_new_tokens <= MAX_NEW_TOKENS:
        return f"max_new_tokens is an integer from 1 to {MAX_NEW_TOKENS}"
    if type(g.do_sample) is not bool or type(g.temperature) not in (int, float):
        return "do_sample is a boolean and temperature a number"
    if not all(v is None or type(v) is int for v in (g.top_k, g.seed)) or \
            not (g.top_p is None or type(g.top_p) in (int, float)):
        return "top_k and seed are integers, top_p a number"
    return None


def _decode(raw: Any, expected: type, where: str, source: str) -> Any:
    try:
        record = from_json(raw)
    except (TypeError, ValueError, KeyError, AttributeError, RecursionError) as e:
        raise _payload(source, f"{where}: {str(e).splitlines()[0][:200] or type(e).__name__}") from None
    if not isinstance(record, expected):
        raise _payload(source, f"{where} is not a {expected.__name__} record")
    return record


def _payload(source: str, message: str) -> PayloadError:
    return PayloadError([Diagnostic(Span(source, 0), message)])


__all__ = ["PayloadError", "load", "module_path_problem", "op_problem", "problems"]
