"""Sweep results on disk: safetensors shards of rows, and `manifest.json` naming the complete ones.

Each shard covers a contiguous range of prompts. A shard is written to a temporary file and renamed,
then the manifest is rewritten the same way, so a kill at any moment leaves every listed shard
whole and the manifest valid; a rerun resumes after the last listed shard. Rows are ordered by
prompt, then parameter point, then vectorised point; `__prompt__`, `__point__` and `__fan__` hold
those indices for each row.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from compiler.errors import InterventionError
from compiler.ir import Span
from runtime.results import atomic_write

MANIFEST = "manifest.json"
FORMAT = "interp_dsl.sweep/1"
INDEX = ("__prompt__", "__point__", "__fan__")
# What makes two runs the same experiment: a directory holding another is not resumed.
IDENTITY = ("ir_hash", "model", "weights", "prompts", "points", "fan_axes", "batch_size", "shard_prompts")
_REQUIRED = ("shards", "complete", "points", "fan_axes", "dims")  # what reading results needs


class ResultsDirError(InterventionError):
    """An output directory holds something else, or results cannot be read."""


class ShardSink:
    """Writes shards into `out` under a manifest that starts as `header` (identity and description)."""

    def __init__(self, out: Path, header: dict[str, Any]):
        self.out = out
        self.manifest = {"format": FORMAT, **header, "shards": [], "complete": False}
        existing = _read_manifest(out) if (out / MANIFEST).exists() else None
        if existing is not None:
            _refuse_other(out, existing, self.manifest)
            self.manifest["shards"] = existing["shards"]
            self.manifest["complete"] = existing["complete"]
            self.manifest["saves"] = existing.get("saves", {})

    @property
    def done(self) -> int:
        """Prompts already written (a rerun starts there)."""
        return _prompts_done(self.manifest)

    @property
    def complete(self) -> bool:
        return bool(self.manifest["complete"])

    def write(self, tensors: dict[str, torch.Tensor], first: int, stop: int) -> None:
        """Add the shard of prompts [first, stop): the file first, then the manifest naming it."""
        if first != self.done:
            raise ValueError(f"shards are contiguous: expected prompt {self.done}, got {first}")
        name = f"shard-{len(self.manifest['shards']):05d}.safetensors"
        data = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
        atomic_write(self.out / name, lambda p: save_file(data, p, metadata={"format": "pt"}))
        self.manifest["saves"] = {k: {"shape": list(v.shape[1:]), "dtype": str(v.dtype).removeprefix("torch.")}
                                  for k, v in data.items() if k not in INDEX}
        self.manifest["shards"].append({"file": name, "prompts": [first, stop], "rows": int(data[INDEX[0]].shape[0])})
        self._save_manifest()

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


def _prompts_done(manifest: dict[str, Any]) -> int:
    shards = manifest["shards"]
    return shards[-1]["prompts"][1] if shards else 0


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
    manifest["stopped"] = {"after_prompts": _prompts_done(manifest), "errors": errors}
    _write_manifest(out, manifest)
    return _prompts_done(manifest)


def _read_manifest(out: Path) -> dict[str, Any]:
    path = out / MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:  # not JSON, or not UTF-8
        raise ResultsDirError.at(Span(str(path), 0), f"cannot read the manifest: {e}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ResultsDirError.at(Span(str(path), 0), f"{out} does not hold sweep results",
                                 "give ivx run --out a new directory")
    missing = [k for k in _REQUIRED if k not in manifest]
    if missing:
        raise ResultsDirError.at(Span(str(path), 0), f"the manifest is damaged: it has no {', '.join(missing)}",
                                 "delete the directory and run the sweep again")
    return manifest


def _refuse_other(out: Path, existing: dict[str, Any], new: dict[str, Any]) -> None:
    differ = [k for k in IDENTITY if existing.get(k) != new.get(k)]
    if differ:
        details = "; ".join(f"{k}: {_short(existing.get(k))} there, {_short(new.get(k))} now" for k in differ)
        raise ResultsDirError.at(
            Span(str(out / MANIFEST), 0), f"{out} holds results of a different experiment ({details})",
            "use another --out, or delete the directory to start again")


def _short(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


@dataclass
class Results:
    """Sweep results: `saves[name]` has one row per (prompt, point); `index` says which."""

    saves: dict[str, torch.Tensor]
    index: dict[str, torch.Tensor]  # "prompt", and each axis's value, per row
    manifest: dict[str, Any]

    @property
    def n_prompts(self) -> int:
        return _prompts_done(self.manifest)

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
        return f"Results({self.n_prompts} prompts, dims={self.dims}, saves: {saves})"


def load_results(out: str | Path) -> Results:
    """Read every complete shard of a sweep directory (a sweep still running or killed included)."""
    out = Path(out)
    if not (out / MANIFEST).exists():
        raise ResultsDirError.at(Span(str(out), 0), f"{out} has no {MANIFEST}",
                                 "give the --out directory of an `ivx run` or `model.sweep`")
    manifest = _read_manifest(out)
    return _results([_load_shard(out / shard["file"]) for shard in manifest["shards"]], manifest)


def _load_shard(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise ResultsDirError.at(Span(str(path), 0), f"cannot read this shard: {e}",
                                 "it was changed or cut short after it was written; delete the directory "
                                 "and run the sweep again") from None


def _results(parts: list[dict[str, torch.Tensor]], manifest: dict[str, Any]) -> Results:
    names = [n for n in (parts[0] if parts else manifest.get("saves", {})) if n not in INDEX]
    cat = {n: torch.cat([p[n] for p in parts]) if parts else torch.empty(0) for n in (*INDEX, *names)}
    index = {"prompt": cat["__prompt__"].long() if parts else torch.empty(0, dtype=torch.long)}
    points, fan_axes = manifest["points"], manifest["fan_axes"]
    for axis in (points[0] if points else {}):
        index[axis] = torch.tensor([points[int(p)][axis] for p in cat["__point__"]]) if parts else torch.empty(0)
    fan_points = list(itertools.product(*fan_axes.values()))
    for k, axis in enumerate(fan_axes):
        index[axis] = torch.tensor([fan_points[int(f)][k] for f in cat["__fan__"]]) if parts else torch.empty(0)
    return Results({n: cat[n] for n in names}, index, manifest)


class MemorySink(ShardSink):
    """A sink that keeps shards in memory (a sweep without an output directory)."""

    def __init__(self, header: dict[str, Any]):
        self.out = Path("<memory>")
        self.manifest = {"format": FORMAT, **header, "shards": [], "complete": False}
        self.parts: list[dict[str, torch.Tensor]] = []

    def start(self) -> None:
        pass

    def write(self, tensors: dict[str, torch.Tensor], first: int, stop: int) -> None:
        self.parts.append({k: v.detach().cpu() for k, v in tensors.items()})
        self.manifest["shards"].append({"file": None, "prompts": [first, stop], "rows": int(tensors[INDEX[0]].shape[0])})

    def _save_manifest(self) -> None:
        pass

    def results(self) -> Results:
        return _results(self.parts, self.manifest)
