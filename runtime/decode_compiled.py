"""Compiled generation: the prompt pass runs eagerly with the program's step-0 hooks; every decode
step runs one compiled graph on a static KV cache, with that step's interventions spliced in.

A step's ops (sites renumbered to the step's own calls, params and saves named by position) form
a program of their own: steps that do the same thing get the same structural hash and therefore
the same graph, whatever their parameter values (graph inputs). The cache is preallocated to a
bucketed length and reused, so one graph serves every step and every batch of one
(batch size, cache length) bucket. Where the program needs something a per-step graph cannot give
(a value flowing from one step into another, a stop), this returns None with a reason and the
reference interpreter runs instead.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch

from compiler.check import BEFORE_FORWARD, TypedProgram, check
from compiler.ir import Op, Program, SaveKey
from compiler.passes import remap
from compiler.signatures import SiteTable, step_of
from runtime.compiled import CompiledRunner
from runtime.decode import DecodePlan, StepInputs, cache_argument, step_kwargs
from runtime.interpreter import Batch, HookedRun, RunResult, generate_and_report

CACHE_BUCKET = 16  # static caches are allocated in multiples of this many positions
KEPT = 256  # checked step programs (and decode site tables) kept per model, oldest dropped first
DecodeTable = Callable[[Batch, dict[str, Any]], SiteTable]


@dataclasses.dataclass(frozen=True)
class StepProgram:
    """One decode step's ops as a program of its own, and how its names map back."""

    program: Program
    params: dict[str, str]  # positional name -> the generation's param name
    saves: dict[str, SaveKey]  # positional name -> the generation's save
    ids: dict[int, int]  # step value id -> the generation's value id


def split_steps(typed: TypedProgram, table: SiteTable, steps: int) -> tuple[set[int], list[StepProgram]] | str:
    """The ops (by index) that run outside decode steps, and one program per decode step 1..n-1;
    or why the program cannot run as per-step graphs."""
    ops, schedule = typed.program.ops, typed.schedule
    if any(op.opcode == "stop" for op in ops):
        return "a stop inside a generation"
    step_at = [-1 if at == BEFORE_FORWARD else step_of(table, at) for at in schedule]
    step_of_value = {op.result: s for op, s in zip(ops, step_at, strict=True) if op.result is not None}
    shared = {op.result for op, s in zip(ops, step_at, strict=True)
              if op.result is not None and (s == -1 or op.opcode in ("param", "weight"))}
    outside: set[int] = set()
    per_step: list[list[int]] = [[] for _ in range(steps)]
    for i, (op, s) in enumerate(zip(ops, step_at, strict=True)):
        crossing = [r for r in op.refs() if r not in shared and step_of_value[r] != s]
        if 1 <= s < steps:
            if crossing:
                return "a value flows from one generation step into another"
            per_step[s].append(i)
        else:
            if crossing:  # the generator's output computed from a decode step's value
                return "a value flows from a decode step into a later step"
            outside.add(i)
    return outside, [_step_program(typed, table, s, per_step[s]) for s in range(1, steps)]


def _step_program(typed: TypedProgram, table: SiteTable, step: int, indices: list[int]) -> StepProgram:
    ops = typed.program.ops
    needed = set(indices)
    defining = {op.result: i for i, op in enumerate(ops) if op.result is not None}
    todo = list(indices)
    while todo:  # shared values the step uses (params, weights, values computed before the forward)
        for r in ops[todo.pop()].refs():
            if defining[r] not in needed:
                needed.add(defining[r])
                todo.append(defining[r])
    ids: dict[int, int] = {}
    params: dict[str, str] = {}
    saves: dict[str, SaveKey] = {}
    out: list[Op] = []
    own = set(indices)  # shared values first, so that every step orders its program alike
    for i in sorted(needed - own) + sorted(own):
        op = ops[i]
        site, target, save_step = op.site, op.target, op.step
        if site is not None:
            per = table.calls_per_step.get(f"{site.module}/{site.phase}", 0)
            site = dataclasses.replace(site, call=site.call - step * per)
        if op.opcode == "param":
            target = next((k for k, v in params.items() if v == op.target), f"_p{len(params)}")
            params[target] = op.target
        elif op.opcode == "save":  # named by position, at no step: steps that do the same share a graph
            target, save_step = f"_s{len(saves)}", None
            saves[target] = op.save_key
        result = None
        if op.result is not None:
            result = ids[op.result] = len(ids)
        out.append(dataclasses.replace(
            op, result=result, site=site, target=target, step=save_step, args=tuple(remap(a, ids) for a in op.args),
            kwargs=tuple((k, remap(v, ids)) for k, v in op.kwargs), path=tuple(remap(a, ids) for a in op.path)))
    back = {new: old for old, new in ids.items()}
    return StepProgram(Program(tuple(out), typed.program.n_invokes), params, saves, back)


class DecodeSteps:
    """A model's compiled-decoding state: static KV caches per (batch size, length bucket), reused
    so the decode graph (which guards on the cache object) is reused too; the decode step's site
    table per bucket; and each step program checked once per bucket."""

    def __init__(self, module: torch.nn.Module, record: DecodeTable):
        self.module, self.record = module, record
        self.caches: dict[tuple[int, int], Any] = {}
        self.tables: dict[Any, SiteTable] = {}
        self.typed: dict[Any, TypedProgram] = {}

    def cache(self, batch: int, length: int) -> tuple[Any, int]:
        """An emptied static cache for `batch` rows of at least `length` positions, and its width."""
        from transformers import StaticCache
        key = (batch, -(-length // CACHE_BUCKET) * CACHE_BUCKET)
        cache = self.caches.get(key)
        if cache is None:
            cache = self.caches[key] = StaticCache(config=self.module.config, max_cache_len=key[1])
        elif cache.is_initialized:
            cache.reset()
        return cache, key[1]

    def check(self, plan: StepProgram, batch: Batch, params: dict[str, Any]) -> tuple[TypedProgram, SiteTable]:
        """The step program typed against the decode step of this bucket (each checked once)."""
        from transformers import StaticCache
        bucket = tuple((k, tuple(v.shape)) for k, v in batch.kwargs.items() if isinstance(v, torch.Tensor))
        table = self.tables.get(bucket)
        if table is None:
            fresh = StaticCache(config=self.module.config, max_cache_len=batch.kwargs["attention_mask"].shape[1])
            table = self.tables[bucket] = self.record(batch, {**batch.kwargs, cache_argument(self.module): fresh})
            if len(self.tables) > KEPT:
                del self.tables[next(iter(self.tables))]
        key = (plan.program.structural_hash(), bucket, tuple((r.start, r.stop) for r in batch.rows))
        typed = self.typed.get(key)
        if typed is None:
            typed = self.typed[key] = check(plan.program, table, self.module, params, list(batch.rows))
            if len(self.typed) > KEPT:
                del self.typed[next(iter(self.typed))]
        return typed, table


def generate_compiled(runner: CompiledRunner, steps: DecodeSteps, mode: str, typed: TypedProgram,
                      table: SiteTable, batch: Batch, params: dict[str, Any],
                      spec: DecodePlan) -> RunResult | None:
    """Generate with compiled decode steps; None when it cannot (`runner.new_reason` says why)."""
    runner.new_reason = None
    split = split_steps(typed, table, spec.max_new_tokens)
    if isinstance(split, str):
        return runner.refuse(("generate", typed.program.structural_hash()), split)
    outside, plans = split
    module = runner.module
    ids = batch.kwargs["input_ids"]
    cache, width = steps.cache(batch.size, ids.shape[1] + spec.max_new_tokens)
    run = HookedRun(module, typed, batch, params, only=outside)

    def step(k: int, inputs: StepInputs) -> torch.Tensor:
        current = inputs["attention_mask"].shape[1]
        full = {**inputs, "attention_mask": torch.nn.functional.pad(inputs["attention_mask"], (0, width - current))}
        if k == 0:  # the prompt pass: eager, with the program's step-0 hooks
            out = module(**step_kwargs(module, full, cache, cache_position=torch.arange(current, device=ids.device)))
            run.remove_hooks()
            return out.logits[:, -1]
        plan = plans[k - 1]
        position = torch.full((1,), current - 1, device=ids.device)
        step_batch = Batch((), step_kwargs(module, full, cache, cache_position=position), batch.rows, batch.size)
        step_params = {name: params[source] for name, source in plan.params.items()}
        step_typed, step_table = steps.check(plan, step_batch, step_params)
        result = runner.run(mode, step_typed, step_table, step_batch, step_params, static=True)
        if result is None:
            raise _Abandon()
        for key, value in result.saved.items():
            run.result.saved[plan.saves[key.name]] = value
        for vid, value in result.values.items():
            run.result.values[plan.ids[vid]] = value
        return result.output.logits[:, -1]

    try:
        return run.execute(lambda: generate_and_report(run, step, batch, spec))
    except _Abandon:
        return None


class _Abandon(Exception):
    """A decode step could not run compiled: the whole generation reruns on the reference."""
