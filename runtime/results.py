"""Writing results: saves as safetensors and a JSON manifest, each written atomically."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file


def atomic_write(path: Path, write: Any) -> None:
    """Write `path` through `write(temporary_path)` and a rename: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_results(out: Path, saves: dict[str, torch.Tensor], manifest: dict[str, Any]) -> None:
    """`out/saves.safetensors` and `out/manifest.json`; a reader never sees half a file."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in saves.items()}
    atomic_write(out / "saves.safetensors", lambda p: save_file(tensors, p, metadata={"format": "pt"}))
    atomic_write(out / "manifest.json", lambda p: Path(p).write_text(json.dumps(manifest, indent=1)))


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version
    out = {}
    for package in ("interp-dsl", "torch", "transformers", "lark"):
        try:
            out[package] = version(package)
        except PackageNotFoundError:
            out[package] = "unknown"
    return out
