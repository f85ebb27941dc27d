"""`interp_dsl.list()`: nnsight's traceable list, for collecting values inside a trace."""

from __future__ import annotations

from typing import Any

from interp_dsl.proxy import Proxy


class SavedList(list):  # type: ignore[type-arg]
    """A list that may be appended to inside a trace: each proxy appended is saved, and after the
    trace the list holds the values. A proxy made in a generation step block (`tracer.all()`)
    stands for one value per step, so appending it once adds every step's value, in order."""

    def save(self) -> "SavedList":
        """Accepted for nnsight's `nnsight.list().save()`; the list is always kept."""
        return self

    def append(self, item: Any) -> None:
        if isinstance(item, Proxy) and item._live:
            item.save()
            item._tracer.saved_lists.append(self)
        super().append(item)

    def resolve(self) -> None:
        """Replace the proxies appended during the trace by their values (called by the tracer)."""
        items = list(self)
        self.clear()
        for item in items:
            if not isinstance(item, Proxy):
                super().append(item)
            elif item._missing:  # not computed (a generation that ended early): reading it says why
                super().append(item)
            elif item._steps is not None:
                self.extend(item.value)
            else:
                super().append(item.value)
