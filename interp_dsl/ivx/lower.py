"""Lowering a declared experiment to IR: drive a `Tracer` exactly as Python code would (attribute
access on the model, operators, `with tracer.invoke(...)`), with spans taken from the file, so an
experiment written in `.ivx` and its proxy-API twin produce the same IR by construction."""

from __future__ import annotations

import dataclasses
import functools
import operator
from collections.abc import Callable
from typing import Any

import torch

from compiler import vocabulary
from compiler.errors import Diagnostic, InterventionError, did_you_mean
from compiler.ir import SITE_KINDS, Generation, Span
from grammar import ast
from interp_dsl import fan
from interp_dsl.cache import record_cache
from interp_dsl.conditions import HIDDEN
from interp_dsl.envoy import Envoy
from interp_dsl.fan import Fanned
from interp_dsl.ivx.declare import Experiment, ExperimentError, experiment_error
from interp_dsl.models import GeneratorEnvoy, LanguageModel, Model
from interp_dsl.proxy import Proxy, record_call
from interp_dsl.sweeps import Sweep
from interp_dsl.tracing import Tracer

_BINARY: dict[str, Callable[[Any, Any], Any]] = {
    "+": operator.add, "-": operator.sub, "*": operator.mul, "/": operator.truediv,
    "//": operator.floordiv, "%": operator.mod, "@": operator.matmul, "**": operator.pow,
    "==": operator.eq, "!=": operator.ne, "<": operator.lt, "<=": operator.le,
    ">": operator.gt, ">=": operator.ge,
}
_INPLACE = {"+=": operator.iadd, "-=": operator.isub, "*=": operator.imul, "/=": operator.itruediv}
_UNARY = {"-": operator.neg, "+": operator.pos, "~": operator.invert}
_NAMESPACES = {"torch": "torch", "F": "torch.nn.functional", "einops": "einops",
               "linalg": "torch.linalg", "special": "torch.special", "fft": "torch.fft"}
_BUILTINS = {"abs": abs}  # Python's own, recorded as the `abs` operator like in the proxy API
_DTYPES = vocabulary.DTYPES  # "float32" -> torch.float32
_VALUE_ATTRIBUTES = ("shape", "dtype", "ndim", "size", "dim")
_GRADIENT_ATTRIBUTES = ("backward", "retain_grad", "requires_grad", "register_hook")
_STATEMENTS = (ast.Let, ast.Assign, ast.Save, ast.Stop, ast.Steps, ast.Backward, ast.Cache)


class _Namespace:
    """`torch`, `F`, `einops` inside an experiment: only whitelisted functions resolve."""

    def __init__(self, prefix: str):
        self.prefix = prefix


class Lowering:
    def __init__(self, exp: Experiment, model: Model, tracer: Tracer, point: dict[str, Any],
                 sweep: Sweep | None = None):
        self.exp, self.model, self.tracer, self.sweep = exp, model, tracer, sweep
        self.env: dict[str, Any] = {**exp.tensors, **point}
        self.current = Span(str(exp.path), 0)
        self.diagnostics: list[Diagnostic] = []
        self.session_saves: dict[str, Span] = {}  # a session's saves so far, by name
        tracer.span_source = lambda: self.current

    # statements
    def run(self, body: tuple[ast.Decl, ...] | None = None) -> None:
        """Lower the file's invokes and statements (or `body`'s) into the current tracer."""
        for decl in self.exp.module.body if body is None else body:
            if isinstance(decl, ast.Invoke):
                self._invoke(decl)
            elif isinstance(decl, _STATEMENTS):
                self._statement(decl)
        if self.diagnostics:
            raise ExperimentError(self.diagnostics)

    def trace(self, tracer: Tracer, body: tuple[ast.Decl, ...]) -> None:
        """Lower one trace of a session into `tracer`; names bound before stay in scope."""
        self.tracer = tracer
        tracer.span_source = lambda: self.current
        self.run(body)
        for op in tracer.ops:  # results hold every trace's saves, by name
            if op.opcode == "save" and not op.target.startswith(HIDDEN):
                if op.target in self.session_saves:
                    earlier = self.session_saves[op.target]
                    raise experiment_error(op.span or self.current, f"save {op.target} is also made by an earlier trace "
                                           f"(line {earlier.line})", "name each save of a session once")
                self.session_saves[op.target] = op.span or self.current

    def _invoke(self, block: ast.Invoke) -> None:
        if block.prompt not in self.exp.prompts:
            self.diagnostics.append(Diagnostic(
                block.span, f"unknown prompt {block.prompt!r}",
                did_you_mean(block.prompt, self.exp.prompts) or
                f"declare it: prompt {block.prompt} = \"...\""))
            return
        invoker = self.sweep.invoke(block.prompt) if self.sweep else self.tracer.invoke(self.exp.prompts[block.prompt])
        with invoker:
            for statement in block.body:
                self._statement(statement)

    def _statement(self, s: ast.Stmt) -> None:
        self.current = s.span
        try:
            if isinstance(s, ast.Let):
                self.env[s.name] = self.eval(s.value)
            elif isinstance(s, ast.Save):
                self._save(s)
            elif isinstance(s, ast.Stop):
                self.tracer.stop()
            elif isinstance(s, ast.Steps):
                self._steps(s)
            elif isinstance(s, ast.Backward):
                self._backward(s)
            elif isinstance(s, ast.Cache):
                self._cache(s)
            else:
                self._assign(s)
        except InterventionError as e:
            file = str(self.exp.path)
            self.diagnostics.extend(d if d.span.file == file else dataclasses.replace(d, span=s.span)
                                    for d in e.diagnostics)

    def _steps(self, s: ast.Steps) -> None:
        if self.exp.generate is None:
            raise experiment_error(s.span, "a steps block is for generation, and this experiment does not generate",
                         "add a line: generate max_new_tokens=8")
        key = slice(None) if s.selector is None else self._subscript(s.selector)
        with self.tracer.iter[key]:
            for statement in s.body:
                self._statement(statement)
        self.current = s.span

    def _backward(self, s: ast.Backward) -> None:
        metric = self.eval(s.metric)
        if not isinstance(metric, Proxy):
            raise experiment_error(s.metric.span, "backward differentiates a value computed by the model",
                                   "a scalar such as model.lm_head.output[0, -1, token(\" Paris\")]")
        self.current = s.span
        with metric.backward():
            for statement in s.body:
                self._statement(statement)
        self.current = s.span

    def _cache(self, s: ast.Cache) -> None:
        """`cache acts [= modules]`: each module's output saved as `acts__<path>` (without a
        module list, each module whose output is a tensor)."""
        if s.name.startswith(HIDDEN):
            raise experiment_error(s.span, f"save names starting with {HIDDEN!r} are the library's own",
                                   "choose another name")
        modules = None
        if s.modules is not None:
            swept = sorted({n.id for n in _names(s.modules)} & set(self.exp.sweeps))
            if swept:
                raise experiment_error(s.modules.span, f"cache names fixed modules, not one chosen by the sweep "
                                       f"axis {swept[0]}", "save the module's .output instead: save h = ...")
            value = self.eval(s.modules)
            modules = []
            for item in value if isinstance(value, list) else [value]:
                if isinstance(item, Fanned):
                    raise experiment_error(s.modules.span, "cache names fixed modules, not one chosen by a sweep axis",
                                           "save the module's .output instead: save h = ...")
                if not isinstance(item, Envoy):
                    raise experiment_error(s.modules.span, f"cache takes modules, not a {_kind(item)}",
                                           "cache acts = [model.model.layers[0], model.lm_head]")
                modules.append(item)
        self.current = s.span
        record_cache(self.tracer, modules, None, None, True, True, False, prefix=s.name)

    def _save(self, s: ast.Save) -> None:
        value = self.eval(s.value)
        if not isinstance(value, (Proxy, Fanned)):
            raise experiment_error(s.span, f"save {s.name}: the value is not computed by the model",
                         "save values derived from module .output, .input or .inputs")
        self.current = s.span
        value.save(s.name)
        self.env[s.name] = value  # a saved value is usable by name after its line (in a session's later traces too)

    def _assign(self, s: ast.Assign) -> None:
        """Evaluate in Python's order: `t = v` computes v first; `t op= v` computes t's parts,
        reads t, then v, then writes back (so the IR equals the same line in Python)."""
        target, augmented = s.target, s.op != "="
        value = None if augmented else self.eval(s.value)
        if isinstance(target, ast.Name):
            if augmented:
                current = self.eval(target)
                value = self._operator(_INPLACE[s.op], current, self.eval(s.value))
            self.env[target.id] = value
        elif isinstance(target, ast.Attr) and target.name == "grad":
            owner = self.eval(target.obj)
            if not isinstance(owner, Proxy):
                raise experiment_error(target.span, "only a module value's .grad can be assigned")
            self.current = s.span
            if augmented:
                value = self._operator(_INPLACE[s.op], owner.grad, self.eval(s.value))
            self.current = s.span
            owner.grad = value
        elif isinstance(target, ast.Attr) and target.name in SITE_KINDS:
            owner = self.eval(target.obj)
            if not isinstance(owner, (Envoy, Model)):
                raise experiment_error(target.span, f"only a module's .{target.name} can be assigned")
            self.current = s.span
            if augmented:
                current = getattr(owner, target.name)
                value = self._operator(_INPLACE[s.op], current, self.eval(s.value))
            self.current = s.span
            setattr(owner, target.name, value)
        elif isinstance(target, ast.Index):
            owner = self.eval(target.obj)
            index = self._subscript(target.items)
            self.current = s.span
            if augmented:
                current = owner[index]
                value = self._operator(_INPLACE[s.op], current, self.eval(s.value))
            self.current = s.span
            owner[index] = value
        else:
            raise experiment_error(target.span, "cannot assign to this",
                         "assign a name, a module's .output/.input/.inputs, a .grad, or an index of one")

    # expressions
    def eval(self, e: ast.Expr) -> Any:
        outer = self.current
        try:
            return getattr(self, f"_e_{type(e).__name__}")(e)
        except InterventionError as err:
            # The proxy machinery located this in Python; the innermost expression is the place.
            if all(d.span.file == str(self.exp.path) for d in err.diagnostics):
                raise
            raise type(err)([d if d.span.file == str(self.exp.path) else dataclasses.replace(d, span=e.span)
                             for d in err.diagnostics]) from None
        finally:
            self.current = outer

    def _e_Name(self, e: ast.Name) -> Any:
        if e.id in self.env:
            value = self.env[e.id]
            if isinstance(value, Proxy) and not value._live:  # an earlier trace's value: a tensor now
                return value.value
            return value
        if e.id in _NAMESPACES:
            return _Namespace(_NAMESPACES[e.id])
        if e.id in _DTYPES:
            return _DTYPES[e.id]
        known = [*self.env, *_NAMESPACES, *_DTYPES, "model"]
        raise experiment_error(e.span, f"unknown name {e.id!r}",
                     did_you_mean(e.id, known) or "define it first: name = expression, or let name = ...")

    def _e_ModelRef(self, e: ast.ModelRef) -> Any:
        return self.model

    def _e_Literal(self, e: ast.Literal) -> Any:
        return e.value

    def _e_EllipsisLit(self, e: ast.EllipsisLit) -> Any:
        return Ellipsis

    def _e_TupleLit(self, e: ast.TupleLit) -> Any:
        return tuple(self.eval(i) for i in e.items)

    def _e_ListLit(self, e: ast.ListLit) -> Any:
        return [self.eval(i) for i in e.items]

    def _e_Slice(self, e: ast.Slice) -> Any:
        return slice(*(None if p is None else self.eval(p) for p in (e.start, e.stop, e.step)))

    def _subscript(self, items: tuple[ast.Expr, ...]) -> Any:
        values = tuple(self.eval(i) for i in items)
        return values[0] if len(values) == 1 else values

    def _e_Attr(self, e: ast.Attr) -> Any:
        owner = self.eval(e.obj)
        self.current = e.span
        if isinstance(owner, _Namespace):
            if owner.prefix == "torch" and e.name in _DTYPES:
                return _DTYPES[e.name]
            return self._function(f"{owner.prefix}.{e.name}", e.span)
        if isinstance(owner, Fanned):
            return fan.apply(lambda o: self._attribute(o, e.name, e.span), owner)
        return self._attribute(owner, e.name, e.span)

    def _attribute(self, owner: Any, name: str, span: Span) -> Any:
        """`owner.name`, for the names the language declares: a module's submodules, parameters,
        sites and `next`; a value's shape attributes, vocabulary methods and output fields."""
        if name.startswith("_"):
            raise experiment_error(span, f"`.{name}`: private and special names are not part of the language",
                         "use module paths, .output/.input/.inputs, and functions of the vocabulary")
        if isinstance(owner, GeneratorEnvoy) and name == "output":
            return owner.output
        if isinstance(owner, (Envoy, Model)):
            module = owner._module
            if name in SITE_KINDS or name == "next" or name in module._modules or name in module._parameters \
                    or name in module._buffers or (name == "generator" and isinstance(owner, LanguageModel)):
                return getattr(owner, name)
            declared = [*SITE_KINDS, "next", *module._modules, *module._parameters, *module._buffers]
            raise experiment_error(span, f"{owner._display} ({type(module).__name__}) has no submodule, parameter or site {name!r}",
                         did_you_mean(name, declared) or f"its submodules: {', '.join(list(module._modules)[:8]) or 'none'}")
        if isinstance(owner, Proxy):
            if name in _GRADIENT_ATTRIBUTES:
                raise experiment_error(span, f"`.{name}` is Python's spelling; in .ivx a gradient is "
                                             "read in a backward block", "backward metric { save g = h.grad }")
            if name in _VALUE_ATTRIBUTES or not hasattr(Proxy, name):
                return getattr(owner, name)  # the proxy allows vocabulary methods and output fields only
        elif isinstance(owner, torch.Tensor):  # a loaded tensor: its methods are recorded like a value's
            if name in _VALUE_ATTRIBUTES:
                return getattr(owner, name)
            entry = vocabulary.vocabulary().get(f"Tensor.{name}")
            if entry is not None:
                method = self._function(f"Tensor.{name}", span)
                return method(owner) if entry.kind == "property" else functools.partial(method, owner)
        raise experiment_error(span, f"a {_kind(owner)} has no attribute {name!r} in the language",
                     "tensor methods are listed in docs/vocabulary.md")

    def _e_Index(self, e: ast.Index) -> Any:
        owner = self.eval(e.obj)
        index = self._subscript(e.items)
        self.current = e.span
        if isinstance(owner, (Envoy, Model)) and isinstance(index, bool | float):
            raise experiment_error(e.span, "a module list is indexed with an integer")
        return owner[index]

    def _e_BinOp(self, e: ast.BinOp) -> Any:
        left, right = self.eval(e.left), self.eval(e.right)
        self.current = e.span
        return self._operator(_BINARY[e.op], left, right)

    def _e_Unary(self, e: ast.Unary) -> Any:
        operand = self.eval(e.operand)
        self.current = e.span
        return self._operator(_UNARY[e.op], operand)

    def _operator(self, fn: Callable[..., Any], *operands: Any) -> Any:
        """Operators on traced values are recorded by the proxies. On loaded tensors with numbers
        they run now (as in Python: the result is no larger than the tensor); between loaded
        tensors they are recorded, since broadcasting could allocate without bound; on numbers
        they are bounded."""
        if any(isinstance(o, (Proxy, Fanned)) for o in operands):
            return fn(*operands)
        name = fn.__name__.removeprefix("i") if fn in _INPLACE.values() else fn.__name__
        tensors = sum(isinstance(o, torch.Tensor) for o in operands)
        if tensors == 1 and all(isinstance(o, (torch.Tensor, int, float, bool)) for o in operands):
            return getattr(operator, name)(*operands)  # `t += 1` on a loaded tensor makes a new one
        if tensors:
            return self.tracer.call(name, operands, {})
        try:
            return vocabulary.python_operator(name, *operands)
        except (TypeError, OverflowError, ZeroDivisionError, ValueError) as err:
            raise experiment_error(self.current, str(err)) from None

    def _e_Call(self, e: ast.Call) -> Any:
        if isinstance(e.func, ast.Name) and e.func.id not in self.env:
            if e.func.id == "token":
                return self._token(e)
            func = _BUILTINS.get(e.func.id) or self._function(f"torch.{e.func.id}", e.func.span, short=e.func.id)
        else:
            func = self.eval(e.func)
        args = [self.eval(a) for a in e.args]
        kwargs = {k.name: self.eval(k.value) for k in e.kwargs}
        self.current = e.span
        if not callable(func):
            raise experiment_error(e.func.span, f"{type(func).__name__} is not callable")
        return func(*args, **kwargs)

    def _function(self, name: str, span: Span, short: str | None = None) -> Callable[..., Any]:
        """A vocabulary function as a recorder: calling it records an op (a factory included:
        nothing is computed or allocated while lowering)."""
        if name in vocabulary.vocabulary() and vocabulary.vocabulary()[name].kind not in ("operator", "property"):
            return lambda *args, **kwargs: record_call(self.tracer, name, args, kwargs)
        prefix = name.rpartition(".")[0]
        candidates = [n.rpartition(".")[2] for n in vocabulary.vocabulary() if n.rpartition(".")[0] == prefix]
        hint = did_you_mean(short or name.rpartition(".")[2], candidates)
        raise experiment_error(span, f"unknown function {short or name!r}",
                     hint or "functions are torch's (softmax, topk, ...), torch.nn.functional as F.*, "
                             "einops.*, and token(\"text\"); docs/vocabulary.md lists them")

    def _token(self, e: ast.Call) -> int:
        tokenizer = getattr(self.model, "tokenizer", None)
        if len(e.args) != 1 or not isinstance(e.args[0], ast.Literal) or not isinstance(e.args[0].value, str):
            raise experiment_error(e.span, "token(...) takes one string: token(\" Paris\")")
        if tokenizer is None:
            raise experiment_error(e.span, "token(...) needs a model with a tokenizer")
        ids = tokenizer.encode(e.args[0].value, add_special_tokens=False)
        if len(ids) != 1:
            pieces = [tokenizer.decode([i]) for i in ids]
            raise experiment_error(e.span, f"{e.args[0].value!r} is {len(ids)} tokens, not one: {pieces}",
                         "use the text of a single token, often with its leading space")
        return ids[0]


def _kind(value: Any) -> str:
    if isinstance(value, tuple):
        return "shape" if all(type(v) is int for v in value) else "tuple"
    return {bool: "boolean", int: "number", float: "number", str: "string"}.get(type(value), type(value).__name__)


def edited(exp: Experiment, model: Model, point: dict[str, Any]) -> Model:
    """`model` with the experiment's `edit { ... }` blocks recorded as a persistent edit (the
    model itself when it has none): their writes begin every invoke's program."""
    blocks = [d for d in exp.module.body if isinstance(d, ast.Edit)]
    if not blocks:
        return model
    with model.edit() as new:
        lowering = Lowering(exp, model, model._target.open, point)  # type: ignore[arg-type]
        for block in blocks:
            for statement in block.body:
                lowering._statement(statement)
        if lowering.diagnostics:
            raise ExperimentError(lowering.diagnostics)
        lowering.current = blocks[-1].span  # an edit that writes nothing is reported at its block
    return new


def lower(exp: Experiment, model: Model, point: dict[str, Any], execute: bool = True,
          compile: str | None = None) -> Tracer:
    """Record `exp` at one sweep point as a trace on `model`; on return it has run (or, with
    `execute=False`, only been checked). Raises ExperimentError / CheckError at the file's lines.
    A session's traces all run; the last is returned (`lower_traces` returns each)."""
    return lower_traces(exp, model, point, execute, compile)[-1]


def lower_traces(exp: Experiment, model: Model, point: dict[str, Any], execute: bool = True,
                 compile: str | None = None, opened: list[Tracer] | None = None) -> list[Tracer]:
    """The traces of `exp` at one sweep point, each run (or checked) in turn: one, or a
    session's (`trace { ... }` blocks, in a `model.session()`, so a value one computes is
    usable by those after it). `opened` collects the traces as they start (an error leaves
    them there, recorded up to it)."""
    tracers: list[Tracer] = [] if opened is None else opened
    model = edited(exp, model, point)

    def open_trace() -> Tracer:
        tracer = model.trace(compile=compile) if execute else model.scan()
        tracers.append(tracer)
        if exp.generate is not None:
            tracer.generation = generation_settings(exp, model)
        return tracer
    blocks = session_blocks(exp)
    if blocks is None:
        with open_trace() as tracer:
            Lowering(exp, model, tracer, point).run()
        return tracers
    lowering: Lowering | None = None
    with model.session():
        for body in blocks:
            with open_trace() as tracer:
                if lowering is None:
                    lowering = Lowering(exp, model, tracer, point)
                lowering.trace(tracer, body)
    return tracers


def session_blocks(exp: Experiment) -> list[tuple[ast.Decl, ...]] | None:
    """A session's traces, each as the statements it lowers (top-level statements go with the
    trace after them); None when the file has no `trace` block. Invokes outside a trace, a
    statement after the last trace and generation are refused at their lines."""
    body = exp.module.body
    if not any(isinstance(d, ast.Trace) for d in body):
        return None
    blocks: list[tuple[ast.Decl, ...]] = []
    pending: list[ast.Decl] = []
    for decl in body:
        if isinstance(decl, ast.Invoke):
            raise experiment_error(decl.span, "this file is a session (it has trace blocks): this invoke is outside them",
                                   "put it in a trace block: trace { invoke p { ... } }")
        if isinstance(decl, ast.Generate):
            raise experiment_error(decl.span, "a session's traces are forwards; generation is not part of sessions",
                                   "generate in a file without trace blocks")
        if isinstance(decl, ast.Trace):
            if not any(isinstance(d, ast.Invoke) for d in decl.body):
                raise experiment_error(decl.span, "this trace block has no invoke: a trace runs the model on prompts",
                                       "add one: trace { invoke p { ... } }")
            blocks.append((*pending, *decl.body))
            pending = []
        elif isinstance(decl, _STATEMENTS):
            pending.append(decl)
    if pending:
        raise experiment_error(pending[0].span, "a statement after the last trace block runs in no trace",
                               "move it into a trace block")
    return blocks


def generation_settings(exp: Experiment, model: Model) -> Generation:
    line = next(d.span for d in exp.module.body if isinstance(d, ast.Generate))
    if not isinstance(model, LanguageModel):
        raise experiment_error(line, "only a language model generates")
    try:
        return model.generation_settings(**exp.generate)  # type: ignore[arg-type]
    except InterventionError as e:
        raise ExperimentError([dataclasses.replace(d, span=line) for d in e.diagnostics]) from None


def _names(e: Any) -> list[ast.Name]:
    """Every name an expression uses."""
    if isinstance(e, ast.Name):
        return [e]
    if dataclasses.is_dataclass(e):
        return [n for f in dataclasses.fields(e) for n in _names(getattr(e, f.name))]
    if isinstance(e, tuple):
        return [n for item in e for n in _names(item)]
    return []
