"""The intervention IR: plain, frozen, JSON-serialisable records.

A `Program` is a list of `Op`s in SSA form. Values are referred to by `Ref(id)`; constants are
plain records (`Const`, `SliceArg`, `TupleArg`, ...). Tensors and floats that come from the user
are `param` ops: their type is part of the program (and of its structural hash), their value is
bound at run time. Nothing here executes anything; checking, scheduling and running are functions
over these records in other modules.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, NamedTuple

IR_VERSION = 1


@dataclass(frozen=True, slots=True, order=True)
class Span:
    """Where the user wrote something: `file:line:col` (col 0 when unknown)."""

    file: str
    line: int
    col: int = 0
    end_line: int = 0
    end_col: int = 0

    def __str__(self) -> str:
        if not self.line:
            return self.file
        return f"{self.file}:{self.line}:{self.col}" if self.col else f"{self.file}:{self.line}"


NO_SPAN = Span("<unknown>", 0)


# ---------------------------------------------------------------------------------------- types
@dataclass(frozen=True, slots=True)
class TensorType:
    dtype: str
    shape: tuple[int | str, ...]

    def __post_init__(self) -> None:
        if not all(isinstance(d, (int, str)) for d in self.shape):
            raise TypeError(f"tensor dims must be ints or symbol names, got {self.shape!r}")


@dataclass(frozen=True, slots=True)
class TupleType:
    items: tuple["Type", ...]


@dataclass(frozen=True, slots=True)
class DictType:
    keys: tuple[str, ...]
    values: tuple["Type", ...]

    def __post_init__(self) -> None:
        if len(self.keys) != len(self.values):
            raise ValueError("a dict type has one value type per key")


@dataclass(frozen=True, slots=True)
class ScalarType:
    kind: str  # "int" | "float" | "bool" | "str" | "none"

    def __post_init__(self) -> None:
        if self.kind not in ("int", "float", "bool", "str", "none"):
            raise ValueError(f"unknown scalar kind {self.kind!r}")


@dataclass(frozen=True, slots=True)
class OpaqueType:
    """A value we carry but do not look into (a cache object, a model output record)."""

    name: str


Type = TensorType | TupleType | DictType | ScalarType | OpaqueType


# ------------------------------------------------------------------------------------ arguments
@dataclass(frozen=True, slots=True)
class Ref:
    id: int


@dataclass(frozen=True, slots=True)
class Const:
    value: int | bool | str | None

    def __post_init__(self) -> None:
        if self.value is not None and not isinstance(self.value, (int, bool, str)):
            raise TypeError(f"Const holds int, bool, str or None, got {type(self.value).__name__}")


@dataclass(frozen=True, slots=True)
class SliceArg:
    start: "Arg"
    stop: "Arg"
    step: "Arg"


@dataclass(frozen=True, slots=True)
class EllipsisArg:
    pass


@dataclass(frozen=True, slots=True)
class TupleArg:
    items: tuple["Arg", ...]


@dataclass(frozen=True, slots=True)
class ListArg:
    items: tuple["Arg", ...]


@dataclass(frozen=True, slots=True)
class DTypeArg:
    name: str  # "float32", "int64", ...


Arg = Ref | Const | SliceArg | EllipsisArg | TupleArg | ListArg | DTypeArg


# ---------------------------------------------------------------------------------- sites, ops
SITE_KINDS = ("output", "input", "inputs")


@dataclass(frozen=True, slots=True)
class Site:
    """A place in the forward: a module's output or input, at a call index, for one invoke."""

    module: str  # dotted path from the root module, "" for the root
    kind: str  # "output" | "input" | "inputs"
    call: int = 0
    invoke: int = 0

    def __post_init__(self) -> None:
        if self.kind not in SITE_KINDS:
            raise ValueError(f"site kind must be one of {SITE_KINDS}, got {self.kind!r}")
        if self.call < 0 or self.invoke < 0:
            raise ValueError("site call and invoke indices are non-negative")

    @property
    def phase(self) -> str:
        """`pre` for inputs (seen before the module runs), `post` for its output."""
        return "post" if self.kind == "output" else "pre"


OPCODES = ("read", "write", "call", "module", "weight", "param", "save", "stop", "backward", "grad",
           "setgrad")
SITE_OPCODES = ("read", "write", "grad", "setgrad")  # the ops that name a site

Point = tuple[tuple[str, int], ...]  # vectorised sweep axis name -> index into that axis's values


class SaveKey(NamedTuple):
    """Which value a save keeps: its name, the generation step of a step block's save, and the
    point of the vectorised sweep axes it was made at."""

    name: str
    step: int | None = None
    point: Point = ()


def tensor_name(key: SaveKey) -> str:
    """A save's tensor name in a results file: its name, or `name@step` for one step of a steps
    block kept apart (the one place that flat form is made)."""
    return key.name if key.step is None else f"{key.name}@{key.step}"


def by_name(saved: dict[SaveKey, Any]) -> dict[str, Any]:
    """Saves as users read them, by name: a step block's save is a list of its values in step
    order (the steps that ran), a vectorised sweep's save a dict from point to value."""
    out: dict[str, Any] = {}
    for key in sorted(saved, key=lambda k: (k.step is not None, k.step or 0, k.point)):
        if key.step is not None:
            out.setdefault(key.name, []).append(saved[key])
        elif key.point:
            out.setdefault(key.name, {})[key.point] = saved[key]
        else:
            out[key.name] = saved[key]
    return out


@dataclass(frozen=True, slots=True)
class Op:
    """One instruction.

    read    result = value at `site`
    write   `site`[path...] = args[0]
    call    result = whitelisted function `target`(*args, **kwargs)
    module  result = submodule `target`(*args, **kwargs), called ad hoc
    weight  result = parameter or buffer `target` of the model
    param   result = user value named `target`, of type `type`
    save    keep args[0] after the run under the name `target` (an identifier), made at generation
            `step` (a step block's save) and vectorised sweep `point` (one save per point)
    stop    end the forward once everything before it has run (args[0]: at this value's site)
    backward  once the forward has ended, back-propagate from args[0] (a scalar); the program's
            backwards are its passes 0, 1, ... in program order
    grad    result = the gradient at `site`[path...] in backward pass args[0] (a Const int)
    setgrad in backward pass args[0], the gradient at `site`[path...] becomes args[1] on its way
            back (the modules before the site see the new gradient)
    """

    opcode: str
    result: int | None = None
    target: str = ""
    args: tuple[Arg, ...] = ()
    kwargs: tuple[tuple[str, Arg], ...] = ()
    site: Site | None = None
    path: tuple[Arg, ...] = ()
    type: Type | None = None
    step: int | None = None
    point: Point = ()
    span: Span = field(default=NO_SPAN, compare=False)

    def __post_init__(self) -> None:
        if self.opcode not in OPCODES:
            raise ValueError(f"unknown opcode {self.opcode!r}")
        if self.opcode != "save" and (self.step is not None or self.point):
            raise ValueError(f"a {self.opcode} has no step or point: only a save carries them")
        if self.opcode == "save" and not (isinstance(self.target, str) and self.target.isidentifier()):
            raise ValueError(f"a save's name is an identifier (letters, digits, _), not {self.target!r}")
        needs_site = self.opcode in SITE_OPCODES
        if needs_site != (self.site is not None):
            raise ValueError(f"{self.opcode} {'needs' if needs_site else 'takes no'} site")
        has_result = self.opcode not in ("write", "save", "stop", "backward", "setgrad")
        if has_result != (self.result is not None):
            raise ValueError(f"{self.opcode} {'defines' if has_result else 'defines no'} value")
        if self.opcode == "param" and self.type is None:
            raise ValueError("a param declares its type")
        if self.opcode == "write" and len(self.args) != 1:
            raise ValueError("a write takes exactly one value")
        if self.opcode in ("grad", "setgrad") and not (
                self.args and isinstance(self.args[0], Const) and type(self.args[0].value) is int
                and self.args[0].value >= 0 and len(self.args) == (1 if self.opcode == "grad" else 2)):
            raise ValueError(f"a {self.opcode} names its backward pass (a Const int)"
                             + (" and the new gradient" if self.opcode == "setgrad" else ""))

    @property
    def backward_pass(self) -> int:
        """The backward pass a grad or setgrad belongs to."""
        return self.args[0].value  # type: ignore[union-attr,return-value]

    @property
    def save_key(self) -> SaveKey:
        """A save's name, step and point."""
        return SaveKey(self.target, self.step, self.point)

    def refs(self) -> list[int]:
        """Ids of the values this op reads."""
        out: list[int] = []
        for a in (*self.args, *(v for _, v in self.kwargs), *self.path):
            _collect_refs(a, out)
        return out


def refs_of(arg: Arg) -> list[int]:
    """Ids of the values an argument refers to."""
    out: list[int] = []
    _collect_refs(arg, out)
    return out


def _collect_refs(arg: Arg, out: list[int]) -> None:
    if isinstance(arg, Ref):
        out.append(arg.id)
    elif isinstance(arg, SliceArg):
        for a in (arg.start, arg.stop, arg.step):
            _collect_refs(a, out)
    elif isinstance(arg, (TupleArg, ListArg)):
        for a in arg.items:
            _collect_refs(a, out)


@dataclass(frozen=True, slots=True)
class Generation:
    """A program that generates `max_new_tokens` tokens (step 0 is the prompt pass), greedily or
    sampled. Its sites number a module's calls across steps: call `k * calls_per_step + c` is call
    `c` of step `k`; `generator` is the pseudo-module whose output is the ids."""

    max_new_tokens: int
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None


@dataclass(frozen=True, slots=True)
class Program:
    """An experiment: ops in program order over `n_invokes` batch slices; with `generation`, the
    ops span the steps of a generation."""

    ops: tuple[Op, ...]
    n_invokes: int = 1
    version: int = IR_VERSION
    generation: Generation | None = None

    def __post_init__(self) -> None:
        defined: set[int] = set()
        for op in self.ops:
            missing = [r for r in op.refs() if r not in defined]
            if missing:
                raise ValueError(f"op {op.opcode} uses %{missing[0]} before it is defined")
            if op.site is not None and op.site.invoke >= self.n_invokes:
                raise ValueError(f"site {op.site} names invoke {op.site.invoke} of {self.n_invokes}")
            if op.result is not None:
                if op.result in defined:
                    raise ValueError(f"%{op.result} is defined twice")
                defined.add(op.result)

    def structural_hash(self) -> str:
        """sha256 of the program without spans or parameter values: equal experiments, equal hash."""
        blob = json.dumps(to_json(self, spans=False), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()

    def params(self) -> dict[str, Type]:
        return {op.target: op.type for op in self.ops if op.opcode == "param" and op.type}

    def saves(self) -> dict[str, int]:
        """Save name -> value id."""
        return {op.target: op.args[0].id for op in self.ops if op.opcode == "save"}  # type: ignore[union-attr]


# ------------------------------------------------------------------------------------------ JSON
_RECORDS = {
    cls.__name__: cls
    for cls in (
        Span, TensorType, TupleType, DictType, ScalarType, OpaqueType, Ref, Const, SliceArg,
        EllipsisArg, TupleArg, ListArg, DTypeArg, Site, Op, Generation, Program,
    )
}


# Fields added after programs were first stored: omitted at their defaults, so that a program
# without them reads (and hashes) as it did before they existed.
_OPTIONAL = ("generation", "step", "point")


def to_json(obj: Any, spans: bool = True) -> Any:
    """Encode IR records as JSON-compatible data (`{"$": "Op", ...}`)."""
    if isinstance(obj, tuple(_RECORDS.values())):
        out: dict[str, Any] = {"$": type(obj).__name__}
        for f in dataclasses.fields(obj):
            if f.name == "span" and not spans:
                continue
            if f.name in _OPTIONAL and getattr(obj, f.name) == f.default:
                continue
            out[f.name] = to_json(getattr(obj, f.name), spans)
        return out
    if isinstance(obj, (tuple, list)):
        return [to_json(x, spans) for x in obj]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot encode {type(obj).__name__} in the IR")


def from_json(data: Any) -> Any:
    """Inverse of `to_json`."""
    if isinstance(data, dict):
        cls = _RECORDS.get(data.get("$", ""))
        if cls is None:
            raise ValueError(f"unknown IR record {data.get('$')!r}")
        kwargs = {k: from_json(v) for k, v in data.items() if k != "$"}
        return cls(**kwargs)
    if isinstance(data, list):
        return tuple(from_json(x) for x in data)
    return data


def dumps(program: Program) -> str:
    return json.dumps(to_json(program), indent=1)


def loads(text: str | bytes, source: str = "<payload>") -> Program:
    """Decode a JSON program, validated against the vocabulary op by op (compiler/validate.py);
    raises PayloadError naming the op index and the reason."""
    from compiler.validate import load

    return load(text, source)
