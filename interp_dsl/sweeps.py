"""`model.sweep(...)`: one experiment over a stream of prompts and a grid of parameters.

The body of `with model.sweep(prompts) as sweep:` is a trace body, recorded once against the first
batch and checked on fake tensors before anything runs. On exit the runtime runs it batch by batch
(see runtime/sweep_runner.py) and writes shards (runtime/shards.py), or keeps them in memory without `out`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import inspect
import itertools
import sys
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch

from compiler.errors import InterventionError, did_you_mean
from compiler.ir import Generation, Program, SaveKey, tensor_name, to_json
from compiler.passes import stop_after_last_site
from interp_dsl import fan
from interp_dsl.spans import user_span
from interp_dsl.tracing import Invoker, StepBlock, StepSelector, Tracer
from runtime.compiled import sweep_mode
from runtime.datasets import PromptFile, Source, count_rows, zip_rows
from runtime.engine import Rows
from runtime.files import versions
from runtime.fingerprints import architecture_fingerprint, value_digest, weights_fingerprint
from runtime.interpreter import Batch
from runtime.modes import compile_mode
from runtime.shards import (
    Annotate,
    DamagedResultsWarning,
    MemorySink,
    Results,
    ShardSink,
    load_results,
    refuse_other_run,
)
from runtime.sweep_runner import Execute, InvokeInput, Lengths, SweepPlan, pending_windows, run_sweep

if TYPE_CHECKING:
    from interp_dsl.cluster import Pool

IMPLICIT = "prompts"  # the prompt name of `model.sweep(list_of_prompts)`


class Scannable(Protocol):
    """What a sweep needs of its model: a trace that records and checks without running (and
    a `tokenizer` attribute, when it has one, to batch prompts by length)."""

    def scan(self, *args: Any, **kwargs: Any) -> Tracer: ...


class Sweep:
    """Created by `model.sweep(...)`. Inside the block: `sweep.param`, `sweep.zip`, `sweep.invoke`,
    and the usual trace body. After it: `sweep.results` (a `Results`)."""

    def __init__(self, model: Scannable, prompts: Any, *, batch_size: int = 32, out: str | Path | None = None,
                 compile: str | None = None, shard_size: int = 1024, progress: bool | None = None,
                 describe: dict[str, Any] | None = None, restart: bool = False,
                 generate: dict[str, Any] | None = None, remote: Any = False, executor: Any = "local"):
        from interp_dsl.client import resolve
        from interp_dsl.cluster import resolve_executor
        if batch_size < 1 or shard_size < 1:
            raise InterventionError.at(user_span(), "batch_size and shard_size are positive")
        self.model = model
        self.sources = _sources(prompts)
        self.batch_size = batch_size
        self.out = Path(out) if out is not None else None
        self.restart = restart
        self.generate = generate
        self.remote = resolve(remote)  # an interp_dsl.client.Remote: every batch is a job on that server
        if self.remote is not None and compile not in (None, "auto", "off"):
            raise InterventionError.at(user_span(), f"compile={compile!r} chooses how a local run executes",
                                       "drop it: a remote job runs as its server runs it")
        self.executor = resolve_executor(executor, user_span)  # a RayCluster: workers compute the shards
        if self.remote is not None and self.executor is not None:
            raise InterventionError.at(user_span(), "a sweep runs on a server (remote=) or on a Ray cluster "
                                       "(executor=), not both", "drop one of them")
        self.compile = compile_mode(compile, user_span)
        self.shard_size = max(shard_size, batch_size)
        self.progress = sys.stderr.isatty() if progress is None else progress
        self.describe = describe or {}
        self.groups: list[tuple[tuple[str, ...], list[tuple[Any, ...]]]] = []  # parameter axes
        self.results: Results | None = None
        self.ran = 0  # prompts run by this call (a resumed sweep skips those already written)

    # ------------------------------------------------------------------------------ recording
    def __enter__(self) -> "Sweep":
        self.total = count_rows(self.sources)
        self.batch = max(1, min(self.batch_size, self.total))
        first = list(itertools.islice(zip_rows(self.sources), self.batch))
        self._first = first + [first[-1]] * (self.batch - len(first)) if first else []
        if not first:
            raise InterventionError.at(user_span(), "the sweep has no prompts")
        implicit = list(self.sources) == [IMPLICIT]
        self.invokes: list[str] = [IMPLICIT] if implicit else []
        self.tracer = self.model.scan([r[IMPLICIT] for r in self._first]) if implicit else self.model.scan()
        self.fan = fan.FanState(rows=self.batch)
        self.tracer.fan = self.fan
        if self.generate is not None:
            self.tracer.generation = _generation(self.model, self.generate)
        self.tracer.__enter__()
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> bool:
        self.tracer.__exit__(exc_type, exc, tb)
        if exc_type is None:
            self._run()
        return False

    def invoke(self, name: str) -> Invoker:
        """The body of one named prompt source (`model.sweep({"clean": ..., "corrupt": ...})`)."""
        if name not in self.sources:
            raise InterventionError.at(user_span(), f"unknown prompt {name!r}",
                                       did_you_mean(name, self.sources) or f"prompts: {', '.join(self.sources)}")
        self.invokes.append(name)
        return self.tracer.invoke([r[name] for r in self._first])

    def all(self) -> StepBlock:
        """In a generating sweep: `with sweep.all():` applies its body at every step."""
        return self.tracer.all()

    @property
    def iter(self) -> StepSelector:
        """In a generating sweep: `with sweep.iter[a:b]:` applies its body at the chosen steps."""
        return self.tracer.iter

    def param(self, name: str, values: Iterable[Any]) -> Any:
        """A swept value. Integers (layer indices, positions) are vectorised: their points ride in
        the batch as extra rows, in one graph. Numbers and tensors are parameters: the batch runs
        once per value, in the same graph. Axes combine as a grid."""
        values = self._values(name, values)
        if all(type(v) is int for v in values):
            if self.fan.expanded:
                raise InterventionError.at(user_span(), f"declare the integer axis {name!r} before the "
                                           "first write that uses an integer axis")
            self.fan.axes[name] = values
            return fan.axis(self.tracer, name)
        values = [float(v) if isinstance(v, int | float) else v for v in values]
        self.groups.append(((name,), [(v,) for v in values]))
        return self.tracer.named_param(name, values[0])

    def zip(self, **axes: Iterable[Any]) -> tuple[Any, ...]:
        """Parameters that move together: `a, b = sweep.zip(a=[...], b=[...])` runs (a[i], b[i])."""
        lists = {name: [float(v) if isinstance(v, int | float) else v for v in self._values(name, values)]
                 for name, values in axes.items()}
        if len({len(v) for v in lists.values()}) > 1:
            raise InterventionError.at(user_span(), "zipped axes need the same number of values: " +
                                       ", ".join(f"{k} has {len(v)}" for k, v in lists.items()))
        self.groups.append((tuple(lists), list(zip(*lists.values(), strict=True))))
        return tuple(self.tracer.named_param(name, values[0]) for name, values in lists.items())

    def _values(self, name: str, values: Iterable[Any]) -> list[Any]:
        taken = {n for names, _ in self.groups for n in names} | set(self.fan.axes)
        if not name.isidentifier() or name in taken or name.startswith("__"):
            raise InterventionError.at(user_span(), f"{name!r} cannot name a sweep axis",
                                       "use a new identifier" + (" (it is already an axis)" if name in taken else ""))
        values = list(values)
        if not values:
            raise InterventionError.at(user_span(), f"sweep axis {name!r} has no values")
        return values

    # -------------------------------------------------------------------------------- running
    def _run(self) -> None:
        program = self.tracer.program()
        if program.generation is None:  # a generation computes the logits itself, and runs to its end
            program = stop_after_last_site(program)
        kwargs = {"logits_to_keep": 1} if program.generation is None and self.remote is None and \
            self.tracer.engine.last_position_head(program) else {}  # a job sends token ids only: the server decides
        axis_names = {n for names, _ in self.groups for n in names}
        points = [dict(itertools.chain.from_iterable(zip(names, combo, strict=True) for (names, _), combo
                                                     in zip(self.groups, combos, strict=True)))
                  for combos in itertools.product(*(values for _, values in self.groups))]
        plan = SweepPlan(
            program, {k: v for k, v in self.tracer.params.items() if k not in axis_names}, points,
            dict(self.fan.axes), [(n, i in self.fan.expanded) for i, n in enumerate(self.invokes)],
            self.batch, self.shard_size, kwargs,
            {op.target: op.span for op in program.ops if op.opcode == "save"},
            self._length_dependent(program))
        plan.shared, plan.schedule = self._schedule(plan)
        runs = -(-self.total // self.batch) * len(points)
        self.mode = self.compile if self.remote is not None else sweep_mode(self.compile, self.tracer.engine.module, runs)
        if self.executor is not None and self.out is not None and not self.restart:
            # before every worker loads the model: the weights are the one thing not known yet
            refuse_other_run(self.out, self._header(plan, None, weights=""), unknown=("weights",))
        with contextlib.ExitStack() as stack:
            pool = None if self.executor is None else stack.enter_context(
                self.executor.pool(self.model, plan, self.invokes, self.mode, self.progress))
            header = self._header(plan, pool)
            if self.out is None:
                memory = MemorySink(header, annotate=self._texts())
                self._execute(plan, memory, pool)
                self.results = memory.results()
                return
            with ShardSink(self.out, header, restart=self.restart, annotate=self._texts()) as sink:
                if sink.damaged:
                    warnings.warn(DamagedResultsWarning(
                        "recomputing " + "; ".join(f"{d['file']} (it {d['reason']})" for d in sink.damaged)),
                        stacklevel=3)
                self._execute(plan, sink, pool)
            self.results = load_results(self.out)

    def _texts(self) -> Annotate | None:
        """For a generation: each row's generated text, per invoke (decoded from its ids)."""
        if self.generate is None:
            return None
        tokenizer = getattr(self.model, "tokenizer", None)

        def texts(tensors: dict[str, torch.Tensor], rows: list[dict[str, str]]) -> dict[str, Any]:
            per_prompt = len(tensors["__prompt__"]) // len(rows)  # rows: prompt, then grid point
            notes = {}
            for name in dict.fromkeys(self.invokes):
                notes[f"prompt:{name}"] = [row[name] for row in rows for _ in range(per_prompt)]
                notes[f"text:{name}"] = [_decode(tokenizer, ids) for ids in tensors[GENERATED + name]]
            return notes
        return texts

    def _length_dependent(self, program: Program) -> frozenset[str]:
        """The saves whose shape changes with the prompts' length: checked on the first batch and on
        it one (padding) token longer. A program that does not check longer tells nothing here."""
        engine, batch, params = self.tracer.engine, self.tracer.batch(), self.tracer.params
        if "input_ids" not in batch.kwargs:
            return frozenset()  # not token inputs: a module with no prompt length
        try:
            first, longer = (engine.run(program, b, params, execute=False)[1].values
                             for b in (batch, _one_token_longer(batch)))
        except InterventionError:
            return frozenset()
        return frozenset(op.target for op in program.ops if op.opcode == "save"
                         and _shape(first.get(op.refs()[0])) != _shape(longer.get(op.refs()[0])))

    def _schedule(self, plan: SweepPlan) -> tuple[Rows | None, dict[str, Any]]:
        """How a vectorised axis's rows run: the shared-prefix schedule (a point's rows join the
        batch at the layer it writes, runtime/shared_prefix.py) when the program and the model allow
        it on the first batch, else every point's rows from the start, with the reason."""
        expanded = [i for i, (_, e) in enumerate(plan.invokes) if e]
        if len(plan.fan_axes) != 1 or len(expanded) != 1 or self.remote is not None:
            return None, {"name": "vectorised"} if plan.fan_axes else {"name": "plain"}
        (axis, values), = plan.fan_axes.items()
        rows = (axis, len(values), expanded[0])
        engine, batch = self.tracer.engine, self.tracer.batch()
        typed = engine.run(plan.program, batch, {**plan.params, **plan.points[0]}, execute=False)[0]
        schedule = engine.shared_prefix(typed, batch, rows)
        if isinstance(schedule, str):
            return None, {"name": "vectorised", "why_not_shared_prefix": schedule}
        return rows, schedule.describe()

    def _execute(self, plan: SweepPlan, sink: ShardSink, pool: Pool | None) -> None:
        lengths = prompt_lengths(getattr(self.model, "tokenizer", None), sorted(set(self.invokes)))
        run = self.tracer.engine.run if self.remote is None else \
            dataclasses.replace(self.remote, quiet=True).runner(self.tracer.engine)  # the bar shows progress
        sources = ", ".join(_source_text(s) for s in self.sources.values())
        start = sink.done
        with _Progress(self.total, start, self.progress) as bar:
            def advance(n: int) -> None:
                self.ran += n
                bar.update(n)
            if pool is not None:
                pool.run(pending_windows(plan, lambda: zip_rows(self.sources), sink, lengths, sources),
                         sink, advance, bar.workers)
                return
            execute = batch_runner(self.model, plan, self.invokes, self.mode, run)
            run_sweep(plan, lambda: zip_rows(self.sources), execute, sink, lengths, advance, sources)

    def _served(self) -> dict[str, str]:
        """A remote sweep's model and weights, as the server names them; its parameters must have
        the local model's names and shapes (the program was checked against those)."""
        served = self.remote.describe()  # type: ignore[union-attr]
        if served["architecture"] != architecture_fingerprint(self.tracer.engine.module):
            raise InterventionError.at(
                self.remote.origin or user_span(),  # type: ignore[union-attr]
                f"the server at {self.remote.url} serves {served['model']}, whose parameters differ in names "  # type: ignore[union-attr]
                f"or shapes from those of {self.tracer.engine.name}, which this sweep was checked against",
                "check against the model the server serves (--model, or LanguageModel(name, weights='fake'))")
        return {"model": served["model"], "weights": served["weights"], "server": self.remote.url}  # type: ignore[union-attr]

    def _header(self, plan: SweepPlan, pool: Pool | None, weights: str | None = None) -> dict[str, Any]:
        """The manifest's identity and description; `weights` when already known (else computed)."""
        if weights is None and self.remote is None:  # a remote run names the server's (_served)
            weights = pool.weights if pool is not None else weights_fingerprint(self.tracer.engine.module)
        dims = [("+".join(names), len(values)) for names, values in self.groups]
        dims += [(name, len(values)) for name, values in plan.fan_axes.items()]
        return {
            **self.describe,
            "ir_hash": plan.program.structural_hash(),
            "values": {name: value_digest(value) for name, value in sorted(plan.params.items())},
            **(self._served() if self.remote is not None else {"model": self.tracer.engine.name, "weights": weights}),
            **({"executor": pool.describe()} if pool is not None else {}),
            "prompts": {n: _describe_source(s) for n, s in self.sources.items()},
            "n_prompts": self.total,
            "points": [{k: plain_value(v) for k, v in p.items()} for p in plan.points],
            "fan_axes": plan.fan_axes, "dims": dims, "batch_size": plan.batch_size,
            "shard_prompts": plan.shard_prompts, "schedule": plan.schedule,
            "compile": self.mode if self.mode == self.compile else {"auto": self.mode},
            "passes": (["stop_after_last_site"] if plan.program.generation is None else [])
            + (["logits_to_keep=1"] if plan.model_kwargs else []),
            **({"generate": self.generate} if self.generate is not None else {}),
            "versions": versions(), "ir": to_json(plan.program, spans=False),
        }


def _generation(model: Any, generate: dict[str, Any]) -> Generation:
    """`generate=` of `model.sweep`: the keyword arguments of `model.generate`, checked."""
    settings = getattr(model, "generation_settings", None)
    if settings is None:
        raise InterventionError.at(user_span(), "only a language model generates",
                                   "drop generate=, or load the model with LanguageModel")
    allowed = list(inspect.signature(settings).parameters)
    unknown = sorted(set(generate) - set(allowed))
    if unknown:
        raise InterventionError.at(user_span(), f"generate= got unexpected argument(s) {', '.join(unknown)}",
                                   did_you_mean(unknown[0], allowed) or f"it takes {', '.join(allowed)}")
    return settings(**generate)


def batch_runner(model: Any, plan: SweepPlan, invokes: list[str], compile: str,
                 run: Callable[..., Any] | None = None) -> Execute:
    """How one batch of a sweep runs on `model` (`run`: its engine's, or a remote server's):
    a forward's saves, or a generation's saves as columns with the new token ids per invoke."""
    run = run or model._engine.run

    def execute(inputs: list[InvokeInput], params: dict[str, Any]) -> dict[SaveKey, Any]:
        batch = model._target.batch(inputs)
        shared = {"shared": plan.shared} if plan.shared is not None else {}
        result = run(plan.program, batch, params, compile=compile, **shared)[1]
        if plan.program.generation is None:
            return result.saved
        return {**steps_as_columns(result.saved),
                **_generated_ids(result.output, batch, plan.program.generation.max_new_tokens, invokes)}
    return execute


def prompt_lengths(tokenizer: Any, names: list[str]) -> Lengths:
    """A prompt row's token count per prompt name (0 without a tokenizer)."""
    def lengths(row: dict[str, str]) -> tuple[int, ...]:
        if tokenizer is None:
            return (0,)
        return tuple(len(tokenizer(row[n], add_special_tokens=True)["input_ids"]) for n in names)
    return lengths


GENERATED = "__ids__:"  # + prompt name: a generation's new token ids per row, [rows, max_new_tokens]


def _generated_ids(output: torch.Tensor | None, batch: Batch, steps: int,
                   invokes: list[str]) -> dict[SaveKey, torch.Tensor]:
    """The tokens a generation added, per invoke, padded to `steps` (rows that all ended early)."""
    if output is None:  # a `stop` ended the generation
        return {}
    new = output[:, batch.kwargs["input_ids"].shape[1]:]
    new = torch.nn.functional.pad(new, (0, steps - new.shape[1]), value=batch.pad_id)
    return {SaveKey(GENERATED + name): new[rows] for name, rows in zip(invokes, batch.rows, strict=True)}


def steps_as_columns(saved: dict[SaveKey, Any]) -> dict[SaveKey, Any]:
    """A generation's saves as sweep columns: a steps block's save is stacked into one value
    [rows, steps, ...] when every step's value has one shape, else kept as a column per step."""
    groups: dict[tuple[str, Any], list[SaveKey]] = {}
    for key in saved:
        groups.setdefault((key.name, key.point), []).append(key)
    out: dict[SaveKey, Any] = {}
    for (name, point), keys in groups.items():
        values = [saved[k] for k in sorted(keys, key=lambda k: k.step or 0)]
        stackable = all(isinstance(v, torch.Tensor) and v.dim() for v in values) and \
            len({v.shape for v in values}) == 1
        if keys[0].step is not None and stackable:
            out[SaveKey(name, None, point)] = torch.stack(values, dim=1)
        else:
            out.update((SaveKey(tensor_name(k), None, k.point), saved[k]) for k in keys)
    return out


def _decode(tokenizer: Any, ids: torch.Tensor) -> str:
    if tokenizer is None:
        return " ".join(map(str, ids.tolist()))
    return tokenizer.decode(ids, skip_special_tokens=True)


def _describe_source(source: Source) -> dict[str, Any]:
    if isinstance(source, PromptFile):
        return source.describe()
    if len(source) <= 8:
        return {"literal": source}
    digest = hashlib.sha256("\0".join(source).encode()).hexdigest()[:16]
    return {"literal": source[:2], "rows": len(source), "sha256": digest}


def _source_text(source: Source) -> str:
    return str(source.path) if isinstance(source, PromptFile) else "the prompts given as a list"


def plain_value(value: Any) -> Any:
    """A sweep value as JSON data (a tensor as a list)."""
    return value.tolist() if isinstance(value, torch.Tensor) else value


def _sources(prompts: Any) -> dict[str, Source]:
    if isinstance(prompts, dict):
        return {name: _source(value) for name, value in prompts.items()}
    return {IMPLICIT: _source(prompts)}


def _source(value: Any) -> Source:
    if isinstance(value, PromptFile):
        return value
    if isinstance(value, Path):
        return PromptFile.of(value)
    if isinstance(value, str):
        return [value]
    rows = list(value)
    if not rows or not all(isinstance(r, str) for r in rows):
        raise InterventionError.at(user_span(), "sweep prompts are a list of strings, a PromptFile, "
                                   "a Path to a .txt/.jsonl/.csv file, or a dict of those")
    return rows


def _one_token_longer(batch: Batch) -> Batch:
    """`batch` with one more padding position on the left of every per-token input."""
    length = batch.kwargs["input_ids"].shape[1]

    def pad(value: Any) -> Any:
        per_token = isinstance(value, torch.Tensor) and value.dim() == 2 and value.shape[1] == length
        return torch.nn.functional.pad(value, (1, 0)) if per_token else value
    return dataclasses.replace(batch, kwargs={k: pad(v) for k, v in batch.kwargs.items()})


def _shape(value: Any) -> Any:
    return tuple(value.shape) if hasattr(value, "shape") else type(value).__name__


class _Progress:
    """A tqdm bar (prompts/s, ETA) on stderr, or nothing."""

    def __init__(self, total: int, initial: int, enabled: bool):
        self.bar = None
        if enabled:
            from tqdm import tqdm
            self.bar = tqdm(total=total, initial=initial, unit="prompt", dynamic_ncols=True, file=sys.stderr)

    def __enter__(self) -> "_Progress":
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.bar is not None:
            self.bar.close()

    def update(self, n: int) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def workers(self, alive: int) -> None:
        """Show how many workers are computing shards."""
        if self.bar is not None:
            self.bar.set_postfix(workers=alive)

