"""Find the user's own line: the first stack frame outside interp_dsl and the libraries it drives."""

from __future__ import annotations

import os
import sys

import einops
import torch

import compiler
import runtime
from compiler.ir import NO_SPAN, Span

_OURS = tuple(
    os.path.dirname(os.path.abspath(m.__file__)) + os.sep  # type: ignore[arg-type]
    for m in (sys.modules[__name__.rpartition(".")[0]], compiler, runtime, torch, einops)
) + (os.path.dirname(os.__file__) + os.sep + "contextlib.py",)


def user_span() -> Span:
    """Span of the innermost caller that is the user's code."""
    frame = sys._getframe(1)
    while frame is not None:
        filename = os.path.abspath(frame.f_code.co_filename)
        if not filename.startswith(_OURS):
            line, col, end_line, end_col = _position(frame)
            return Span(frame.f_code.co_filename, line, col, end_line, end_col)
        frame = frame.f_back  # type: ignore[assignment]
    return NO_SPAN


def _position(frame: object) -> tuple[int, int, int, int]:
    code, lasti = frame.f_code, frame.f_lasti  # type: ignore[attr-defined]
    positions = list(code.co_positions())
    index = lasti // 2
    if 0 <= index < len(positions):
        line, end_line, col, end_col = positions[index]
        if line is not None:
            return line, (col or 0) + 1 if col is not None else 0, end_line or line, (end_col or 0) + 1
    return frame.f_lineno, 0, 0, 0  # type: ignore[attr-defined]
