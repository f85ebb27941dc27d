"""The golden corpus of bad experiments: each file's exact message and exit code.

Regenerate after an intended change with: IVX_REGOLD=1 python -m pytest tests/test_ivx_golden.py
"""

from __future__ import annotations

import contextlib
import io
import os
from pathlib import Path

import pytest

from interp_dsl.cli import main

ROOT = Path(__file__).resolve().parent.parent
# Files that fail when run; the others (saves nothing, too-short prompts) are `ivx check` findings.
BAD = sorted(p for p in (ROOT / "tests" / "ivx_bad").glob("*.ivx") if p.with_suffix(".expected").exists())


@pytest.mark.parametrize("path", BAD, ids=[p.stem for p in BAD])
def test_bad_file_message(path, tiny_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    relative = path.relative_to(ROOT)
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(["run", str(relative), "--model", str(tiny_dir), "--out", str(tmp_path), "--quiet"])
    got = f"exit {code}\n{err.getvalue()}"
    golden = path.with_suffix(".expected")
    if os.environ.get("IVX_REGOLD"):
        golden.write_text(got)
    assert got == golden.read_text()
    assert "Traceback" not in got and code in (1, 2)
    assert not (tmp_path / "manifest.json").exists()  # refused before anything ran
