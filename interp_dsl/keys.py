"""API keys of `ivx serve`: a text file of sha256 hashes, each with its limits.

One key per line, `NAME sha256:HEX [max_jobs=N] [max_seconds=S] [max_result_bytes=B] [max_tokens=T]`;
`#` starts a comment. The file never holds a key itself: `ivx serve --keys FILE --new-key NAME`
makes a random key, appends its hash, and prints the key once.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import secrets
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Limits:
    """What one key may use: jobs queued or running at once, seconds per job, bytes of results
    per job, and tokens per job (batch rows x (prompt + generated tokens))."""

    max_jobs: int = 4
    max_seconds: float = 300.0
    max_result_bytes: int = 256 * 2**20
    max_tokens: int = 65536


@dataclass(frozen=True)
class Key:
    name: str
    digest: str  # sha256 hex of the key
    limits: Limits


class KeyFileError(ValueError):
    """A keys file that cannot be read; the message names the file and line."""


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def read_keys(path: Path) -> list[Key]:
    """The keys of a keys file; KeyFileError at `path:line` for a malformed line."""
    keys = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if line:
            keys.append(_parse(line, f"{path}:{number}"))
    names = [k.name for k in keys]
    twice = next((n for n in names if names.count(n) > 1), None)
    if twice is not None:
        raise KeyFileError(f"{path}: the key name {twice!r} is used twice")
    return keys


def _parse(line: str, where: str) -> Key:
    name, *rest = line.split()
    if not rest or not rest[0].startswith("sha256:") or len(rest[0]) != 7 + 64:
        raise KeyFileError(f"{where}: expected `NAME sha256:<64 hex digits> [limit=value ...]`")
    limits: dict[str, float | int] = {}
    fields = {f.name: f.type for f in dataclasses.fields(Limits)}
    for item in rest[1:]:
        field, sep, value = item.partition("=")
        if not sep or field not in fields:
            raise KeyFileError(f"{where}: unknown limit {item!r}; limits are {', '.join(fields)}")
        try:
            number = float(value) if field == "max_seconds" else int(value)
        except ValueError:
            raise KeyFileError(f"{where}: {field} is a number, found {value!r}") from None
        if number <= 0:
            raise KeyFileError(f"{where}: {field} is positive, found {value}")
        limits[field] = number
    return Key(name, rest[0].removeprefix("sha256:").lower(), Limits(**limits))  # type: ignore[arg-type]


def find(keys: list[Key], key: str) -> Key | None:
    """The key whose hash matches `key` (compared in constant time), if any."""
    wanted = digest(key)
    found = None
    for k in keys:
        if hmac.compare_digest(k.digest, wanted):
            found = k
    return found


def new_key(path: Path, name: str) -> str:
    """Append a fresh key named `name` to the keys file (default limits) and return it."""
    if not name.replace("-", "").replace("_", "").isalnum():
        raise KeyFileError(f"a key name is letters, digits, - and _, found {name!r}")
    existing = read_keys(path) if path.exists() else []
    if any(k.name == name for k in existing):
        raise KeyFileError(f"{path}: there is already a key named {name!r}")
    key = "ivx-" + secrets.token_urlsafe(32)
    with path.open("a") as f:
        f.write(f"{name} sha256:{digest(key)}\n")
    return key
