"""Models known only by their config, for checking experiments without weights (`ivx check`).

Such a model is a `LanguageModel` over an `Engine` whose module is a skeleton (the model's module
tree of empty modules with fake parameters) and whose site tables come from `ConfigSites`: the
model's symbolic site signature. Tree and signature are cached on disk per config, so a second
check needs no forward at all. Ad-hoc module calls, generation and forwards whose shapes are not
symbolic build the real model lazily, on fake tensors. Token ids come from a disk cache, so the
tokenizer is loaded only for text it has not seen.
"""

from __future__ import annotations

import hashlib
import inspect
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from compiler.errors import InterventionError
from compiler.ir import NO_SPAN, TensorType
from compiler.signatures import SiteTable, quiet_fake_mode, record_sites
from compiler.symbolic import PROBES, Signature, TypeTable, signature_from_tables
from interp_dsl import embedded
from interp_dsl.models import LanguageModel
from interp_dsl.spans import user_span
from runtime.engine import Engine, record_generation
from runtime.files import atomic_write_text
from runtime.interpreter import Batch

CACHE_VERSION = 3
_CONFIGS = Path(__file__).parent / "configs"


# ------------------------------------------------------------------------------------ tokenizer
class CachedTokenizer:
    """The parts of a HF tokenizer a check uses, answered from a disk cache when possible."""

    padding_side = "left"

    def __init__(self, key: str, load: Any):
        self._load, self._real = load, None
        self._path = embedded.cache_root() / "tokens" / f"{key}.json"
        try:
            data = json.loads(self._path.read_text())
        except (OSError, ValueError):
            data = {}
        self._ids: dict[str, list[int]] = data.get("ids", {})
        self._raw: dict[str, list[int]] = data.get("raw", {})
        self.pad_token_id: int = data.get("pad_token_id", -1)
        self._dirty = False

    def _tokenizer(self) -> Any:
        if self._real is None:
            self._real = self._load()
            tok = self._real
            self.pad_token_id = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
            self._dirty = True
        return self._real

    def loaded(self) -> Any:
        """The HF tokenizer itself, loaded: for running prompts (a dataset would fill the cache)."""
        return self._tokenizer()

    def _lookup(self, table: dict[str, list[int]], text: str, special: bool) -> list[int]:
        if text not in table:
            table[text] = list(self._tokenizer()(text, add_special_tokens=special)["input_ids"])
            self._dirty = True
        return table[text]

    def __call__(self, data: Any, return_tensors: str = "pt", padding: bool = True) -> dict[str, torch.Tensor]:
        texts = [data] if isinstance(data, str) else list(data)
        rows = [self._lookup(self._ids, t, True) for t in texts]
        if self.pad_token_id < 0:
            self._tokenizer()
        length = max(len(r) for r in rows)
        ids = torch.tensor([[self.pad_token_id] * (length - len(r)) + r for r in rows])
        mask = torch.tensor([[0] * (length - len(r)) + [1] * len(r) for r in rows])
        return {"input_ids": ids, "attention_mask": mask}

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._lookup(self._ids if add_special_tokens else self._raw, text, add_special_tokens)

    def decode(self, ids: Any) -> str:
        return self._tokenizer().decode(ids)

    def save(self) -> None:
        if self._dirty:
            atomic_write_text(self._path, json.dumps(
                {"ids": self._ids, "raw": self._raw, "pad_token_id": self.pad_token_id}))
            self._dirty = False


# ------------------------------------------------------------------------------------ real model
class RealModel:
    """The real model of a config, built on fake tensors the first time a check needs it."""

    def __init__(self, config: Any, mode: FakeTensorMode):
        self.config, self.mode = config, mode
        self._module: torch.nn.Module | None = None

    def __call__(self) -> torch.nn.Module:
        if self._module is None:
            self._module = _build_real(self.config, self.mode)
        return self._module


def _build_real(config: Any, mode: FakeTensorMode) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM
    with quiet_fake_mode(), mode:
        return AutoModelForCausalLM.from_config(config).eval()


class ConfigSites:
    """Site tables of a model known by its config: from its symbolic signature (no forward at all),
    else from the real model on fake tensors (a forward whose shapes are not symbolic, generation)."""

    def __init__(self, signature: Signature | None, real: RealModel):
        self.signature, self.real = signature, real

    def forward(self, batch: Batch) -> SiteTable:
        if self.signature is None:
            return record_sites(self.real(), (), batch.kwargs, batch.size, self.real.mode)
        ids = batch.kwargs["input_ids"]
        return self.signature.table(self.real.mode, int(ids.shape[0]), int(ids.shape[1]))

    def generation(self, batch: Batch, steps: int) -> SiteTable:
        return record_generation(self.real(), batch, steps, self.real.mode)


def config_model(config: Any, tokenizer: CachedTokenizer | None, key: str, name: str) -> LanguageModel:
    """A causal LM known by its config only (`key` names its disk caches): it checks, never runs."""
    real = RealModel(config, FakeTensorMode(allow_non_fake_inputs=True))
    cache = embedded.cache_root() / "signatures" / f"{key}.json"
    data = _load_cache(cache)
    if data is None:
        data = _describe(real)
        atomic_write_text(cache, json.dumps(data))
    types = TypeTable(data["types"])
    signature = Signature.from_data(data["signature"], types) if data["signature"] else None
    skeleton = _skeleton(data["tree"], types, real)
    object.__setattr__(skeleton, "config", config)
    engine = Engine(skeleton, ConfigSites(signature, real), fake_mode=real.mode, paths={},  # the tree's paths
                    forward_params=frozenset(data["forward_params"]), name=name, where=user_span)
    return LanguageModel(engine, tokenizer)


# ---------------------------------------------------------------------------------------- cache
def _load_cache(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if data.get("version") == CACHE_VERSION else None


def _describe(real: RealModel) -> dict[str, Any]:
    """The cached description of a model: its module tree, forward parameters and site signature."""
    module = real()
    params = inspect.signature(module.forward).parameters
    tables = [record_sites(module, (), _probe_inputs(b, s, "position_ids" in params), b, real.mode)
              for b, s in PROBES]
    signature = signature_from_tables(*tables)
    types = TypeTable()
    tree = _tree(module, types)
    events = signature.to_data(types) if signature else None
    return {"version": CACHE_VERSION, "types": types.to_data(), "tree": tree,
            "forward_params": sorted(params), "signature": events}


# ------------------------------------------------------------------------------------- skeleton
_SKELETON_CLASSES: dict[str, type] = {}


def _skeleton_class(name: str) -> type:
    """An empty module class named like the real one (messages say `LlamaModel`)."""
    if name not in _SKELETON_CLASSES:
        def forward(self: Any, *args: Any, **kwargs: Any) -> Any:
            return self._real().get_submodule(self._path)(*args, **kwargs)
        _SKELETON_CLASSES[name] = type(name, (torch.nn.Module,), {"forward": forward})
    return _SKELETON_CLASSES[name]


def _tree(model: torch.nn.Module, types: TypeTable) -> list[list[Any]]:
    """The module tree as data: [path, class name, {parameter or buffer: type index}]."""
    out = []
    for path, module in model.named_modules():
        tensors = {**{n: p for n, p in module.named_parameters(recurse=False)},
                   **{n: b for n, b in module.named_buffers(recurse=False) if b is not None}}
        out.append([path, type(module).__name__, {
            n: types.index(TensorType(str(t.dtype).removeprefix("torch."), tuple(t.shape)))
            for n, t in tensors.items()}])
    return out


def _skeleton(tree: list[list[Any]], types: TypeTable, real: RealModel) -> torch.nn.Module:
    """The module tree of empty modules, each made (with fake parameters) when first addressed."""
    entries = {path: (class_name, params) for path, class_name, params in tree}
    children: dict[str, list[str]] = {path: [] for path in entries}
    for path in entries:
        if path:
            children[path.rpartition(".")[0]].append(path.rpartition(".")[2])

    def fake(t: TensorType) -> torch.nn.Parameter:
        with real.mode:
            return torch.nn.Parameter(torch.empty(t.shape, dtype=getattr(torch, t.dtype)), requires_grad=False)

    def make(path: str) -> torch.nn.Module:
        class_name, params = entries[path]
        module = _skeleton_class(class_name)()
        object.__setattr__(module, "_real", real)
        object.__setattr__(module, "_path", path)
        module._parameters = _Lazy({n: types[i] for n, i in params.items()}, lambda n, t: fake(t))
        prefix = f"{path}." if path else ""
        module._modules = _Lazy(dict.fromkeys(children[path]), lambda name, _: make(prefix + name))
        return module

    return make("")


class _Lazy(dict):  # type: ignore[type-arg]
    """A skeleton module's children or parameters, each made when first addressed: a check
    touches a few of a 70B model's thousand modules and parameters. Keys are all present (so
    `name in d` and listing work); values are made by `make(name, recipe)` on first access."""

    def __init__(self, recipes: dict[str, Any], make: Any):
        super().__init__((name, _Pending(recipe)) for name, recipe in recipes.items())
        self._make = make

    def __getitem__(self, name: str) -> Any:
        value = super().__getitem__(name)
        if isinstance(value, _Pending):
            value = self._make(name, value.recipe)
            super().__setitem__(name, value)
        return value

    def get(self, name: str, default: Any = None) -> Any:
        return self[name] if name in self else default

    def values(self) -> Any:
        return [self[k] for k in self]

    def items(self) -> Any:
        return [(k, self[k]) for k in self]


@dataclass(frozen=True)
class _Pending:
    recipe: Any


def _probe_inputs(batch: int, seq: int, positions: bool) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"input_ids": torch.zeros(batch, seq, dtype=torch.long),
                              "attention_mask": torch.ones(batch, seq, dtype=torch.long),
                              "use_cache": False}
    if positions:
        kwargs["position_ids"] = torch.arange(seq).expand(batch, seq)
    return kwargs


# -------------------------------------------------------------------------------------- sources
def config_model_for(source: str, base: Path | None = None) -> LanguageModel:
    """A config-only model (see `config_model`) for a model name, HF directory, config.json or
    .gguf file; no weights read."""
    from transformers import AutoConfig, AutoTokenizer

    path = Path(source).expanduser()
    if base is not None and not path.is_absolute() and (base / path).exists():
        path = base / path
    if embedded.is_embedded(source):
        config = AutoConfig.from_pretrained(_CONFIGS / "smollm2-135m.json")
        tokenizer = CachedTokenizer("smollm2-135m", _embedded_tokenizer)
    elif path.suffix == ".json" and path.is_file():
        config = AutoConfig.from_pretrained(path)
        tokenizer = _directory_tokenizer(path.parent)
    elif path.is_dir() and (path / "config.json").exists():
        config = AutoConfig.from_pretrained(path)
        tokenizer = _directory_tokenizer(path)
    elif path.suffix == ".gguf" and path.is_file():
        config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
        tokenizer = CachedTokenizer(_file_key(path), lambda: AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name))
    else:
        raise InterventionError.at(user_span() if base is None else NO_SPAN,
                                   f"no model config found for {source!r}",
                                   "give the embedded name, a HF directory, a config.json or a .gguf file")
    key = hashlib.sha256(config.to_json_string(use_diff=False).encode()).hexdigest()[:20]
    return config_model(config, tokenizer, key, source)


def _file_key(path: Path) -> str:
    stat = path.stat()
    return hashlib.sha256(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:20]


def _directory_tokenizer(directory: Path) -> CachedTokenizer | None:
    marker = directory / "tokenizer_config.json"
    if not marker.exists():
        return None
    from transformers import AutoTokenizer
    return CachedTokenizer(_file_key(marker), lambda: AutoTokenizer.from_pretrained(directory))


def _embedded_tokenizer() -> Any:
    from transformers import AutoTokenizer
    gguf = embedded.embedded_gguf()
    built = embedded.cache_root() / f"{gguf.stem}-{gguf.stat().st_size}"
    if (built / "tokenizer_config.json").exists():
        return AutoTokenizer.from_pretrained(built)
    return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
