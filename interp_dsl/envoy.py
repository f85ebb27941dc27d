"""Envoy: a module of the wrapped model, addressed by attribute access and validated when written."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch

from compiler.errors import InterventionError, UnknownModuleError, did_you_mean
from compiler.ir import SITE_KINDS
from interp_dsl import fan
from interp_dsl.proxy import Proxy
from interp_dsl.spans import user_span

if TYPE_CHECKING:
    from interp_dsl.models import Model



class Envoy:
    """Stands for one submodule. Inside a trace `.output`, `.input` and `.inputs` are proxies of
    its values, assignable to intervene; calling it records an ad-hoc module call."""

    def __init__(self, model: "Model", module: torch.nn.Module, path: str, display: str):
        object.__setattr__(self, "_model", model)
        object.__setattr__(self, "_module", module)
        object.__setattr__(self, "_path", path)
        object.__setattr__(self, "_display", display)
        object.__setattr__(self, "_children", {})

    # ---------------------------------------------------------------------------- navigation
    def _child(self, name: str, display: str) -> "Envoy":
        if name not in self._children:
            module = self._module._modules[name]
            path = self._model._paths.get(id(module), f"{self._path}.{name}".lstrip("."))
            self._children[name] = Envoy(self._model, module, path, display)
        return self._children[name]

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        module = self._module
        if name in module._modules:
            return self._child(name, f"{self._display}.{name}")
        tracer = self._model._tracer
        if name in module._parameters or name in module._buffers:
            if tracer is not None and tracer.recording:
                return tracer.weight(f"{self._path}.{name}".lstrip("."))
            return getattr(module, name)
        if hasattr(module, name):
            return getattr(module, name)
        candidates = [*module._modules, *module._parameters, *SITE_KINDS]
        hint = did_you_mean(name, candidates)
        subs = ", ".join(list(module._modules)[:8])
        raise UnknownModuleError.at(
            user_span(),
            f"{self._display} ({type(module).__name__}) has no submodule or attribute {name!r}",
            hint or (f"its submodules are: {subs}" if subs else "it has no submodules"))

    def __getitem__(self, index: int) -> "Envoy":
        if isinstance(index, fan.Fanned):  # a vectorised sweep axis: one module per point
            return fan.apply(self.__getitem__, index)
        names = list(self._module._modules)
        if not names or not isinstance(index, int):
            raise UnknownModuleError.at(
                user_span(), f"{self._display} ({type(self._module).__name__}) cannot be indexed "
                f"with {index!r}", "index a ModuleList or Sequential with an int")
        if not -len(names) <= index < len(names):
            raise UnknownModuleError.at(
                user_span(), f"{self._display} has {len(names)} modules; index {index} is out of "
                "range", f"use 0..{len(names) - 1} or a negative index")
        name = names[index]
        return self._child(name, f"{self._display}[{name}]")

    def __len__(self) -> int:
        return len(self._module._modules)

    def __iter__(self) -> Iterator["Envoy"]:
        return (self[i] for i in range(len(self)))

    def __repr__(self) -> str:
        return repr(self._module)

    # ------------------------------------------------------------------------------- sites
    def _tracer_for(self, what: str) -> Any:
        tracer = self._model._tracer
        if tracer is None or not tracer.recording:
            raise InterventionError.at(
                user_span(), f"{self._display}.{what} exists only inside `with model.trace(...)`")
        return tracer

    def _read(self, kind: str) -> Proxy:
        tracer = self._tracer_for(kind)
        return tracer.read(tracer.site(self._path, kind))

    def _write(self, kind: str, value: Any) -> None:
        tracer = self._tracer_for(kind)
        tracer.write(tracer.site(self._path, kind), (), value)

    @property
    def output(self) -> Proxy:
        """The module's return value (this call of it)."""
        return self._read("output")

    @output.setter
    def output(self, value: Any) -> None:
        self._write("output", value)

    @property
    def input(self) -> Proxy:
        """The module's first argument (positional, else the first keyword argument)."""
        return self._read("input")

    @input.setter
    def input(self, value: Any) -> None:
        self._write("input", value)

    @property
    def inputs(self) -> Proxy:
        """All arguments: `((args...), {kwargs})`."""
        return self._read("inputs")

    @inputs.setter
    def inputs(self, value: Any) -> None:
        self._write("inputs", value)

    def __setattr__(self, name: str, value: Any) -> None:
        if name in SITE_KINDS:
            object.__setattr__(self, name, value)  # routed to the property setter
            return
        raise UnknownModuleError.at(
            user_span(), f"cannot set {name!r} on {self._display}",
            did_you_mean(name, SITE_KINDS) or "assign to .output, .input or .inputs")

    def next(self, steps: int = 1) -> "Envoy":
        """Refer to the module's next call in this trace (a module called more than once)."""
        tracer = self._tracer_for("next()")
        tracer.call_index[self._path] = tracer.call_index.get(self._path, 0) + steps
        return self

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        tracer = self._model._tracer
        if tracer is not None and tracer.recording:
            return tracer.module_call(self._path, args, kwargs)
        return self._module(*args, **kwargs)
