"""Sessions (nnsight's `model.session()`): several traces, in order, whose values stay available
to the traces after them without `.save()`.

Inside `with model.session() as session:`, each trace runs when its block ends, as anywhere else;
what it computed and you still hold (a Python name bound to a traced value) is kept, so a later
trace (on this model or another one) uses it as an input parameter of its own program. Python
code between traces runs in order with them (an optimizer step between training traces).
`session.exit()` ends the session early; the traces already run keep their results.
`model.session(remote=True)` runs its traces on `ivx serve`: each trace is a job, and a kept value
comes back with the job's saves and goes out again as a parameter of the traces that use it (the
server keeps nothing between jobs).

The open session is found through a context variable: it is the `with` block's, not the model's,
so traces of two models can share one session.
"""

from __future__ import annotations

import contextvars
from typing import TYPE_CHECKING, Any

from compiler.errors import InterventionError
from interp_dsl.conditions import hidden_save
from interp_dsl.spans import user_span

if TYPE_CHECKING:
    from interp_dsl.proxy import Proxy
    from interp_dsl.tracing import Tracer

_OPEN: contextvars.ContextVar["Session | None"] = contextvars.ContextVar("interp_dsl_session", default=None)


class SessionExit(Exception):
    """Raised by `session.exit()`; the session's `with` block ends there."""


class Session:
    """`with model.session():` traces whose unsaved values the traces after them may use."""

    def __init__(self, remote: Any = False):
        from interp_dsl.client import resolve
        self.remote = resolve(remote)  # the server the session's traces run on
        self._token: contextvars.Token[Session | None] | None = None

    def __enter__(self) -> "Session":
        if _OPEN.get() is not None:
            raise InterventionError.at(user_span(), "a session is already open", "sessions do not nest")
        self._token = _OPEN.set(self)
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> bool:
        if self._token is not None:
            _OPEN.reset(self._token)
            self._token = None
        return exc_type is SessionExit

    def exit(self) -> None:
        """End the session here: nothing after this line in its block runs."""
        raise SessionExit()

    def log(self, *values: Any) -> None:
        """Print values (traced values of finished traces print as their tensors)."""
        from interp_dsl.proxy import _unwrap
        print(*(_unwrap(v) for v in values))

    # ------------------------------------------------------------------- used by the tracer
    def keep(self, tracer: "Tracer", alive: list["Proxy"]) -> None:
        """Before a trace runs: save the values the user still holds (under hidden names), for the
        traces after it."""
        for proxy in alive:
            if not proxy._saved and proxy._steps is None:
                hidden_save(tracer, proxy)


def current_session() -> Session | None:
    """The session open in this context, if any."""
    return _OPEN.get()
