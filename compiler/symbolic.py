"""Site signatures with symbolic batch and sequence sizes, stored as plain JSON.

Two fake passes at different (batch, seq) sizes show which dimensions follow the input; those
become the symbols `batch`, `seq` (or `batch*seq`). A signature then yields the site table for any
input size without another forward, so a second check of a spec costs milliseconds.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from compiler.check import type_of
from compiler.ir import DictType, ScalarType, TensorType, TupleType, Type, from_json, to_json
from compiler.shape_rules import Abstract
from compiler.signatures import Event, SiteTable

PROBES = ((2, 11), (3, 17))  # (batch, seq) of the two fake passes; distinct, and not model sizes


@dataclass(frozen=True)
class Signature:
    """Every event of a model's forward in order, each with its symbolic type."""

    events: tuple[Event, ...]
    types: tuple[Type, ...]

    def table(self, mode: FakeTensorMode, batch: int, seq: int) -> SiteTable:
        """The site table for inputs of `batch` rows of `seq` tokens (values made lazily)."""
        table = SiteTable(mode=mode, batch_size=batch)
        table.order = list(self.events)
        table.positions = {e: i for i, e in enumerate(self.events)}
        for path, phase, _ in self.events:
            key = f"{path}/{phase}"
            table.calls[key] = table.calls.get(key, 0) + 1
        table.values = _LazyValues(self, mode, {"batch": batch, "seq": seq})  # type: ignore[assignment]
        return table

    def to_data(self, types: "TypeTable") -> list[list[Any]]:
        return [[*event, types.index(t)] for event, t in zip(self.events, self.types, strict=True)]

    @classmethod
    def from_data(cls, rows: list[list[Any]], types: "TypeTable") -> "Signature":
        return cls(tuple((r[0], r[1], r[2]) for r in rows), tuple(types[r[3]] for r in rows))


class TypeTable:
    """Distinct types stored once: a model's 80 layers share a handful of them."""

    def __init__(self, data: list[Any] | None = None):
        self._types: list[Type] = [from_json(t) for t in data or []]
        self._index: dict[Type, int] = {t: i for i, t in enumerate(self._types)}

    def index(self, t: Type) -> int:
        if t not in self._index:
            self._index[t] = len(self._types)
            self._types.append(t)
        return self._index[t]

    def __getitem__(self, i: int) -> Type:
        return self._types[i]

    def to_data(self) -> list[Any]:
        return [to_json(t, spans=False) for t in self._types]


class _LazyValues(Mapping):  # type: ignore[type-arg]
    """Fake values made on first use: a check touches a handful of the model's thousands of events."""

    def __init__(self, signature: Signature, mode: FakeTensorMode, sizes: dict[str, int]):
        self._index = {e: i for i, e in enumerate(signature.events)}
        self._signature, self._mode, self._sizes = signature, mode, sizes
        self._made: dict[Event, Any] = {}

    def __getitem__(self, event: Event) -> Any:
        if event not in self._made:
            t = self._signature.types[self._index[event]]
            self._made[event] = instantiate(t, self._sizes)
        return self._made[event]

    def __iter__(self) -> Any:
        return iter(self._index)

    def __len__(self) -> int:
        return len(self._index)


class Record(dict):  # type: ignore[type-arg]
    """A model output record (`.logits` or `["logits"]`) rebuilt from its type."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


def instantiate(t: Type, sizes: dict[str, int]) -> Any:
    """A value of type `t` with its symbols replaced by `sizes`; tensors are `Abstract` (shape and
    dtype only), made into fake tensors by the checker only for ops without a shape rule."""
    if isinstance(t, TensorType):
        shape = [d if isinstance(d, int) else _size(d, sizes) for d in t.shape]
        return Abstract(torch.Size(shape), getattr(torch, t.dtype))
    if isinstance(t, TupleType):
        return tuple(instantiate(i, sizes) for i in t.items)
    if isinstance(t, DictType):
        return Record((k, instantiate(v, sizes)) for k, v in zip(t.keys, t.values, strict=True))
    if isinstance(t, ScalarType):
        return {"int": 0, "float": 0.0, "bool": False, "str": "", "none": None}[t.kind]
    return None  # an opaque object (a cache): nothing a spec can index


def _size(symbol: str, sizes: dict[str, int]) -> int:
    out = 1
    for part in symbol.split("*"):
        out *= sizes[part]
    return out


def generalize(a: Type, b: Type) -> Type | None:
    """One symbolic type from the types seen at the two probe sizes, or None if they differ in a
    way that is not a batch or sequence dimension."""
    if isinstance(a, TensorType) and isinstance(b, TensorType):
        if a.dtype != b.dtype or len(a.shape) != len(b.shape):
            return None
        dims: list[int | str] = []
        for x, y in zip(a.shape, b.shape, strict=True):
            symbol = _symbol(x, y)
            if symbol is None:
                return None
            dims.append(symbol)
        return TensorType(a.dtype, tuple(dims))
    if isinstance(a, TupleType) and isinstance(b, TupleType) and len(a.items) == len(b.items):
        items = [generalize(x, y) for x, y in zip(a.items, b.items, strict=True)]
        return None if any(i is None for i in items) else TupleType(tuple(items))  # type: ignore[arg-type]
    if isinstance(a, DictType) and isinstance(b, DictType) and a.keys == b.keys:
        values = [generalize(x, y) for x, y in zip(a.values, b.values, strict=True)]
        return None if any(v is None for v in values) else DictType(a.keys, tuple(values))  # type: ignore[arg-type]
    return a if a == b else None


def _symbol(x: int | str, y: int | str) -> int | str | None:
    (b1, s1), (b2, s2) = PROBES
    if x == y:
        return x
    for symbol, (p, q) in (("batch", (b1, b2)), ("seq", (s1, s2)), ("batch*seq", (b1 * s1, b2 * s2))):
        if (x, y) == (p, q):
            return symbol
    return None


def signature_from_tables(first: SiteTable, second: SiteTable) -> Signature | None:
    """Combine the tables of the two probe passes; None if the forward's structure differs."""
    if first.order != second.order:
        return None
    types = []
    for event in first.order:
        t = generalize(_record_type(first.values[event]), _record_type(second.values[event]))
        if t is None:
            return None
        types.append(t)
    return Signature(tuple(first.order), tuple(types))


def _record_type(value: Any) -> Type:
    """type_of, with model output records kept as dicts (their fields are what specs read)."""
    if isinstance(value, Mapping) and all(isinstance(k, str) for k in value):
        return DictType(tuple(value), tuple(_record_type(v) for v in value.values()))
    if isinstance(value, (tuple, list)) and not hasattr(value, "_fields"):
        return TupleType(tuple(_record_type(v) for v in value))
    return type_of(value)
