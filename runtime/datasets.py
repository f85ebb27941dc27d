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
            raise DatasetError.at(Span(str(path), 0), not_a_file(path))
        return cls(path, kind, field or "text")

    def rows(self) -> Iterator[str]:
        """The prompts in file order, read lazily."""
        if self.kind == "csv":
            yield from self._csv()
            return
        for number, line in self._lines():
            if line.strip():
                yield line.rstrip("\r\n") if self.kind == "lines" else self._field(line, number)

    def count(self) -> int:
        """How many prompts the file holds (one streaming pass, which finds any byte that is not
        UTF-8 before a sweep starts; records are checked when read)."""
        lines = (line for _, line in self._lines())
        if self.kind == "csv":
            return sum(1 for record in self._records(csv.reader(lines)) if record) - 1
        return sum(1 for line in lines if line.strip())

    def _lines(self) -> Iterator[tuple[int, str]]:
        """(line number, text with its line ending) in file order; a byte that is not UTF-8 is
        an error at its line. A leading byte-order mark is dropped."""
        offset = 0
        with self.path.open("rb") as f:
            for number, raw in enumerate(f, 1):
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    col = len(raw[:e.start].decode("utf-8")) + 1
                    raise DatasetError.at(Span(str(self.path), number, col),
                                          f"not UTF-8 text: byte 0x{raw[e.start]:02x} "
                                          f"(byte offset {offset + e.start} of the file)",
                                          "save the file as UTF-8") from None
                offset += len(raw)
                yield number, text.removeprefix("\ufeff") if number == 1 else text

    def describe(self) -> dict[str, Any]:
        return {"file": str(self.path), "kind": self.kind, "field": self.field}

    def _field(self, line: str, number: int) -> str:
        span = Span(str(self.path), number)
        try:
            record = json.loads(line)
        except (ValueError, RecursionError) as e:  # also a number too long, or nesting too deep
            reason = e.msg if isinstance(e, json.JSONDecodeError) else str(e)
            raise DatasetError.at(span, f"not a JSON record: {reason}", "one JSON object per line") from None
        if not isinstance(record, dict):
            raise DatasetError.at(span, f"expected a JSON object, found {type(record).__name__}")
        if self.field not in record:
            raise DatasetError.at(span, f"the record has no field {self.field!r}",
                                  did_you_mean(self.field, record) or f"its fields: {', '.join(record)}")
        value = record[self.field]
        if not isinstance(value, str):
            raise DatasetError.at(span, f"field {self.field!r} holds {_short(value)}, expected a string")
        return value

    def _csv(self) -> Iterator[str]:
        reader = csv.reader(line for _, line in self._lines())
        records = self._records(reader)
        columns = next(records, [])
        if self.field not in columns:
            raise DatasetError.at(Span(str(self.path), 1), f"{self.path.name} has no column {self.field!r}",
                                  did_you_mean(self.field, columns) or f"its columns: {', '.join(columns)}")
        at = columns.index(self.field)
        for record in filter(None, records):
            if at >= len(record):
                raise DatasetError.at(Span(str(self.path), reader.line_num),
                                      f"the row has {len(record)} of the {len(columns)} columns: "
                                      f"no value for {self.field!r}", "one value per column on every row")
            yield record[at]

    def _records(self, reader: Any) -> Iterator[list[str]]:
        """A csv reader's records; a malformed one (a field over csv's size limit) is an error at its line."""
        try:
            yield from reader
        except csv.Error as e:
            raise DatasetError.at(Span(str(self.path), reader.line_num), f"not a CSV record: {e}") from None


def _short(value: Any) -> str:
    """A JSON value as a user wrote it, cut to one short line."""
    text = json.dumps(value)
    return f"{text[:37]}..." if len(text) > 40 else text


def not_a_file(path: Path) -> str:
    """Why a prompt file cannot be opened."""
    return f"prompt file {path} is a directory" if path.is_dir() else f"prompt file {path} does not exist"


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
