"""Model wrappers: `Model` (alias `NNsight`) for any torch module, `LanguageModel` for HF causal LMs."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from compiler.errors import InterventionError, did_you_mean
from compiler.ir import SITE_KINDS, Generation
from compiler.signatures import GENERATOR
from interp_dsl import embedded
from interp_dsl.edits import Editor
from interp_dsl.envoy import Envoy
from interp_dsl.session import Session, current_session
from interp_dsl.spans import user_span
from interp_dsl.sweeps import Sweep
from interp_dsl.tracing import Target, Tracer
from runtime.compiled import CompileStats
from runtime.decode import DecodePlan, positions_of
from runtime.engine import CompileFallbackWarning as CompileFallbackWarning  # public as interp_dsl's
from runtime.engine import Engine
from runtime.interpreter import Batch
from runtime.modes import compile_mode
from runtime.sweep_runner import InvokeInput


class Model:
    """Wraps a `torch.nn.Module` for tracing. Attribute access walks its module tree:
    `model.layer1.output` inside `with model.trace(x):` is the output of `layer1`.

    `source`: the module, or an `Engine` that already wraps one (then its site tables, weights and
    name are the engine's)."""

    def __init__(self, source: torch.nn.Module | Engine):
        engine = source if isinstance(source, Engine) else Engine(source, where=user_span)
        object.__setattr__(self, "_engine", engine)
        object.__setattr__(self, "_target", Target(engine, self._batch))
        object.__setattr__(self, "_envoy", Envoy(self, engine.module, "", engine.root))
        object.__setattr__(self, "_edits", ())  # persistent edits (interp_dsl/edits.py)

    # -------------------------------------------------------------------------- user surface
    def trace(self, *args: Any, compile: str | None = None, remote: Any = False, **kwargs: Any) -> Tracer:
        """`with model.trace(input):` record interventions, then check and run them on exit.
        Without an input, add inputs with `tracer.invoke(...)`; they run as one batch.

        `compile`: "off" (the reference interpreter, hooks), "graph" (the program spliced into
        the captured forward graph), "inductor" (that graph compiled), "cudagraphs" (inductor
        with CUDA graphs), or "auto": compiled only where it pays (an experiment repeated on a
        GPU); a one-off trace on a CPU runs the reference interpreter. The default is "auto", or
        the environment variable IVX_COMPILE.

        `remote`: True runs the trace on the `ivx serve` named by IVX_REMOTE_URL (key:
        IVX_API_KEY), or pass `interp_dsl.remote(url, api_key)`. It is checked here first, so a
        model built from its config (`weights="fake"`) is enough."""
        from interp_dsl.client import resolve
        server = resolve(remote)
        session = current_session()
        if server is None and session is not None:
            server = session.remote
        if server is not None and compile not in (None, "auto", "off"):
            raise InterventionError.at(user_span(), f"compile={compile!r} chooses how a local run executes",
                                       "drop it: a remote job runs as its server runs it")
        compile = compile_mode(compile, user_span)
        if self._engine.fake_mode is not None and server is None:
            raise InterventionError.at(
                user_span(), "this model has no weights (built from a config for checking)",
                "use model.scan(...) to check shapes, run remotely (remote=True), or load real weights to run")
        tracer = Tracer(self._target, (args, kwargs) if args or kwargs else None, compile=compile, edits=self._edits)
        tracer.remote = server
        return tracer

    def sweep(self, prompts: Any, *, batch_size: int = 32, out: str | Path | None = None,
              compile: str | None = None, shard_size: int = 1024, progress: bool | None = None,
              restart: bool = False, generate: dict[str, Any] | None = None, remote: Any = False,
              executor: Any = "local") -> Sweep:
        """`with model.sweep(prompts, batch_size=32, out="runs/x") as sweep:` run the body (a trace
        body; `sweep.param(name, values)` declares swept values) over every prompt and grid point.

        `prompts`: a list of strings, a `PromptFile` (or a Path to .txt/.jsonl/.csv, streamed), or a
        dict name -> those, zipped row by row and used with `sweep.invoke(name)`. With `out`,
        results go to safetensors shards and a manifest there (a rerun resumes, recomputing any
        damaged shard; a directory holding another experiment is refused unless `restart` discards
        it); afterwards `sweep.results` holds them. `compile` as in `trace`; `progress`: a bar
        (default: on a TTY). `generate`: the arguments of `model.generate` (`{"max_new_tokens": 8}`):
        each batch generates, `sweep.all()` / `sweep.iter[...]` are step blocks, and the results
        hold each row's new tokens (`results["__ids__:prompts"]`) and text (`results.texts`).
        `remote` as in `trace`: each batch runs as a job on the server, the shards are written here.
        `executor="ray"` (or `interp_dsl.ray_cluster(address, workers)`): Ray workers, each loading
        the model from the source this one was loaded from, compute the shards; they are written here."""
        if self._engine.fake_mode is not None and not remote and executor in (None, "local"):
            raise InterventionError.at(user_span(), "this model has no weights (built from a config for checking)",
                                       "load real weights to run a sweep, or run it remotely (remote=True) "
                                       "or on Ray workers (executor='ray')")
        return Sweep(self, prompts, batch_size=batch_size, out=out, compile=compile, shard_size=shard_size,
                     progress=progress, restart=restart, generate=generate, remote=remote, executor=executor)

    def scan(self, *args: Any, **kwargs: Any) -> Tracer:
        """Like `trace`, but only checks on fake tensors: shapes and dtypes, no values computed."""
        return Tracer(self._target, (args, kwargs) if args or kwargs else None, execute=False, edits=self._edits)

    def edit(self, inplace: bool = False) -> Editor:
        """`with model.edit() as edited:` interventions written in the block (as in a trace, without
        an input) become part of every later trace on `edited`, for each of its invokes and every
        generation step; `model` is unchanged. With `inplace=True`, `model` itself is edited.
        Edits accumulate; `clear_edits()` removes them."""
        return Editor(self, inplace)

    def session(self, remote: Any = False) -> Session:
        """`with model.session() as session:` the traces in the block run in order, and a value a
        trace computed is available to the traces after it without `.save()` (on any model);
        `session.exit()` ends the block early. `remote` as in `trace`: the traces in the block run
        there. See interp_dsl/session.py."""
        return Session(remote)

    def clear_edits(self) -> None:
        """Remove this model's persistent edits (from `edit(inplace=True)`, or of an edited copy)."""
        object.__setattr__(self, "_edits", ())

    def compile_stats(self) -> CompileStats:
        """Counters of compiled execution on this model (artefacts, compilations, calls, fallbacks)."""
        return self._engine.compile_stats()

    def release_compiled(self) -> None:
        """Forget this model's compiled graphs and remove the marker hooks they keep installed."""
        self._engine.release_compiled()

    @property
    def module(self) -> torch.nn.Module:
        """The wrapped torch module."""
        return self._engine.module

    @property
    def _tracer(self) -> Tracer | None:
        """The trace open on this model, if any (module access records there)."""
        return self._target.open

    @property
    def _paths(self) -> dict[int, str]:
        return self._engine.paths

    def __getattr__(self, name: str) -> Any:
        return getattr(self._envoy, name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name in SITE_KINDS:
            setattr(self._envoy, name, value)
        else:
            object.__setattr__(self, name, value)

    def __getitem__(self, index: int) -> Envoy:
        return self._envoy[index]

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._envoy(*args, **kwargs)

    def __repr__(self) -> str:
        return repr(self._engine.module)

    # ------------------------------------------------------------------------------ inputs
    def _batch(self, invokes: list[InvokeInput]) -> Batch:
        """Concatenate the invokes' tensor arguments along the batch dimension."""
        per_invoke = [self._invoke_tensors(args, kwargs) for args, kwargs in invokes]
        sizes = [_batch_size(args, kwargs) for args, kwargs in per_invoke]
        rows = tuple(slice(sum(sizes[:i]), sum(sizes[: i + 1])) for i in range(len(sizes)))
        if len(per_invoke) == 1:
            args, kwargs = per_invoke[0]
        else:
            args = tuple(_concat([a[i] for a, _ in per_invoke]) for i in range(len(per_invoke[0][0])))
            kwargs = {k: _concat([kw[k] for _, kw in per_invoke]) for k in per_invoke[0][1]}
        return Batch(args, kwargs, rows, sum(sizes))

    def _invoke_tensors(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> InvokeInput:
        return args, kwargs


NNsight = Model


class LanguageModel(Model):
    """A HF causal language model with its tokenizer.

    `source` may be the embedded default `"smollm2-135m"` (or its hub id), a local HF directory,
    a `.gguf` file, a loaded `PreTrainedModel` (pass `tokenizer=`), or a config: a
    `PretrainedConfig` or a `config.json` path (random weights, or `weights="fake"` for checking
    without any weight memory; a tokenizer saved beside the file is used). A name, directory or
    `.gguf` file with `weights="fake"` reads only its config (to check, or to trace remotely). An `Engine` whose
    module has a `config` is used as it is (`ivx check` builds one from a config alone).
    """

    def __init__(self, source: Any, tokenizer: Any = None, *, weights: str = "random",
                 dtype: torch.dtype = torch.float32, **ignored: Any):
        if isinstance(source, Engine):
            engine = source
        elif weights == "fake" and isinstance(source, (str, Path)) and not str(source).endswith(".json"):
            from interp_dsl.config_models import (
                config_model_for,  # a name, directory or .gguf: read its config only
            )
            built = config_model_for(str(source))
            engine = built._engine
            tokenizer = tokenizer or (built.tokenizer.loaded() if built.tokenizer is not None else None)
        else:
            module, fake_mode, tokenizer = _load(source, tokenizer, weights, dtype)
            module.eval()
            name = str(source) if isinstance(source, (str, Path)) else None
            engine = Engine(module, fake_mode=fake_mode, name=name, where=user_span)
        super().__init__(engine)
        if tokenizer is not None:
            tokenizer.padding_side = "left"
            if tokenizer.pad_token_id is None:
                tokenizer.pad_token = tokenizer.eos_token
        object.__setattr__(self, "tokenizer", tokenizer)
        object.__setattr__(self, "config", engine.module.config)

    def generate(self, *args: Any, max_new_tokens: int = 20, do_sample: bool = False,
                 temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                 seed: int | None = None, compile: str | None = None, **kwargs: Any) -> Tracer:
        """`with model.generate(prompt, max_new_tokens=N) as tracer:` generate N tokens (one batch
        for all invokes, KV-cached) with interventions. Outside a step block they apply to step 0
        (the prompt pass); `with tracer.all():` applies its body at every step, `tracer.iter[a:b]`
        at the chosen steps, and `module.next()` moves to the module's next call (the next step).
        A save inside a step block is a list with one value per step. `model.generator.output`
        is the prompt and generated ids. Greedy unless `do_sample=True` (then `temperature`,
        `top_k`, `top_p`; `seed` makes it reproducible). `compile` as in `trace`: a compiled
        generation runs every decode step as one graph with a static KV cache. `remote` as in
        `trace`."""
        remote = kwargs.pop("remote", False)
        unknown = sorted(kwargs)
        if unknown:
            raise InterventionError.at(
                user_span(), f"generate() got unexpected argument(s) {', '.join(unknown)}",
                did_you_mean(unknown[0], ["max_new_tokens", "do_sample", "temperature", "top_k", "top_p",
                                          "seed", "compile", "remote"]) or
                "it takes max_new_tokens, do_sample, temperature, top_k, top_p, seed, compile and remote")
        settings = self.generation_settings(max_new_tokens, do_sample, temperature, top_k, top_p, seed)
        tracer = self.trace(*args, compile=compile, remote=remote)
        tracer.generation = settings
        return tracer

    def generation_settings(self, max_new_tokens: int = 20, do_sample: bool = False, temperature: float = 1.0,
                            top_k: int | None = None, top_p: float | None = None,
                            seed: int | None = None) -> Generation:
        """A generation's settings as IR, checked (located errors for bad values)."""
        try:
            settings = Generation(int(max_new_tokens), bool(do_sample), float(temperature),
                                  None if top_k is None else int(top_k), None if top_p is None else float(top_p),
                                  None if seed is None else int(seed))
            DecodePlan.of(settings, None, 0)  # validates
        except (ValueError, TypeError) as e:
            raise InterventionError.at(user_span(), f"generate(): {e}") from None
        return settings

    @property
    def generator(self) -> "GeneratorEnvoy":
        """Inside `model.generate(...)`: `model.generator.output` is the prompt and generated ids."""
        return GeneratorEnvoy(self)

    # ------------------------------------------------------------------------------ inputs
    def _invoke_tensors(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> InvokeInput:
        if len(args) != 1:
            raise InterventionError.at(user_span(), f"an invoke of a LanguageModel takes one input "
                                       f"(text, token ids or a tokenizer output), got {len(args)}")
        ids, mask = self._tokenize(args[0])
        return (), {"input_ids": ids, "attention_mask": mask, **kwargs}

    def _tokenize(self, data: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids and attention mask of one invoke's input; an empty prompt, or one longer
        than the model's context, is an error at the user's line."""
        texts = _texts(data)
        if texts is not None:
            if self.tokenizer is None:
                raise InterventionError.at(user_span(), "this model has no tokenizer; pass token ids",
                                           "or give LanguageModel(model, tokenizer=...)")
            enc = self.tokenizer(data, return_tensors="pt", padding=True)
            ids, mask = enc["input_ids"], enc["attention_mask"]
        else:
            ids, mask = _token_ids(data)
        _check_lengths(mask, texts, getattr(self.config, "max_position_embeddings", None))
        return ids, mask

    def _batch(self, invokes: list[InvokeInput]) -> Batch:
        per = [self._invoke_tensors(a, k)[1] for a, k in invokes]
        length = max(p["input_ids"].shape[1] for p in per)
        pad = getattr(self.tokenizer, "pad_token_id", None) or 0
        ids = torch.cat([_left_pad(p["input_ids"], length, pad) for p in per])
        mask = torch.cat([_left_pad(p["attention_mask"], length, 0) for p in per])
        sizes = [p["input_ids"].shape[0] for p in per]
        rows = tuple(slice(sum(sizes[:i]), sum(sizes[: i + 1])) for i in range(len(sizes)))
        extra = {k: v for k, v in per[0].items() if k not in ("input_ids", "attention_mask")}
        device = self._input_device()
        ids, mask = ids.to(device), mask.to(device)
        kwargs = {"input_ids": ids, "attention_mask": mask, "use_cache": False, **extra}
        if "position_ids" in self._engine.forward_params:
            # Left padding must not shift positions: each row equals its unpadded run.
            kwargs["position_ids"] = positions_of(mask)
        return Batch((), kwargs, rows, ids.shape[0], pad)

    def _input_device(self) -> torch.device:
        """Where token ids go: the device of the model's weights (a GPU model gets GPU inputs)."""
        if self._engine.fake_mode is not None:
            return torch.device("cpu")
        weight = next(self._engine.module.parameters(), None)
        return weight.device if weight is not None and weight.device.type != "meta" else torch.device("cpu")


class GeneratorEnvoy:
    """`model.generator`: its `.output` is a generation's ids, prompt first (nnsight's spelling)."""

    def __init__(self, model: Model):
        self._model = model

    @property
    def output(self) -> Any:
        tracer = self._model._tracer
        if tracer is None or not tracer.recording or tracer.generation is None:
            raise InterventionError.at(user_span(), "model.generator.output exists only inside "
                                       "`with model.generate(...)`", "use model.generate(prompt, max_new_tokens=N)")
        return tracer.read(tracer.site(GENERATOR, "output"))


def _texts(data: Any) -> list[str] | None:
    """An invoke's prompts as text (None for token ids); an empty prompt or list is an error."""
    if isinstance(data, list) and not data:
        raise InterventionError.at(user_span(), "an invoke's input is an empty list",
                                   "expected a prompt: text, a list of texts, or token ids")
    if not isinstance(data, str) and not (isinstance(data, list) and isinstance(data[0], str)):
        return None
    texts = [data] if isinstance(data, str) else data
    for i, text in enumerate(texts):
        if not text:
            where = f" (item {i} of {len(texts)})" if len(texts) > 1 else ""
            raise InterventionError.at(user_span(), f"an empty prompt{where}: expected text, found \"\"",
                                       "give the prompt at least one token of text")
    return texts


def _token_ids(data: Any) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(data, dict) or hasattr(data, "keys"):
        ids = torch.as_tensor(data["input_ids"])
        mask = torch.as_tensor(data["attention_mask"]) if "attention_mask" in data else None
    else:
        ids, mask = torch.as_tensor(data), None
    if ids.dim() == 1:
        ids = ids[None]
        mask = mask[None] if mask is not None and mask.dim() == 1 else mask
    if ids.dim() != 2:
        raise InterventionError.at(user_span(), f"token ids have shape {list(ids.shape)}",
                                   "expected [batch, tokens] or [tokens]")
    return ids.long(), (torch.ones_like(ids) if mask is None else mask.long())


def _check_lengths(mask: torch.Tensor, texts: list[str] | None, context: int | None) -> None:
    """Every row has at least one token, and no more than the model's context."""
    for i, n in enumerate(mask.sum(-1).tolist()):
        prompt = _show(texts[i]) if texts is not None else f"row {i} of the token ids"
        if n == 0:
            raise InterventionError.at(user_span(), f"prompt {prompt} has no tokens: expected at least one",
                                       "give a prompt with text the tokenizer keeps")
        if context is not None and n > context:
            raise InterventionError.at(
                user_span(), f"prompt {prompt} is {n} tokens long; the model's context is {context} tokens",
                "shorten the prompt, or split it into several")


def _show(text: str, width: int = 40) -> str:
    return repr(text if len(text) <= width else text[:width] + "...")


def _left_pad(t: torch.Tensor, length: int, value: int) -> torch.Tensor:
    return torch.nn.functional.pad(t, (length - t.shape[1], 0), value=value)


def _concat(values: list[Any]) -> Any:
    if isinstance(values[0], torch.Tensor):
        return torch.cat(values)
    if any(v != values[0] for v in values[1:]):
        raise InterventionError.at(user_span(), "invokes pass different non-tensor arguments",
                                   "non-tensor arguments must agree across invokes of one batch")
    return values[0]


def _batch_size(args: tuple[Any, ...], kwargs: dict[str, Any]) -> int:
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return int(value.shape[0])
    raise InterventionError.at(user_span(), "an invoke's input has no tensor to batch",
                               "pass a tensor whose first dimension is the batch")


def _load(source: Any, tokenizer: Any, weights: str, dtype: torch.dtype) -> tuple[torch.nn.Module, FakeTensorMode | None, Any]:
    """The module a LanguageModel's source names, its fake mode (fake weights), and its tokenizer."""
    if isinstance(source, torch.nn.Module):
        return source, None, tokenizer
    if _is_config(source):
        return *_from_config(source, weights), tokenizer
    if isinstance(source, (str, Path)) and str(source).endswith(".json"):
        return *_from_config(_read_config(Path(source)), weights), tokenizer or _tokenizer_beside(Path(source))
    if isinstance(source, (str, Path)):
        directory = _resolve_directory(str(source))
        module = _load_directory(directory, dtype)
        if tokenizer is None:
            from transformers import AutoTokenizer
            tokenizer = AutoTokenizer.from_pretrained(directory)
        return module, None, tokenizer
    raise InterventionError.at(user_span(), f"cannot make a LanguageModel from a {type(source).__name__}",
                               "give a name, a path, a model or a config")


def _is_config(obj: Any) -> bool:
    from transformers import PretrainedConfig
    return isinstance(obj, PretrainedConfig)


def _from_config(config: Any, weights: str) -> tuple[torch.nn.Module, FakeTensorMode | None]:
    from transformers import AutoModelForCausalLM
    if weights == "random":
        _refuse_if_too_big(config)
        return AutoModelForCausalLM.from_config(config), None
    if weights == "fake":
        mode = FakeTensorMode(allow_non_fake_inputs=True)
        with mode:
            return AutoModelForCausalLM.from_config(config), mode
    raise InterventionError.at(user_span(), f"weights must be 'random' or 'fake', got {weights!r}")


def _read_config(path: Path) -> Any:
    from transformers import AutoConfig
    if not path.is_file():
        raise InterventionError.at(user_span(), f"config file {path} does not exist")
    return AutoConfig.from_pretrained(path)


def _tokenizer_beside(path: Path) -> Any:
    """The tokenizer saved next to a config file, if there is one."""
    if not (path.parent / "tokenizer_config.json").exists():
        return None
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(path.parent)


def _refuse_if_too_big(config: Any) -> None:
    """Random weights for a config larger than half this machine's memory would only crash it."""
    from transformers import AutoModelForCausalLM
    with FakeTensorMode():
        fake = AutoModelForCausalLM.from_config(config)
    size = sum(p.numel() * p.element_size() for p in fake.parameters())
    memory = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    if size > memory // 2:
        raise InterventionError.at(
            user_span(), f"random weights for this config need {size / 2**30:.0f} GiB; this machine "
            f"has {memory / 2**30:.0f} GiB", "check specs for it without weights: ivx check FILE, "
            "or LanguageModel(config, weights=\"fake\") and model.scan(...)")


def local_source(source: str) -> str | None:
    """What `source` names on this machine: the embedded model's name, or the absolute path of a
    `.gguf` file or a HF directory; None when it names none of those."""
    if embedded.is_embedded(source):
        return source
    path = Path(source).expanduser()
    if path.suffix == ".gguf" and path.is_file() or path.is_dir() and (path / "config.json").exists():
        return str(path.resolve())
    return None


def _resolve_directory(source: str) -> Path:
    found = local_source(source)
    if found is not None and embedded.is_embedded(found):
        return embedded.cached_dir(embedded.embedded_gguf())
    if found is not None:
        path = Path(found)
        return embedded.cached_dir(path) if path.suffix == ".gguf" else path
    raise InterventionError.at(
        user_span(), f"no model found at {source!r}: there is no model hub at run time",
        f"give a local HF directory, a .gguf file, or the embedded default "
        f"{embedded.EMBEDDED_NAMES[0]!r}")


def _load_directory(directory: Path, dtype: torch.dtype) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging
    shown = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a cached load takes a second; its bar is only noise
    try:
        return AutoModelForCausalLM.from_pretrained(directory, dtype=dtype)
    finally:
        if shown:
            hf_logging.enable_progress_bar()
