"""Writing result files: atomically, with the user's umask, by one process at a time; and the
package versions recorded beside them."""

from __future__ import annotations

import fcntl
import os
import socket
import tempfile
from pathlib import Path
from typing import Any

from compiler.errors import InterventionError
from compiler.ir import Span

LOCK = ".ivx-lock"


def cache_root() -> Path:
    """Where interp_dsl keeps what it can rebuild: `$INTERP_DSL_CACHE`, else ~/.cache/interp_dsl."""
    return Path(os.environ.get("INTERP_DSL_CACHE", Path.home() / ".cache" / "interp_dsl"))


def atomic_write(path: Path, write: Any) -> None:
    """Write `path` through `write(temporary_path)` and a rename: readers never see half a file.
    The file gets the mode a plain `open` would give it (0666 less the umask)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    """`atomic_write` of a text file."""
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


class DirectoryBusy(InterventionError):
    """Another process is writing results into the same directory."""


class DirectoryLock:
    """`out/.ivx-lock`, held with `flock` by the process writing results into `out`. The kernel
    drops the lock when its holder exits, however it exits, so a lock left by a killed run is
    simply taken; the file names the current holder's pid for the message a second writer gets."""

    def __init__(self, out: Path):
        self.path = out / LOCK
        self._fd: int | None = None

    def __enter__(self) -> "DirectoryLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip() or "another process"
            os.close(fd)
            raise DirectoryBusy.at(Span(str(self.path.parent), 0),
                                   f"{self.path.parent} is being written by {holder}",
                                   "wait for that run to end, or give this one another --out") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        self._fd = fd
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing releases the lock; the file stays (removing it would race)
            self._fd = None


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version
    out = {}
    for package in ("interp-dsl", "torch", "transformers", "lark"):
        try:
            out[package] = version(package)
        except PackageNotFoundError:
            out[package] = "unknown"
    return out
