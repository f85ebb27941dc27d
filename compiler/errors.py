"""Errors a user can cause: each names the user's own line, what was expected and found, a hint."""

from __future__ import annotations

import difflib
import linecache
from collections.abc import Iterable
from dataclasses import dataclass

from compiler.ir import NO_SPAN, Span


@dataclass(frozen=True)
class Diagnostic:
    span: Span
    message: str
    hint: str = ""
    severity: str = "error"

    def render(self) -> str:
        lines = [f"{self.span}: {self.severity}: {self.message}"]
        source = linecache.getline(self.span.file, self.span.line).rstrip("\n") if self._quotable() else ""
        if source.strip():
            lines.append(f"    {source}")
            if self.span.col:
                start = self.span.col - 1
                end = self.span.end_col - 1 if self.span.end_line == self.span.line else len(source)
                lines.append("    " + " " * start + "^" * max(1, end - start))
        if self.hint:
            lines.append(f"  hint: {self.hint}")
        return "\n".join(lines)


    def _quotable(self) -> bool:
        """Only experiment sources are quoted: a span from a payload may name any file."""
        return bool(self.span.line) and self.span.file.endswith((".ivx", ".py", ".md"))


class InterventionError(Exception):
    """Base class of every error interp_dsl reports about the user's experiment."""

    def __init__(self, diagnostics: Iterable[Diagnostic]):
        self.diagnostics = sorted(diagnostics, key=lambda d: (d.span.file, d.span.line, d.span.col))
        super().__init__("\n".join(d.render() for d in self.diagnostics))

    @classmethod
    def at(cls, span: Span, message: str, hint: str = "") -> "InterventionError":
        return cls([Diagnostic(span, message, hint)])


class UnknownModuleError(InterventionError, AttributeError):
    """A module path that does not exist in the model."""


class ProxyControlFlowError(InterventionError, TypeError):
    """A traced value was used where Python needs a concrete value (if, while, int(), ...)."""


class UnsupportedOperationError(InterventionError, TypeError):
    """An operation outside the IR's whitelist."""


class CheckError(InterventionError):
    """The experiment does not fit the model's shapes, or cannot be scheduled; nothing ran."""


class ExecutionError(InterventionError, RuntimeError):
    """An op failed while the model ran."""


class ValueUnavailableError(InterventionError, ValueError):
    """A value that was not saved, or not computed because the run stopped before it."""


def did_you_mean(name: str, candidates: Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.6)
    return f"did you mean {close[0]!r}?" if close else ""


__all__ = [
    "NO_SPAN", "CheckError", "Diagnostic", "ExecutionError", "InterventionError",
    "ProxyControlFlowError", "UnknownModuleError", "UnsupportedOperationError",
    "ValueUnavailableError", "did_you_mean",
]
