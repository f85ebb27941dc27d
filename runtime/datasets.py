"""Prompt datasets read as streams: one row at a time, never the whole file.

A `PromptFile` is a `.txt` (one prompt per non-empty line), `.jsonl` (one record per line, a named
field) or `.csv` (a named column). Rows of several sources are zipped: row i of a sweep takes row i
of each; a source of one literal prompt repeats for every row.
"""

from __future__ import annotations

import csv
import itertools
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from compiler.errors import InterventionError, did_you_mean
from compiler.ir import Span

KINDS = {".txt": "lines", ".jsonl": "jsonl", ".csv": "csv"}


class DatasetError(InterventionError):
    """A prompt file is missing, malformed, or lacks the named field."""


@dataclass(frozen=True)
class PromptFile:
    """A file of prompts: `kind` is "lines", "jsonl" or "csv"; `field` names the jsonl field or csv column."""

    path: Path
    kind: str
    field: str = "text"

    @classmethod
    def of(cls, path: str | Path, field: str | None = None, kind: str | None = None) -> "PromptFile":
        """The kind from the suffix (.txt, .jsonl, .csv) unless given."""
        path = Path(path)
        kind = kind or KINDS.get(path.suffix.lower())
        if kind is None:
            raise DatasetError.at(Span(str(path), 0), f"cannot tell how to read {path.name}",
                                  "prompt files end in .txt (one per line), .jsonl or .csv")
        if not path.is_file():
            raise DatasetError.at(Span(str(path), 0), f"prompt file {path} does not exist")
        return cls(path, kind, field or "text")

    def rows(self) -> Iterator[str]:
        """The prompts in file order, read lazily."""
        if self.kind == "csv":
            yield from self._csv()
            return
        with self.path.open(encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                if self.kind == "lines":
                    yield line.rstrip("\r\n")
                else:
                    yield self._field(line, number)

    def count(self) -> int:
        """How many prompts the file holds (one streaming pass; records are checked when read)."""
        with self.path.open(newline="", encoding="utf-8") as f:
            if self.kind == "csv":
                return sum(1 for _ in csv.reader(f)) - 1
            return sum(1 for line in f if line.strip())

    def describe(self) -> dict[str, Any]:
        return {"file": str(self.path), "kind": self.kind, "field": self.field}

    def _field(self, line: str, number: int) -> str:
        span = Span(str(self.path), number)
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DatasetError.at(span, f"not a JSON record: {e.msg}", "one JSON object per line") from None
        if not isinstance(record, dict):
            raise DatasetError.at(span, f"expected a JSON object, found {type(record).__name__}")
        if self.field not in record:
            raise DatasetError.at(span, f"the record has no field {self.field!r}",
                                  did_you_mean(self.field, record) or f"its fields: {', '.join(record)}")
        value = record[self.field]
        if not isinstance(value, str):
            raise DatasetError.at(span, f"field {self.field!r} holds a {type(value).__name__}, not text")
        return value

    def _csv(self) -> Iterator[str]:
        with self.path.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            if self.field not in (reader.fieldnames or ()):
                raise DatasetError.at(Span(str(self.path), 1), f"{self.path.name} has no column {self.field!r}",
                                      did_you_mean(self.field, reader.fieldnames or ())
                                      or f"its columns: {', '.join(reader.fieldnames or ())}")
            for row in reader:
                yield row[self.field]


Source = PromptFile | list[str]


def zip_rows(sources: dict[str, Source]) -> Iterator[dict[str, str]]:
    """Row i of every source; a literal list of one prompt repeats. Sources of different lengths
    are an error once the shorter one ends."""
    names = list(sources)
    if all(_repeats(s) for s in sources.values()):
        yield {n: sources[n][0] for n in names}  # type: ignore[index]
        return
    streams = [_stream(sources[n]) for n in names]
    finite = [n for n in names if not _repeats(sources[n])]
    for index in itertools.count():
        values = [next(s, None) for s in streams]
        ended = [n for n, v in zip(names, values, strict=True) if v is None]
        if ended:
            if finite and len(ended) != len(finite):
                longer = next(n for n in finite if n not in ended)
                raise DatasetError.at(_span(sources[ended[0]]),
                                      f"prompt {ended[0]} has {index} rows but {longer} has more",
                                      "prompts zipped in one sweep need the same number of rows")
            return
        yield dict(zip(names, values, strict=True))  # type: ignore[arg-type]


def _repeats(source: Source) -> bool:
    return isinstance(source, list) and len(source) == 1


def _stream(source: Source) -> Iterator[str]:
    if isinstance(source, PromptFile):
        return source.rows()
    return itertools.repeat(source[0]) if _repeats(source) else iter(source)


def _span(source: Source) -> Span:
    return Span(str(source.path), 0) if isinstance(source, PromptFile) else Span("<prompts>", 0)


def count_rows(sources: dict[str, Source]) -> int:
    """The number of rows a zip of `sources` yields."""
    finite = [s for s in sources.values() if not _repeats(s)]
    if not finite:
        return 1
    first = finite[0]
    return first.count() if isinstance(first, PromptFile) else len(first)
