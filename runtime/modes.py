"""Execution modes, in a module light enough for the command line to import."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Literal, cast, get_args

from compiler.errors import InterventionError, did_you_mean
from compiler.ir import Span

CompileMode = Literal["auto", "off", "graph", "inductor", "cudagraphs"]  # how an experiment executes
MODES: tuple[CompileMode, ...] = get_args(CompileMode)


def compile_mode(value: str | None, where: Callable[[], Span]) -> CompileMode:
    """`compile=` as given (None: $IVX_COMPILE, else "auto"), checked; an unknown mode is an
    error at `where()` with the closest name."""
    mode = value or os.environ.get("IVX_COMPILE") or "auto"
    if mode not in MODES:
        raise InterventionError.at(where(), f"compile must be one of {', '.join(map(repr, MODES))}, got {mode!r}",
                                   did_you_mean(str(mode), MODES))
    return cast(CompileMode, mode)
