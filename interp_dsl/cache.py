"""`tracer.cache()`: every module's output (or a chosen set), as nnsight's cache returns it.

A cache is a save of many sites: each module's `.output` (and `.inputs` with `include_inputs`) is an
ordinary save in the IR, named `cache_<n>_output`, so it is checked, scheduled and compiled like any
other. After the trace, `cache["model.model.layers.0"].output` and `cache.model.model.layers[0].output`
read the values (module paths as nnsight writes them: the root is `model`).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import torch

from compiler.errors import InterventionError, did_you_mean
from compiler.shape_rules import is_tensor_like
from interp_dsl.spans import user_span

if TYPE_CHECKING:
    from interp_dsl.proxy import Proxy
    from interp_dsl.tracing import Tracer

ROOT = "model"  # how nnsight names the wrapped module in cache keys


class Entry:
    """One module's cached values: `.output`, `.inputs` (`((args...), {kwargs})`) and `.input`
    (the first argument); None where the cache did not keep it."""

    def __init__(self, output: "Proxy | None", inputs: "Proxy | None", convert: Any):
        self._output, self._inputs, self._convert = output, inputs, convert

    @property
    def output(self) -> Any:
        return None if self._output is None else self._convert(self._output.value)

    @property
    def inputs(self) -> Any:
        return None if self._inputs is None else self._convert(self._inputs.value)

    @property
    def input(self) -> Any:
        inputs = self.inputs
        if inputs is None:
            return None
        args, kwargs = inputs
        return [*args, *kwargs.values()][0]


class Cache(dict):
    """Module path -> `Entry`, in forward order; also walked by attribute and index:
    `cache.model.model.layers[0].mlp.output`."""

    def __getattr__(self, name: str) -> "_Node":
        if name.startswith("_"):
            raise AttributeError(name)
        return _Node(self, "")[name]

    def _node(self, path: str) -> "_Node | Entry":
        if any(key.startswith(path + ".") for key in self):
            return _Node(self, path)
        if path in self:
            return self[path]
        raise AttributeError(f"{path!r} was not cached" +
                             (f"; {hint}" if (hint := did_you_mean(path, list(self))) else ""))


class _Node:
    """A point in the module tree of a cache: its children, and its own entry's values."""

    def __init__(self, cache: Cache, path: str):
        self._cache, self._path = cache, path

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        return self[name]

    def __getitem__(self, key: str | int) -> Any:
        if isinstance(key, int) and key < 0:  # from the end of a module list, as the model's own indexing
            prefix = f"{self._path}."
            indices = {int(part) for k in self._cache if k.startswith(prefix)
                       if (part := k[len(prefix):].split(".")[0]).isdigit()}
            key += max(indices, default=-1) + 1
        return self._cache._node(f"{self._path}.{key}" if self._path else str(key))

    def _entry(self) -> Entry:
        if self._path not in self._cache:
            raise AttributeError(f"{self._path!r} was not cached itself, only modules inside it")
        return self._cache[self._path]

    @property
    def output(self) -> Any:
        return self._entry().output

    @property
    def inputs(self) -> Any:
        return self._entry().inputs

    @property
    def input(self) -> Any:
        return self._entry().input


def record_cache(tracer: "Tracer", modules: Iterable[Any] | None, device: Any, dtype: torch.dtype | None,
                 detach: bool, include_output: bool, include_inputs: bool, prefix: str | None = None) -> Cache:
    """Save the chosen modules' values (every module the forward calls, by default) in `tracer`'s
    current invoke; the returned cache reads them after the trace. With `prefix` (an `.ivx` cache)
    the saves are named by the module path, parts joined by `__` (`acts__model__layers__0` for
    `model.model.layers[0].output`; `...__inputs` for its inputs)."""
    table = tracer.engine.site_table(tracer.batch(), tracer.generation)
    called = list(dict.fromkeys(event.rpartition("/")[0] for event in table.calls))  # "path/pre", "path/post"
    paths = called if modules is None else [p for m in modules for p in _paths_of(m, called)]
    if prefix is not None:  # an `.ivx` cache keeps tensors (results are tensors with a row per prompt)
        tensors = [p for p in paths if is_tensor_like(table.values.get((p, "post", 0)))]
        other = next((p for p in paths if p not in tensors), None)
        if modules is not None and other is not None:
            raise InterventionError.at(user_span(), f"cache keeps tensors, and {ROOT}.{other}'s output is a "
                                       f"{type(table.values.get((other, 'post', 0))).__name__}",
                                       "cache modules whose output is a tensor, or save the part you want")
        paths = tensors

    def convert(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            value = value.detach() if detach else value
            return value.to(device=device, dtype=dtype) if device is not None or dtype is not None else value
        if isinstance(value, (tuple, list)):
            return type(value)(convert(v) for v in value)
        if isinstance(value, dict):
            return {k: convert(v) for k, v in value.items()}
        return value

    cache = Cache()
    for path in paths:
        key, kept = f"{ROOT}.{path}" if path else ROOT, {}
        for kind, wanted in (("output", include_output), ("inputs", include_inputs)):
            if wanted:
                proxy = tracer.read(tracer.site(path, kind))
                name = f"cache_{len(tracer._saved)}_{kind}" if prefix is None else \
                    "__".join([prefix, *(path.split(".") if path else []), *(["inputs"] if kind == "inputs" else [])])
                tracer.save(proxy, name)
                kept[kind] = proxy
        cache[key] = Entry(kept.get("output"), kept.get("inputs"), convert)
    return cache


def _paths_of(module: Any, called: list[str]) -> list[str]:
    """A module of `modules=`: an envoy (`model.model.layers[0]`) or its path as nnsight writes it;
    a module list the forward never calls itself (`model.model.layers`) stands for its modules."""
    path = getattr(module, "_path", None)
    if path is None:
        if not isinstance(module, str):
            raise InterventionError.at(user_span(), f"cache(modules=...) takes modules or their paths, "
                                       f"not a {type(module).__name__}")
        path = module.removeprefix(ROOT).removeprefix(".") if module == ROOT or module.startswith(ROOT + ".") \
            else module
    items = [p for p in called if p.startswith(f"{path}.") and p[len(path) + 1:].isdigit()] if path else []
    if path not in called and items:
        return items
    if path not in called:
        shown = f"{ROOT}.{path}" if path else ROOT
        raise InterventionError.at(user_span(), f"cache: the forward never calls {shown}",
                                   did_you_mean(shown, [f"{ROOT}.{p}" if p else ROOT for p in called]) or
                                   "name modules the forward calls")
    return [path]
