"""The engine: one torch module and everything that runs programs on it.

An `Engine` owns the module, its site tables (from a site source, cached per input shape),
checking, the reference interpreter, compiled execution and decoding. Every frontend (the proxy
API, `.ivx` files, sweeps) hands it the same thing: a `Program`, a `Batch` of tensors and the
program's params. Site tables come from recording the module on fake tensors (`RecordedSites`), or
from any other `SiteSource` (a model known only by its config answers from a symbolic signature).
"""

from __future__ import annotations

import inspect
import warnings
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, Protocol

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from compiler.check import IncrementalTyper, TypedProgram, allocation_limit, check
from compiler.errors import InterventionError
from compiler.ir import NO_SPAN, Generation, Program, Span
from compiler.passes import reads_last_position_only
from compiler.signatures import SiteTable, generation_table, module_paths, record_sites
from runtime import shared_prefix
from runtime.compiled import CompiledRunner, CompileStats
from runtime.decode import DecodePlan, next_inputs, positions_of, step_kwargs
from runtime.decode_compiled import DecodeSteps, generate_compiled
from runtime.interpreter import Batch, RunResult, run, run_generation

Rows = tuple[str, int, int]  # a sweep's vectorised axis, its number of points, the invoke expanded by it
TABLES_KEPT = 64  # site tables hold fake tensors only; a sweep needs one per prompt length


class SiteSource(Protocol):
    """Where an engine's site tables come from."""

    def forward(self, batch: Batch) -> SiteTable:
        """The sites of one forward on `batch`."""
        ...

    def generation(self, batch: Batch, steps: int) -> SiteTable:
        """The sites of a KV-cached generation of `steps` tokens from the prompts in `batch`;
        ValueError when the module cannot generate with interventions."""
        ...


class RecordedSites:
    """Site tables recorded by running the module itself on fake tensors."""

    def __init__(self, module: torch.nn.Module, mode: FakeTensorMode | None = None):
        self.module, self.mode = module, mode

    def forward(self, batch: Batch) -> SiteTable:
        return record_sites(self.module, batch.args, batch.kwargs, batch.size, self.mode)

    def generation(self, batch: Batch, steps: int) -> SiteTable:
        return record_generation(self.module, batch, steps, self.mode)


def record_generation(module: torch.nn.Module, batch: Batch, steps: int,
                      mode: FakeTensorMode | None) -> SiteTable:
    """The sites of a generation, from two fake passes of a causal LM: the prompt pass and one
    decode step (every later step has the same sites)."""
    if getattr(module, "config", None) is None:
        raise ValueError(f"{type(module).__name__} is not a causal language model (it has no config)")
    from transformers import DynamicCache
    ids, mask = batch.kwargs["input_ids"], batch.kwargs["attention_mask"]
    cache = DynamicCache(config=module.config)
    prompt = {"input_ids": ids, "attention_mask": mask, "position_ids": positions_of(mask)}
    first = record_sites(module, (), step_kwargs(module, prompt, cache), batch.size, mode)
    following = next_inputs(prompt, ids[:, -1])  # token values do not matter for shapes
    decode = record_sites(module, (), step_kwargs(module, following, cache), batch.size, first.mode)
    with first.mode:
        generated = torch.empty(batch.size, ids.shape[1] + steps, dtype=torch.long)
    return generation_table(first, decode, steps, generated)


class Engine:
    """Checks and runs programs on one torch module.

    `sites`: where site tables come from (default: the module run on fake tensors). `fake_mode`:
    set when the module's weights are fake (checking only; nothing runs). `paths`: each module's
    canonical path by `id` (default: walked from the module). `forward_params`: the names the
    module's forward takes (default: read from its signature). `name`: the model's source, for
    manifests. `where`: the user's position, for errors and warnings raised outside any op.
    """

    def __init__(self, module: torch.nn.Module, sites: SiteSource | None = None, *,
                 fake_mode: FakeTensorMode | None = None, paths: dict[int, str] | None = None,
                 forward_params: frozenset[str] | None = None, name: str | None = None,
                 where: Callable[[], Span] = lambda: NO_SPAN):
        self.module = module
        self.sites = sites if sites is not None else RecordedSites(module, fake_mode)
        self.fake_mode = fake_mode
        self.paths = module_paths(module) if paths is None else paths
        self.forward_params = frozenset(inspect.signature(module.forward).parameters) \
            if forward_params is None else forward_params
        self.name = name or type(module).__name__
        self.root = "model"  # how messages name the module tree's root
        self.where = where
        self._tables: OrderedDict[Any, SiteTable] = OrderedDict()
        self._runner: CompiledRunner | None = None
        self._decoding: DecodeSteps | None = None

    # ------------------------------------------------------------------------------ public
    def site_table(self, batch: Batch, generation: Generation | None = None) -> SiteTable:
        """The sites of `batch` (of a generation from it, with `generation`), cached per shape."""
        steps = generation.max_new_tokens if generation is not None else None
        key = (_signature((batch.args, batch.kwargs)), steps)
        table = self._tables.get(key)
        if table is None:
            table = self.sites.forward(batch) if steps is None else self._generation_table(batch, steps)
            self._tables[key] = table
            if len(self._tables) > TABLES_KEPT:
                self._tables.popitem(last=False)
        return table

    def typer(self, batch: Batch, params: dict[str, Any], generation: Generation | None = None) -> IncrementalTyper:
        """A typer for ops recorded one by one against `batch` (the proxy API types as it records)."""
        table = self.site_table(batch, generation)
        return IncrementalTyper(table, self.module, params, list(batch.rows), self.root)

    def check(self, program: Program, batch: Batch, params: dict[str, Any],
              typer: IncrementalTyper | None = None, ids: dict[int, int] | None = None,
              max_bytes: int | None = None) -> TypedProgram:
        """`program` scheduled and typed on fake tensors for `batch`; a CheckError lists every
        problem. `typer` already typed the ops `program` was made from (`ids` maps their values);
        `max_bytes` bounds what one op may allocate."""
        table = self.site_table(batch, program.generation)
        if typer is not None and typer.table is not table:
            typer = None  # typed against another batch
        return check(program, table, self.module, params, list(batch.rows), self.root, typer, ids, max_bytes)

    def _device(self) -> torch.device:
        """Where the model's weights live (the memory an op's allocation is measured against)."""
        weight = next(self.module.parameters(), None)
        return weight.device if weight is not None else torch.device("cpu")

    def run(self, program: Program, batch: Batch, params: dict[str, Any], *, compile: str = "off",
            execute: bool = True, typer: IncrementalTyper | None = None,
            ids: dict[int, int] | None = None, shared: Rows | None = None) -> tuple[TypedProgram, RunResult]:
        """Check `program` for `batch`, then run it: a generation when the program has one.

        `compile`: "off" (the reference interpreter), "graph", "inductor", "cudagraphs" or "auto"
        (see runtime/compiled.py); where compiled execution is not possible the reference runs and
        a `CompileFallbackWarning` says why. Without `execute`, only checks: the result's values
        are the saved values' fake tensors. `shared`: a sweep's vectorised axis, run with the
        shared-prefix schedule where it applies (runtime/shared_prefix.py)."""
        limit = allocation_limit(self._device()) if execute and self.fake_mode is None else None
        typed = self.check(program, batch, params, typer, ids, limit)
        if not execute:
            saved = {r for op in program.ops if op.opcode == "save" for r in op.refs()}
            return typed, RunResult(values={i: typed.fakes[i] for i in saved if i in typed.fakes})
        if self.fake_mode is not None:
            raise InterventionError.at(self.where(), "this model has no weights (built for checking)",
                                       "check with execute=False, or load real weights to run")
        table = self.site_table(batch, program.generation)
        mode = self._compiled().wants(compile, typed, batch)
        if shared is not None:
            schedule = self.shared_prefix(typed, batch, shared)
            if not isinstance(schedule, str):
                try:
                    return typed, self._run_shared(mode, typed, table, batch, params, schedule)
                except Exception:  # noqa: BLE001 - a model the schedule misjudged (state carried across
                    pass  # layers, rows it cannot see): the vectorised rows below define the values, and the errors
        if program.generation is not None:
            return typed, self._generate(mode, typed, table, batch, params, self._spec(program.generation, batch))
        if mode != "off":
            result = self._compiled().run(mode, typed, table, batch, params)
            if result is not None:
                return typed, result
            reason = self._compiled().new_reason
            result = run(self.module, typed, batch, params)  # a located error, if the program fails
            self._warn_fallback(mode, reason)
            return typed, result
        return typed, run(self.module, typed, batch, params)

    def _run_shared(self, mode: str, typed: TypedProgram, table: SiteTable, batch: Batch, params: dict[str, Any],
                    schedule: shared_prefix.SharedPrefix) -> RunResult:
        if mode != "off":
            result = self._compiled().run(mode, typed, table, batch, params, shared=schedule)
            if result is not None:
                return result
            reason = self._compiled().new_reason
            result = shared_prefix.run(self.module, typed, table, batch, params, schedule)
            self._warn_fallback(mode, reason)
            return result
        return shared_prefix.run(self.module, typed, table, batch, params, schedule)

    def shared_prefix(self, typed: TypedProgram, batch: Batch, rows: Rows) -> shared_prefix.SharedPrefix | str:
        """The shared-prefix schedule of a checked sweep program on `batch`, or why it does not apply."""
        return shared_prefix.plan(typed, self.site_table(batch), batch, *rows)

    def last_position_head(self, program: Program) -> bool:
        """Whether the model's head may run on the last position alone for `program` (HF's
        `logits_to_keep=1`): the forward takes that argument and the program uses the head's
        output only at `[:, -1]` (compiler.passes.reads_last_position_only)."""
        head = getattr(self.module, "get_output_embeddings", lambda: None)()
        if head is None or "logits_to_keep" not in self.forward_params or program.generation is not None:
            return False
        path = next((p for p, m in self.module.named_modules() if m is head), None)
        return path is not None and reads_last_position_only(program, path)

    def compile_stats(self) -> CompileStats:
        """Counters of compiled execution on this engine (artefacts, compilations, calls, fallbacks)."""
        return self._compiled().stats

    def release_compiled(self) -> None:
        """Forget the compiled graphs and remove the marker hooks they keep installed."""
        self._compiled().release()
        self._decoding = None

    # ----------------------------------------------------------------------------- private
    def _compiled(self) -> CompiledRunner:
        if self._runner is None:
            self._runner = CompiledRunner(self.module)
        return self._runner

    def _decode_steps(self) -> DecodeSteps:
        if self._decoding is None:
            module, mode = self.module, self.fake_mode
            self._decoding = DecodeSteps(module, lambda batch, kwargs: record_sites(module, (), kwargs, batch.size, mode))
        return self._decoding

    def _generation_table(self, batch: Batch, steps: int) -> SiteTable:
        try:
            return self.sites.generation(batch, steps)
        except ValueError as e:
            raise InterventionError.at(self.where(), f"this model cannot generate with interventions: {e}") from None

    def _spec(self, settings: Generation, batch: Batch) -> DecodePlan:
        eos = getattr(getattr(self.module, "config", None), "eos_token_id", None)
        try:
            return DecodePlan.of(settings, eos if isinstance(eos, int) else None, batch.pad_id)
        except ValueError as e:
            raise InterventionError.at(self.where(), f"generate(): {e}") from None

    def _generate(self, mode: str, typed: TypedProgram, table: SiteTable, batch: Batch,
                  params: dict[str, Any], spec: DecodePlan) -> RunResult:
        if mode != "off":
            runner = self._compiled()
            result = generate_compiled(runner, self._decode_steps(), mode, typed, table, batch, params, spec)
            if result is not None:
                return result
            reason = runner.new_reason
            result = run_generation(self.module, typed, batch, params, spec)
            self._warn_fallback(mode, reason)
            return result
        return run_generation(self.module, typed, batch, params, spec)

    def _warn_fallback(self, mode: str, reason: str | None) -> None:
        if reason is not None:
            span = self.where()
            warnings.warn_explicit(
                f"compile={mode!r} is not possible for this trace ({reason}); "
                "the reference interpreter ran instead", CompileFallbackWarning, span.file, span.line)


class CompileFallbackWarning(UserWarning):
    """Compiled execution was asked for and is not possible; the reference interpreter ran."""


def _signature(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return ("T", tuple(obj.shape), str(obj.dtype))
    if isinstance(obj, (tuple, list)):
        return tuple(_signature(x) for x in obj)
    if isinstance(obj, dict):
        return tuple((k, _signature(v)) for k, v in obj.items())
    return repr(obj)
