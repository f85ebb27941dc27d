"""Sweep results on disk: safetensors shards of rows, and `manifest.json` naming the whole ones.

Shard k covers prompts [k * shard_prompts, (k + 1) * shard_prompts). A shard is written to a
temporary file and renamed, then the manifest is rewritten the same way, so a kill at any moment
leaves every listed shard whole and the manifest valid. The manifest records each shard's sha256,
its prompt range and a digest of the prompt rows it was computed from; readers verify the files,
and a rerun recomputes exactly the shards that are missing or damaged. The manifest's identity
fields say what determines the numbers (the program and its parameter values, the model and its
weights, the prompt sources, the grid): a directory holding another experiment is never resumed.
One process writes a directory at a time (runtime/files.py `DirectoryLock`).

Rows are ordered by prompt, then parameter point, then vectorised point; `__prompt__`,
`__point__` and `__fan__` hold those indices for each row.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import struct
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_bytes
from safetensors.torch import save as save_bytes

from compiler.errors import InterventionError
from compiler.ir import Span
from runtime.files import DirectoryLock, atomic_write
from runtime.fingerprints import rows_digest
from runtime.grid import n_points

MANIFEST = "manifest.json"
FORMAT = "interp_dsl.sweep/2"
READABLE = ("interp_dsl.sweep/1", FORMAT)  # sweep/1: no digests, read without verifying
INDEX = ("__prompt__", "__point__", "__fan__")
ANNOTATIONS = "interp_dsl.annotations"  # the shard metadata key of `ShardSink.annotate`'s facts
# What makes two runs the same experiment, and how a difference is named.
IDENTITY = {
    "ir_hash": "the program", "values": "parameter values", "model": "the model",
    "weights": "the model's weights", "prompts": "the prompt sources", "n_prompts": "the number of prompts",
    "points": "the parameter grid", "fan_axes": "the vectorised axes", "batch_size": "the batch size",
    "shard_prompts": "the shard size",
}
_REQUIRED = ("shards", "complete", "points", "fan_axes", "dims")  # what reading results needs
RESTART = "use another --out, or rerun with --restart (restart=True in model.sweep) to discard these results"


class ResultsDirError(InterventionError):
    """An output directory holds something else, or results cannot be read."""


class DamagedResultsWarning(UserWarning):
    """`load_results` read a directory with shards missing or damaged (see `Results.missing`)."""


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.safetensors"


Annotate = Callable[[dict[str, torch.Tensor], list[dict[str, str]]], dict[str, Any]]


class ShardSink:
    """Writes shards into `out` under a manifest that starts as `header` (identity and description).
    Use as a context manager: it holds the directory's lock, and on entry reads what a previous run
    left (refusing another experiment, and setting aside shards that fail verification).
    `annotate(tensors, prompt rows)` gives JSON-able facts about a shard's rows (the decoded text of
    a generation) kept in the shard file's metadata and read back into `Results.annotations`."""

    def __init__(self, out: Path, header: dict[str, Any], restart: bool = False, annotate: Annotate | None = None):
        self.out = out
        self.annotate = annotate
        self.manifest: dict[str, Any] = {"format": FORMAT, **header, "shards": [], "complete": False}
        self.recorded: dict[int, dict[str, Any]] = {}  # the previous run's shards, damaged ones included
        self.damaged: list[dict[str, Any]] = []  # {"file", "prompts", "reason"} of shards to recompute
        self._restart = restart
        self._lock = DirectoryLock(out)

    def __enter__(self) -> "ShardSink":
        self._lock.__enter__()
        try:
            self._open()
        except BaseException:
            self._lock.__exit__()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        self._lock.__exit__()

    def _open(self) -> None:
        for stale in (*self.out.glob(".shard-*.safetensors.*"), *self.out.glob(f".{MANIFEST}.*")):
            stale.unlink(missing_ok=True)  # the temporary file of a killed write
        if not (self.out / MANIFEST).exists():
            return
        if self._restart:
            for path in (*self.out.glob("shard-*.safetensors"), self.out / MANIFEST):
                path.unlink(missing_ok=True)
            return
        existing = _read_manifest(self.out)
        _refuse_other(self.out, existing, self.manifest)
        self.recorded = {s["index"]: s for s in existing["shards"]}
        self.damaged = [d for s in existing["shards"] if (d := _damage(self.out, s))]
        bad = {d["file"] for d in self.damaged}
        self.manifest["shards"] = [s for s in existing["shards"] if s["file"] not in bad]
        self.manifest["saves"] = existing.get("saves", {})
        self.manifest["complete"] = existing["complete"] and not self.damaged

    @property
    def done(self) -> int:
        """Prompts already written and verified."""
        return _prompts_held(self.manifest["shards"])

    @property
    def complete(self) -> bool:
        return bool(self.manifest["complete"])

    def has(self, index: int) -> bool:
        """Whether shard `index` is written and verified."""
        return any(s["index"] == index for s in self.manifest["shards"])

    def check_inputs(self, index: int, digest: str, sources: str) -> None:
        """Refuse when the prompt rows of a shard the previous run wrote have changed since."""
        recorded = self.recorded.get(index)
        if recorded is not None and recorded["inputs"] != digest:
            first, stop = recorded["prompts"]
            raise ResultsDirError.at(
                Span(str(self.out / MANIFEST), 0),
                f"prompts {first}..{stop - 1} ({sources}) differ from those {recorded['file']} in {self.out} "
                "was computed from", RESTART)

    def write(self, index: int, tensors: dict[str, torch.Tensor], first: int, stop: int,
              rows: list[dict[str, str]]) -> None:
        """Add shard `index` (prompts [first, stop), computed from prompt `rows`): the file first,
        then the manifest naming it."""
        name = shard_name(index)
        data = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
        blob = save_bytes(data, metadata=self._metadata(data, rows))
        atomic_write(self.out / name, lambda p: Path(p).write_bytes(blob))
        self.manifest["saves"] = {k: {"shape": list(v.shape[1:]), "dtype": str(v.dtype).removeprefix("torch.")}
                                  for k, v in data.items() if k not in INDEX}
        entry = {"index": index, "file": name, "prompts": [first, stop], "rows": int(data[INDEX[0]].shape[0]),
                 "sha256": hashlib.sha256(blob).hexdigest(), "inputs": rows_digest(rows)}
        others = [s for s in self.manifest["shards"] if s["index"] != index]
        self.manifest["shards"] = sorted([*others, entry], key=lambda s: s["index"])
        self._save_manifest()

    def _metadata(self, data: dict[str, torch.Tensor], rows: list[dict[str, str]]) -> dict[str, str]:
        notes = self.annotate(data, rows) if self.annotate is not None else {}
        return {"format": "pt", **({ANNOTATIONS: json.dumps(notes, ensure_ascii=False)} if notes else {})}

    def finish(self) -> None:
        self.manifest["complete"] = True
        self._save_manifest()

    def start(self) -> None:
        """Write the manifest before the first shard, so the directory is claimed and valid."""
        self.out.mkdir(parents=True, exist_ok=True)
        self._save_manifest()

    def _save_manifest(self) -> None:
        _write_manifest(self.out, self.manifest)


def _write_manifest(out: Path, manifest: dict[str, Any]) -> None:
    text = json.dumps(manifest, indent=1)
    atomic_write(out / MANIFEST, lambda p: Path(p).write_text(text))


def _prompts_held(shards: list[dict[str, Any]]) -> int:
    return sum(s["prompts"][1] - s["prompts"][0] for s in shards)


def _verified_bytes(out: Path, shard: dict[str, Any]) -> tuple[bytes | None, dict[str, Any] | None]:
    """A listed shard's bytes, or None and why it cannot be used (missing, or not the bytes that
    were written)."""
    try:
        blob = (out / shard["file"]).read_bytes()
    except FileNotFoundError:
        return None, _damaged(shard, "is missing")
    except OSError as e:
        return None, _damaged(shard, f"is unreadable ({e.strerror})")
    if "sha256" in shard and hashlib.sha256(blob).hexdigest() != shard["sha256"]:
        return None, _damaged(shard, "was changed or cut short after it was written (its sha256 differs)")
    return blob, None


def _damaged(shard: dict[str, Any], reason: str) -> dict[str, Any]:
    return {"file": shard["file"], "prompts": shard["prompts"], "reason": reason}


def _damage(out: Path, shard: dict[str, Any]) -> dict[str, Any] | None:
    return _verified_bytes(out, shard)[1]


def record_stop(out: Path, errors: list[str], since_ns: int) -> int | None:
    """Note in the manifest of a sweep that failed part way why it stopped; return how many
    prompts its complete shards hold. None when no sweep claimed `out` since `since_ns` (the
    failure came before any shard, or the directory holds another experiment) or it completed."""
    path = out / MANIFEST
    if not path.is_file() or path.stat().st_mtime_ns < since_ns:
        return None
    manifest = _read_manifest(out)
    if manifest["complete"]:
        return None
    held = _prompts_held(manifest["shards"])
    manifest["stopped"] = {"after_prompts": held, "errors": errors}
    _write_manifest(out, manifest)
    return held


def _read_manifest(out: Path) -> dict[str, Any]:
    path = out / MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:  # not JSON, or not UTF-8
        raise ResultsDirError.at(Span(str(path), 0), f"cannot read the manifest: {e}") from None
    if not isinstance(manifest, dict) or manifest.get("format") not in READABLE:
        raise ResultsDirError.at(Span(str(path), 0), f"{out} does not hold sweep results", RESTART)
    missing = [k for k in _REQUIRED if k not in manifest]
    if missing:
        raise ResultsDirError.at(Span(str(path), 0), f"the manifest is damaged: it has no {', '.join(missing)}",
                                 RESTART)
    return manifest


def _refuse_other(out: Path, existing: dict[str, Any], new: dict[str, Any]) -> None:
    if existing["format"] != new["format"]:
        raise ResultsDirError.at(Span(str(out / MANIFEST), 0),
                                 f"{out} holds results written by an older interp_dsl ({existing['format']}), "
                                 "which cannot be checked against this run", RESTART)
    differ = [_difference(k, existing.get(k), new.get(k)) for k in IDENTITY if existing.get(k) != new.get(k)]
    if differ:
        raise ResultsDirError.at(Span(str(out / MANIFEST), 0),
                                 f"{out} holds results of a different experiment: " + "; ".join(differ), RESTART)


def refuse_other_run(out: Path, header: dict[str, Any], unknown: tuple[str, ...] = ()) -> None:
    """Refuse, before any work starts, a directory holding another experiment; the identity fields
    in `unknown` are not known yet (checked again when the sink opens)."""
    if not (out / MANIFEST).exists():
        return
    existing = {k: v for k, v in _read_manifest(out).items() if k not in unknown}
    _refuse_other(out, existing, {k: v for k, v in {"format": FORMAT, **header}.items() if k not in unknown})


def _difference(key: str, there: Any, now: Any) -> str:
    what = IDENTITY[key]
    if isinstance(there, dict) and isinstance(now, dict):
        names = sorted(n for n in {*there, *now} if there.get(n) != now.get(n))
        return f"{what} differ ({', '.join(names)})"
    if key in ("ir_hash", "weights"):
        return f"{what} differs"
    return f"{what}: {_short(there)} there, {_short(now)} now"


def _short(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


@dataclass
class Results:
    """Sweep results: `saves[name]` has one row per (prompt, point); `index` says which.
    `missing` lists shards that could not be read (each with its file, prompt range and reason):
    their prompts are absent from the rows."""

    saves: dict[str, torch.Tensor]
    index: dict[str, torch.Tensor]  # "prompt", and each axis's value, per row
    manifest: dict[str, Any]
    missing: list[dict[str, Any]] = field(default_factory=list)
    annotations: dict[str, list[Any]] = field(default_factory=dict)  # per row, e.g. "texts" of a generation

    @property
    def n_prompts(self) -> int:
        """The prompts whose rows are here."""
        per_prompt = max(1, len(self.manifest["points"])) * n_points(self.manifest["fan_axes"])
        return len(self.index["prompt"]) // per_prompt

    @property
    def texts(self) -> dict[str, list[str]]:
        """A generation's text per row, by prompt name (empty for a forward sweep)."""
        return {key.removeprefix("text:"): values for key, values in self.annotations.items()
                if key.startswith("text:")}

    @property
    def complete(self) -> bool:
        """Every prompt of the run is here: it finished and no shard is missing or damaged."""
        return bool(self.manifest["complete"]) and not self.missing

    @property
    def dims(self) -> list[tuple[str, int]]:
        """The axes after the prompt axis, in `grid` order: parameter axes (a zipped group is
        one axis, named by its members joined with '+'), then vectorised axes."""
        return [(name, size) for name, size in self.manifest["dims"]]

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.saves[name]

    def grid(self, name: str) -> torch.Tensor:
        """`saves[name]` shaped [prompts, *axis sizes, *value shape]."""
        value = self.saves[name]
        return value.reshape(self.n_prompts, *(size for _, size in self.dims), *value.shape[1:])

    def __repr__(self) -> str:
        saves = ", ".join(f"{k}{list(v.shape)}" for k, v in self.saves.items())
        gaps = f", {len(self.missing)} shard(s) missing" if self.missing else ""
        return f"Results({self.n_prompts} prompts, dims={self.dims}, saves: {saves}{gaps})"


def load_results(out: str | Path) -> Results:
    """Read every whole shard of a sweep directory (a sweep still running or killed included),
    verifying each against the manifest. A missing or damaged shard is listed in
    `Results.missing` (with a `DamagedResultsWarning`) and the others are read."""
    out = Path(out)
    if not (out / MANIFEST).exists():
        raise ResultsDirError.at(Span(str(out), 0), f"{out} has no {MANIFEST}",
                                 "give the --out directory of an `ivx run` or `model.sweep`")
    manifest = _read_manifest(out)
    parts, missing = [], []
    for shard in manifest["shards"]:
        tensors, damage = _load_shard(out, shard)
        if damage is None:
            parts.append(tensors)
        else:
            missing.append(damage)
    if missing:
        warnings.warn(DamagedResultsWarning(
            f"{out}: " + "; ".join(f"{d['file']} (prompts {d['prompts'][0]}..{d['prompts'][1] - 1}) {d['reason']}"
                                   for d in missing)
            + ": their rows are left out; rerun the same command with the same --out to recompute them"),
            stacklevel=2)
    return _results(parts, manifest, missing)


def _load_shard(out: Path, shard: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """A shard's tensors (and its annotations under ANNOTATIONS), or why it cannot be used."""
    blob, damage = _verified_bytes(out, shard)
    if blob is None:
        return {}, damage
    try:
        return {**load_bytes(blob), ANNOTATIONS: _annotations(blob)}, None
    except (SafetensorError, ValueError) as e:
        return {}, _damaged(shard, f"is not a safetensors file ({e})")


def _annotations(blob: bytes) -> dict[str, list[Any]]:
    """The annotations in a safetensors file's header metadata (the header: an 8-byte length, then JSON)."""
    (length,) = struct.unpack("<Q", blob[:8])
    metadata = json.loads(blob[8:8 + length]).get("__metadata__") or {}
    return json.loads(metadata.get(ANNOTATIONS, "{}"))


def _results(parts: list[dict[str, Any]], manifest: dict[str, Any],
             missing: list[dict[str, Any]] | None = None) -> Results:
    notes: dict[str, list[Any]] = {}
    for part in parts:
        for key, values in part.get(ANNOTATIONS, {}).items():
            notes.setdefault(key, []).extend(values)
    names = [n for n in (parts[0] if parts else manifest.get("saves", {})) if n not in (*INDEX, ANNOTATIONS)]
    cat = {n: torch.cat([p[n] for p in parts]) if parts else torch.empty(0) for n in (*INDEX, *names)}
    index = {"prompt": cat["__prompt__"].long() if parts else torch.empty(0, dtype=torch.long)}
    points, fan_axes = manifest["points"], manifest["fan_axes"]
    for axis in (points[0] if points else {}):
        index[axis] = torch.tensor([points[int(p)][axis] for p in cat["__point__"]]) if parts else torch.empty(0)
    fan_points = list(itertools.product(*fan_axes.values()))
    for k, axis in enumerate(fan_axes):
        index[axis] = torch.tensor([fan_points[int(f)][k] for f in cat["__fan__"]]) if parts else torch.empty(0)
    return Results({n: cat[n] for n in names}, index, manifest, list(missing or []), notes)


class MemorySink(ShardSink):
    """A sink that keeps shards in memory (a sweep without an output directory)."""

    def __init__(self, header: dict[str, Any], annotate: Annotate | None = None):
        super().__init__(Path("<memory>"), header, annotate=annotate)
        self.parts: dict[int, dict[str, Any]] = {}  # by shard index

    def __enter__(self) -> "MemorySink":
        return self

    def __exit__(self, *exc: Any) -> None:
        pass

    def start(self) -> None:
        pass

    def write(self, index: int, tensors: dict[str, torch.Tensor], first: int, stop: int,
              rows: list[dict[str, str]]) -> None:
        data = {k: v.detach().cpu() for k, v in tensors.items()}
        notes = self.annotate(data, rows) if self.annotate is not None else {}
        self.parts[index] = {**data, ANNOTATIONS: notes}
        self.manifest["shards"].append({"index": index, "file": None, "prompts": [first, stop],
                                        "rows": int(tensors[INDEX[0]].shape[0])})
        self.manifest["shards"].sort(key=lambda s: s["index"])  # shards may arrive in any order

    def _save_manifest(self) -> None:
        pass

    def results(self) -> Results:
        return _results([self.parts[i] for i in sorted(self.parts)], self.manifest)
