"""Site markers: identity ops that show, inside a captured graph, exactly where a site's value is.

A forward hook cannot be located in a graph from the outside (module boundaries in
`nn_module_stack` are ambiguous for `nn.Identity`, modules called twice and keyword inputs). So
each needed module gets a pre- and a post-hook that, while its site is *active*, passes every
tensor of the site's value through `ivx::site(x, site, leaf)`. Dynamo traces the hooks, and each
marker becomes exactly one graph node naming its site and its leaf in the value's pytree.

The hooks stay installed for the model's lifetime: dynamo guards on hook dictionaries, so
removing and re-adding them would recompile. When no site is active they return at once.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch.utils import _pytree as pytree

SiteKey = str  # "path/pre" or "path/post"


@torch.library.custom_op("ivx::site", mutates_args=())
def site(x: torch.Tensor, key: str, leaf: int) -> torch.Tensor:
    """Identity (a copy: a custom op may not return an alias of its input)."""
    return x.clone()


@site.register_fake
def _site_fake(x: torch.Tensor, key: str, leaf: int) -> torch.Tensor:
    return torch.empty_like(x)


SITE_OP = torch.ops.ivx.site.default


def site_key(path: str, phase: str) -> SiteKey:
    return f"{path}/{phase}"


def mark(value: Any, key: SiteKey) -> Any:
    """`value` with each tensor leaf wrapped in a marker; leaves are numbered in pytree order."""
    leaves, spec = pytree.tree_flatten(value)
    marked = [site(v, key, i) if isinstance(v, torch.Tensor) else v for i, v in enumerate(leaves)]
    return pytree.tree_unflatten(marked, spec)


class Markers:
    """The marker hooks of one model, and which sites are active now."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.active: frozenset[SiteKey] = frozenset()
        self._installed: set[SiteKey] = set()
        self._handles: list[Any] = []

    def install(self, keys: Iterable[SiteKey]) -> None:
        """Hook the modules of `keys` (once each; hooks are never removed while in use)."""
        for key in keys:
            if key in self._installed:
                continue
            path, phase = key.rsplit("/", 1)
            module = self.model.get_submodule(path)
            if phase == "pre":
                self._handles.append(module.register_forward_pre_hook(
                    lambda m, a, k, key=key: self._on_pre(key, a, k), with_kwargs=True))
            else:
                self._handles.append(module.register_forward_hook(
                    lambda m, a, k, o, key=key: self._on_post(key, o), with_kwargs=True))
            self._installed.add(key)

    def hook_ids(self) -> set[int]:
        """The ids of our hooks in the modules' hook dictionaries."""
        return {handle.id for handle in self._handles}

    def remove(self) -> None:
        """Take every marker hook off the model (compiled artefacts that used them recompile)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._installed.clear()

    @contextlib.contextmanager
    def activated(self, keys: frozenset[SiteKey]) -> Iterator[None]:
        """Mark the sites in `keys` for the duration of one compiled call."""
        before, self.active = self.active, keys
        try:
            yield
        finally:
            self.active = before

    def _on_pre(self, key: SiteKey, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if key not in self.active:
            return None
        return mark((tuple(args), dict(kwargs)), key)

    def _on_post(self, key: SiteKey, output: Any) -> Any:
        if key not in self.active:
            return None
        return mark(output, key)
