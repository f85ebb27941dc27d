"""The `with model.trace(...)` context: records IR, then checks and runs it on leaving the block."""

from __future__ import annotations

import dataclasses
import re
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from compiler.check import IncrementalTyper, type_of
from compiler.errors import InterventionError, UnsupportedOperationError
from compiler.ir import (
    Arg,
    Const,
    DTypeArg,
    EllipsisArg,
    Generation,
    ListArg,
    Op,
    Program,
    Ref,
    Site,
    SliceArg,
    Span,
    TupleArg,
)
from compiler.passes import copied, drop_dead_reads
from compiler.signatures import GENERATOR
from interp_dsl import fan
from interp_dsl.conditions import (
    HIDDEN,
    CondBlock,
    Condition,
    LogLine,
    condition_of,
    hide,
    holds,
    keep_condition,
    log,
    print_logs,
    selected,
    why_missing,
)
from interp_dsl.edits import Edit, edit_ops, edit_params
from interp_dsl.proxy import Proxy
from interp_dsl.session import current_session
from interp_dsl.spans import user_span
from runtime.engine import Engine
from runtime.interpreter import Batch, RunResult
from runtime.sweep_runner import InvokeInput


@dataclass
class Target:
    """What a trace runs on: an engine, how a trace's invokes become one batch for it, and the
    trace now open on it (module access inside a `with` block records there)."""

    engine: Engine
    batch: Callable[[list[InvokeInput]], Batch]
    open: Tracer | None = None


class Invoker:
    """One input of a batched trace: `with tracer.invoke(prompt):` scopes module access to it."""

    def __init__(self, tracer: "Tracer", index: int):
        self.tracer, self.index = tracer, index
        self._outer: int | None = None

    def __enter__(self) -> "Invoker":
        self._outer = self.tracer.current_invoke
        self.tracer.current_invoke = self.index
        return self

    def __exit__(self, *exc: Any) -> None:
        self.tracer.current_invoke = self._outer


ENDED_EARLY = ("this value was not computed: the generation ended before its step (every row had produced "
               "the end-of-sequence token, or a stop)")


class StepBlock:
    """`with tracer.all():` / `with tracer.iter[...]:`: what the body records applies at each step."""

    def __init__(self, tracer: "Tracer", steps: list[int]):
        self.tracer, self.steps = tracer, steps
        self.start = self.first_proxy = 0

    def __enter__(self) -> "StepBlock":
        tracer = self.tracer
        if tracer._block is not None:
            raise InterventionError.at(user_span(), "step blocks do not nest",
                                       "use one `with tracer.iter[...]:` with the steps you want")
        self.start, self.first_proxy = len(tracer.ops), len(tracer._proxies)
        tracer._block, tracer.step = self, self.steps[0]
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> bool:
        tracer = self.tracer
        tracer._block, tracer.step = None, 0
        if exc_type is None:
            tracer._unroll(self)
        return False

    def __iter__(self) -> Iterator[int]:
        """`for step in tracer.iter[...]:` (nnsight 0.5+): Python runs the body once per step, and
        module values in it refer to that step; a save there is made at that step."""
        tracer = self.tracer
        if tracer._block is not None:
            raise InterventionError.at(user_span(), "step blocks do not nest",
                                       "use one `tracer.iter[...]` with the steps you want")
        tracer._block = self
        try:
            for step in self.steps:
                tracer.step = tracer._loop_step = step
                yield step
        finally:
            tracer._block, tracer.step, tracer._loop_step = None, 0, None


class BackwardBlock:
    """What `metric.backward()` returns: used as `with metric.backward():`, the `.grad`s read or
    written in the body belong to this backward pass (nnsight 0.8); called plainly, the `.grad`s
    recorded before it do (the older spelling)."""

    def __init__(self, tracer: "Tracer", number: int):
        self.tracer, self.number = tracer, number
        self._outer: int | None = None

    def __enter__(self) -> "BackwardBlock":
        self._outer, self.tracer.open_backward = self.tracer.open_backward, self.number
        return self

    def __exit__(self, *exc: Any) -> None:
        self.tracer.open_backward = self._outer


class StepSelector:
    """`tracer.iter[...]`: steps by slice, int or list, checked against `max_new_tokens`."""

    def __init__(self, tracer: "Tracer"):
        self.tracer = tracer

    def __getitem__(self, key: int | slice | list[int]) -> StepBlock:
        n = self.tracer.generation.max_new_tokens  # type: ignore[union-attr]
        if isinstance(key, slice):
            steps = list(range(n))[key]
        elif isinstance(key, int) and not isinstance(key, bool):
            if not -n <= key < n:
                raise InterventionError.at(user_span(), f"step {key} does not exist: this generation "
                                           f"has {n} steps", f"use 0..{n - 1} (0 is the prompt pass)")
            steps = [key % n]
        elif isinstance(key, (list, tuple)) and all(isinstance(k, int) for k in key):
            bad = [k for k in key if not 0 <= k < n]
            if bad:
                raise InterventionError.at(user_span(), f"step {bad[0]} does not exist: this generation "
                                           f"has {n} steps", f"use 0..{n - 1} (0 is the prompt pass)")
            steps = sorted(set(key))
        else:
            raise InterventionError.at(user_span(), f"tracer.iter takes a slice, an int or a list of "
                                       f"steps, not {type(key).__name__}")
        if not steps:
            raise InterventionError.at(user_span(), f"tracer.iter[{_show(key)}] selects no step of {n}",
                                       f"steps run from 0 to {n - 1}")
        return StepBlock(self.tracer, steps)


def _refuse_save_name(name: Any, span: Span) -> None:
    """A save's name is an identifier: results and files are keyed by it, and a step's or a
    sweep point's saves are told apart by the save, not by its name."""
    if isinstance(name, str) and name.isidentifier():
        return
    if not isinstance(name, str):
        raise InterventionError.at(span, f"a save's name is a string, not a {type(name).__name__}",
                                   "write .save(\"name\") or .save()")
    fixed = re.sub(r"\W", "_", name)
    fixed = fixed if fixed.isidentifier() else f"s_{fixed}"
    raise InterventionError.at(
        span, f"the save name {name!r} is not an identifier",
        f"use letters, digits and _, not starting with a digit, e.g. {fixed!r}; a save in a step loop or a "
        "sweep is told apart by its step and point, not by its name")


def _show(key: Any) -> str:
    if isinstance(key, slice):
        return ":".join("" if v is None else str(v) for v in (key.start, key.stop)) + \
            ("" if key.step is None else f":{key.step}")
    return repr(key)


class Tracer:
    """Records an experiment as IR; on exit, checks it on fake tensors and runs it.

    Created by `model.trace(...)` or `model.scan(...)`; state lives on this object and on its
    target, never in module globals. On exit it hands the recorded program to the target's engine.
    """

    def __init__(self, target: Target, inputs: InvokeInput | None, execute: bool = True, compile: str = "off",
                 edits: tuple[Edit, ...] = ()):
        self.target = target
        self.edits = edits  # the persistent edits of the model traced: their ops begin the program
        self.execute = execute
        self.compile = compile
        self.ops: list[Op] = []
        self._next_id = 0
        self.params: dict[str, Any] = edit_params(edits)  # keeps the tensors alive, so their ids stay unique
        self._tensor_params: dict[int, int] = {}
        self.invoke_inputs: list[InvokeInput] = []
        self.current_invoke: int | None = None
        self.recording = False
        self.call_index: dict[str, int] = {}
        self._saved: list[Proxy] = []
        self._named_saves = 0  # saves of the user's (not the hidden ones): the default names count them
        self._proxies: list[weakref.ref[Proxy]] = []  # values the user may still hold
        self.session = current_session()  # an open `model.session()`: unsaved values stay available
        self._typer: IncrementalTyper | None = None
        self._batch: Batch | None = None
        self.span_source = user_span  # where ops say they come from; the .ivx lowering replaces it
        self.fan: fan.FanState | None = None  # a sweep's vectorised axes, attached by the sweep
        self.generation: Generation | None = None  # set by model.generate(...)
        self.step = 0  # the generation step module values refer to (the first of an open step block)
        self._block: StepBlock | None = None
        self.saved_lists: list[Any] = []  # interp_dsl.list()s appended to in this trace
        self._loop_step: int | None = None  # inside `for step in tracer.iter[...]`: that step
        self._result: RunResult | None = None
        self.remote: Any = None  # an interp_dsl.client.Remote: the program runs on that server
        self.conditions: list[Condition] = []  # the open `tracer.cond` blocks' conditions, and-ed
        self.conditional_saves: dict[str, str | bool] = {}  # save name -> its kept condition
        self.logs: list[LogLine] = []  # tracer.log(...) calls, printed after the run
        self.backward_passes = 0  # backward() calls recorded so far
        self.open_backward: int | None = None  # the pass of the `with metric.backward():` block open
        if inputs is not None:
            self.current_invoke = self._add_invoke(inputs)
        self.invoker = Invoker(self, 0) if inputs is not None else None

    # ---------------------------------------------------------------------------- contexts
    def __enter__(self) -> "Tracer":
        if self.target.open is not None:
            raise InterventionError.at(user_span(), "a trace of this model is already open",
                                       "finish it first; traces of one model do not nest")
        self.target.open = self
        self.recording = True
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> bool:
        self.recording = False
        try:
            if exc_type is None:
                self._finish()
        finally:
            if self.target.open is self:
                self.target.open = None
        return False

    def invoke(self, *args: Any, **kwargs: Any) -> Invoker:
        """A new batch slice with its own input; module values inside refer to it."""
        if not self.recording:
            raise InterventionError.at(user_span(), "tracer.invoke() is used inside its trace")
        return Invoker(self, self._add_invoke((args, kwargs)))

    def _add_invoke(self, inputs: InvokeInput) -> int:
        try:
            self.target.batch([inputs])  # a bad input is an error here, where it is given
        except InterventionError as e:
            span = self.span_source()
            raise type(e)([dataclasses.replace(d, span=span) for d in e.diagnostics]) from None
        self.invoke_inputs.append(inputs)
        self.inputs_changed()
        return len(self.invoke_inputs) - 1

    def inputs_changed(self) -> None:
        """An invoke's inputs changed (added, or expanded by a sweep axis)."""
        self._batch = self._typer = None  # the padded batch changed: types must be recomputed

    def cache(self, modules: Any = None, device: Any = None, dtype: torch.dtype | None = None,
              detach: bool = True, include_output: bool = True, include_inputs: bool = False) -> Any:
        """nnsight's `tracer.cache()`: save every module's output in this invoke (or those of
        `modules`: envoys or paths like "model.model.layers.0"); after the trace the returned
        cache maps each path to its `.output` (and `.inputs` / `.input` with `include_inputs`),
        also walked as `cache.model.model.layers[0].output`. `device` / `dtype` convert the values."""
        from interp_dsl.cache import record_cache
        return record_cache(self, modules, device, dtype, detach, include_output, include_inputs)

    def cond(self, condition: Any) -> CondBlock:
        """`with tracer.cond(c):` writes in the block apply where `c` holds (a select), and saves
        are kept only when it holds. See interp_dsl/conditions.py."""
        return CondBlock(self, condition_of(condition))

    def log(self, *values: Any) -> None:
        """Print `values` once the trace has run (traced values as their tensors); inside
        `tracer.cond` only when its condition holds."""
        log(self, values)

    def barrier(self, participants: int) -> Any:
        """nnsight's cross-invoke barrier. Accepted and a no-op: the scheduler already orders
        every read before the writes that use it."""
        return lambda: None

    # ------------------------------------------------------------------------- generation
    def all(self) -> "StepBlock":
        """`with tracer.all():` the body applies at every generation step."""
        return self.iter[:]

    @property
    def iter(self) -> "StepSelector":
        """`with tracer.iter[a:b]:` the body applies at the chosen generation steps (a slice, an
        int or a list of steps; step 0 is the prompt pass)."""
        if self.generation is None:
            raise InterventionError.at(user_span(), "tracer.iter and tracer.all() are for generation",
                                       "use `with model.generate(prompt, max_new_tokens=N) as tracer:`")
        return StepSelector(self)

    @property
    def result(self) -> Any:
        """Inside the trace, the traced call's return value as a proxy (nnsight's `tracer.result`):
        a generation's ids (`model.generator.output`), else the model's output. After the trace,
        the run's `RunResult` (`.saves`, `.output`)."""
        if self.recording:
            return self.read(self.site(GENERATOR if self.generation is not None else "", "output"))
        if self._result is None:
            raise InterventionError.at(user_span(), "this trace has not run", "leave its `with` block first")
        return self._result

    def _calls_per_step(self, path: str, phase: str) -> int:
        return self.typer().table.calls_per_step.get(f"{path}/{phase}", 0)

    def _unroll(self, block: "StepBlock") -> None:
        """Repeat the ops recorded in a step block for its other steps: each copy refers to its own
        step's sites (call indices shifted by whole steps) and its own values; params and weights
        are shared. A proxy made in the block then stands for one value per step."""
        body, proxies = self.ops[block.start:], self._alive(block.first_proxy)
        per_step: dict[int, list[int]] = {op.result: [op.result] for op in body
                                          if op.result is not None and op.opcode not in ("param", "weight")}
        first = block.steps[0]
        for step in block.steps[1:]:
            ids: dict[int, int] = {}
            for op in body:
                if op.opcode in ("param", "weight"):
                    continue
                site = op.site
                if site is not None:
                    shift = (step - first) * self._calls_per_step(site.module, site.phase)
                    site = dataclasses.replace(site, call=site.call + shift)
                result = None
                if op.result is not None:
                    result = ids[op.result] = self._next_id
                    self._next_id += 1
                    per_step[op.result].append(result)
                self.ops.append(copied(op, ids, result, site=site, step=step if op.opcode == "save" else None))
        for index in range(block.start, block.start + len(body)):  # the first step's saves too
            if self.ops[index].opcode == "save":
                self.ops[index] = dataclasses.replace(self.ops[index], step=first)
        for proxy in proxies:
            if proxy._id in per_step:
                object.__setattr__(proxy, "_steps", per_step[proxy._id])

    def stop(self, at: Proxy | None = None) -> None:
        """End the forward once everything requested so far has run."""
        self._emit("stop", args=(Ref(at._id),) if at is not None else ())

    # ------------------------------------------------------------------------------ recording
    def _emit(self, opcode: str, has_result: bool = False, **fields: Any) -> int | None:
        result = self._next_id if has_result else None
        self._next_id += has_result
        self.ops.append(Op(opcode, result=result, span=self.span_source(), **fields))
        return result

    def _proxy(self, id: int, origin: tuple[Site, tuple[Arg, ...]] | None = None) -> Proxy:
        proxy = Proxy(self, id, origin)
        self._proxies.append(weakref.ref(proxy))
        return proxy

    def encode(self, obj: Any) -> Arg:
        """A Python value as an IR argument; tensors and floats become params."""
        if isinstance(obj, Proxy):
            if obj._tracer is not self:
                if not obj._live:
                    return self.encode(obj.value)
                raise InterventionError.at(user_span(), "a value from another trace is used here",
                                           "save it there and use the saved value")
            return Ref(obj._id)
        if isinstance(obj, torch.Tensor) and id(obj) in self._tensor_params:
            return Ref(self._tensor_params[id(obj)])  # one tensor object, one parameter
        if isinstance(obj, (torch.Tensor, float)):
            name = f"p{len(self.params)}"
            self.params[name] = obj
            ref = self._emit("param", True, target=name, type=type_of(obj))
            if isinstance(obj, torch.Tensor):
                self._tensor_params[id(obj)] = ref  # type: ignore[assignment]
            return Ref(ref)  # type: ignore[arg-type]
        if obj is None or isinstance(obj, (bool, int, str)):
            return Const(obj)
        if isinstance(obj, slice):
            return SliceArg(self.encode(obj.start), self.encode(obj.stop), self.encode(obj.step))
        if obj is Ellipsis:
            return EllipsisArg()
        if isinstance(obj, tuple):  # torch.Size included
            return TupleArg(tuple(self.encode(x) for x in obj))
        if isinstance(obj, list):
            return ListArg(tuple(self.encode(x) for x in obj))
        if isinstance(obj, torch.dtype):
            return DTypeArg(str(obj).removeprefix("torch."))
        raise UnsupportedOperationError.at(
            user_span(), f"a {type(obj).__name__} cannot be used in a trace",
            "use tensors, numbers, strings, slices, tuples and lists")

    def call(self, name: str, args: tuple[Any, ...], kwargs: dict[str, Any],
             origin_of: tuple[Proxy, Any] | None = None) -> Any:
        if fan.contains((args, kwargs)):
            return fan.apply(lambda *a, **k: self.call(name, a, k, (a[0], a[1]) if origin_of else None),
                             *args, **kwargs)
        encoded = tuple(self.encode(a) for a in args)
        enc_kwargs = tuple((k, self.encode(v)) for k, v in kwargs.items())
        id = self._emit("call", True, target=name, args=encoded, kwargs=enc_kwargs)
        origin = None
        if origin_of is not None and origin_of[0]._origin is not None:
            site, path = origin_of[0]._origin
            origin = (site, (*path, encoded[1]))
        return self._proxy(id, origin)  # type: ignore[arg-type]

    def read(self, site: Site) -> Proxy:
        id = self._emit("read", True, site=site)
        return self._proxy(id, (site, ()))  # type: ignore[arg-type]

    def reread(self, origin: tuple[Site, tuple[Arg, ...]]) -> Proxy:
        """The value at `origin` after a write: read the site again and index down the path."""
        site, path = origin
        proxy = self.read(site)
        for step in path:
            id = self._emit("call", True, target="getitem", args=(Ref(proxy._id), step))
            proxy = self._proxy(id, (site, (*proxy._origin[1], step)))  # type: ignore[index,arg-type]
        return proxy

    def write(self, site: Site, path: tuple[Arg, ...], value: Any) -> None:
        if self.conditions:
            value = selected(self, value, self.reread((site, path)))
            if value is None:
                return
        if fan.contains(value):
            fan.apply(lambda v: self.write(site, path, v), value)
        elif self.fan is not None and self.fan.point:
            self.fan.write(self, site, path, value)
        else:
            self.emit_write(site, path, value)

    def emit_write(self, site: Site, path: tuple[Arg, ...], value: Any) -> None:
        self._emit("write", site=site, path=path, args=(self.encode(value),))

    def named_param(self, name: str, value: Any) -> Proxy:
        """A parameter bound by name at run time (a sweep axis); `value` gives its type."""
        self.params[name] = value
        return self._proxy(self._emit("param", True, target=name, type=type_of(value)))  # type: ignore[arg-type]

    def module_call(self, path: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if fan.contains((args, kwargs)):
            return fan.apply(lambda *a, **k: self.module_call(path, a, k), *args, **kwargs)
        encoded = tuple(self.encode(a) for a in args)
        enc_kwargs = tuple((k, self.encode(v)) for k, v in kwargs.items())
        return self._proxy(self._emit("module", True, target=path, args=encoded, kwargs=enc_kwargs))  # type: ignore

    # ------------------------------------------------------------------------------ gradients
    def backward(self, metric: Proxy, gradient: Any = None) -> BackwardBlock:
        """Back-propagate from `metric` (a scalar) once the forward has ended."""
        if gradient is not None:
            raise UnsupportedOperationError.at(
                user_span(), "backward(gradient=...) is not supported: differentiate a scalar",
                "reduce the value first, e.g. (value * weights).sum().backward()")
        self._emit("backward", args=(self.encode(metric),))
        self.backward_passes += 1
        return BackwardBlock(self, self.backward_passes - 1)

    def grad(self, proxy: Proxy) -> Proxy:
        """`proxy.grad`: the gradient of a module's value in the open backward block's pass, or
        (outside one) in the next backward()."""
        if proxy._grad_of is not None:
            raise UnsupportedOperationError.at(user_span(), "`.grad` of a gradient: second derivatives "
                                               "are not supported")
        if proxy._origin is None:
            raise UnsupportedOperationError.at(
                user_span(), "`.grad` is taken of a module's value (.output, .input, .inputs, or an "
                "index of one), not of a value computed in the experiment",
                "take the gradient of the module's value and compute from it")
        site, path = proxy._origin
        number = self.backward_passes if self.open_backward is None else self.open_backward
        return self.grad_at(site, path, number)

    def grad_at(self, site: Site, path: tuple[Arg, ...], number: int) -> Proxy:
        proxy = self._proxy(self._emit("grad", True, site=site, path=path, args=(Const(number),)))  # type: ignore[arg-type]
        object.__setattr__(proxy, "_grad_of", (site, path, number))
        return proxy

    def set_grad_of(self, proxy: Proxy, value: Any) -> None:
        """`proxy.grad = value`."""
        gradient = self.grad(proxy)
        site, path, number = gradient._grad_of  # type: ignore[misc]
        self.set_grad(site, path, number, value)

    def set_grad(self, site: Site, path: tuple[Arg, ...], number: int, value: Any) -> None:
        if fan.contains(value) or (self.fan is not None and self.fan.point):
            raise UnsupportedOperationError.at(
                user_span(), "a gradient write that depends on a vectorised (integer) sweep axis is "
                "not supported", "write the gradient at fixed sites, or sweep a float parameter")
        if self.conditions:
            value = selected(self, value, self.grad_at(site, path, number))
            if value is None:
                return
        self._emit("setgrad", site=site, path=path, args=(Const(number), self.encode(value)))

    def weight(self, path: str) -> Proxy:
        return self._proxy(self._emit("weight", True, target=path))  # type: ignore[arg-type]

    def save(self, proxy: Proxy, name: str | None = None) -> None:
        """Keep `proxy`'s value as `name`, at the step of a `for step in tracer.iter[...]` loop and
        the point of the vectorised sweep axes a fanned save is being made at."""
        if name is None:
            name = proxy._save_name or f"save{self._named_saves}"
        _refuse_save_name(name, self.span_source())
        if not name.startswith(HIDDEN):
            self._named_saves += 1
            if self.conditions:
                self.conditional_saves[name] = keep_condition(self)
        object.__setattr__(proxy, "_saved", True)
        object.__setattr__(proxy, "_save_name", name)
        self._saved.append(proxy)
        self._emit("save", target=name, args=(Ref(proxy._id),), step=self._loop_step,
                   point=tuple(self.fan.point.items()) if self.fan is not None else ())

    def site(self, module_path: str, kind: str) -> Site:
        if self.current_invoke is None:
            raise InterventionError.at(
                user_span(), f".{kind} is used outside an invoke",
                "pass an input to model.trace(...) or read it inside `with tracer.invoke(...):`")
        call = self.call_index.get(module_path, 0)
        if self.step:
            call += self.step * self._calls_per_step(module_path, "post" if kind == "output" else "pre")
        return Site(module_path, kind, call, self.current_invoke)

    # ------------------------------------------------------------------------------- results
    def program(self) -> Program:
        """The experiment recorded so far, as IR."""
        return self._program()[0]

    def _program(self) -> tuple[Program, dict[int, int]]:
        n_invokes = max(1, len(self.invoke_inputs))
        ops = tuple(self.ops)
        if self.edits:
            steps = self.generation.max_new_tokens if self.generation is not None else 1
            ops = (*edit_ops(self.edits, n_invokes, self._next_id, steps, self._calls_per_step), *ops)
        return drop_dead_reads(Program(ops, n_invokes, generation=self.generation))

    def explain_graph(self) -> str:
        """After a compiled trace: the patched graph's code around each site."""
        graph = getattr(self._result, "graph", None)
        if graph is None:
            raise InterventionError.at(
                user_span(), "this trace did not run compiled, so it has no patched graph",
                "trace with compile=\"graph\" (or \"inductor\"), then call explain_graph()")
        from compiler.graph_text import explain_graph
        return explain_graph(graph, self.typed, self.engine.root)

    @property
    def engine(self) -> Engine:
        """The engine this trace's program runs on."""
        return self.target.engine

    def batch(self) -> Batch:
        """The invokes' inputs as one batch (tokenised and padded)."""
        if not self.invoke_inputs:
            raise InterventionError.at(user_span(), "shapes are not known here: there is no input yet",
                                       "read shapes in a trace (or model.scan(...)) with an input; an edit has none")
        if self._batch is None:
            self._batch = self.target.batch(self.invoke_inputs)
        return self._batch

    def typer(self) -> IncrementalTyper:
        """Types the ops as they are recorded, for the current batch of invokes."""
        if self._typer is None:
            self._typer = self.engine.typer(self.batch(), self.params, self.generation)
        return self._typer

    def fake(self, proxy: Proxy) -> Any:
        """The fake value of a proxy (shape and dtype, no data), checking the ops so far."""
        return self.typer().values(self.ops)[proxy._id]

    def _alive(self, start: int = 0) -> list[Proxy]:
        """The proxies made from the `start`-th on that something still refers to."""
        return [p for p in (ref() for ref in self._proxies[start:]) if p is not None]

    def _finish(self) -> None:
        if not self.invoke_inputs:
            raise InterventionError.at(user_span(), "the trace has no input",
                                       "pass one to model.trace(...) or use tracer.invoke(...)")
        if self.session is not None and self.fan is None:
            self.session.keep(self, self._alive())
        program, ids = self._program()
        typer = self.typer()
        typer.record(self.ops)
        run = self.engine.run if self.remote is None else self.remote.runner(self.engine)
        self.typed, result = run(program, self.batch(), self.params, compile=self.compile, execute=self.execute,
                                 typer=None if self.edits else typer, ids=None if self.edits else ids)
        for proxy in self._alive():
            if proxy._steps is not None and proxy._saved:
                values = [result.values[ids[i]] for i in proxy._steps if ids.get(i) in result.values]
                if values or not self.execute:
                    proxy._resolve(values)
                else:
                    proxy._resolve(missing=ENDED_EARLY)
            elif not proxy._saved:
                proxy._resolve(missing="this value was not saved; call .save() on it in the trace")
            elif ids.get(proxy._id) in result.values:
                proxy._resolve(result.values[ids[proxy._id]])
            elif self.execute:
                proxy._resolve(missing=ENDED_EARLY if self.generation is not None else
                               "this value was not computed: the forward stopped before it")
            else:
                proxy._resolve(missing="model.scan(...) computes shapes, not values; use .shape")
        self._result = result
        if self.conditional_saves or self.logs:
            named = {k.name: v for k, v in result.saved.items() if k.step is None and not k.point}
            for proxy in self._alive():
                condition = self.conditional_saves.get(proxy._save_name or "", True)
                if proxy._saved and self.execute and not holds(condition, named):
                    proxy._resolve(missing=why_missing(condition, named))
            if self.execute:
                print_logs(self.logs, named)
        hide(result)
        for saved in {id(x): x for x in self.saved_lists}.values():
            if self.execute:
                saved.resolve()
