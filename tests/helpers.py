"""Helpers shared by the tests (the fixtures are in conftest.py): tiny random GPT-2 and Llama
models with a word-level tokenizer built here (no hub), hand-written hook references, prompt
datasets, and the edit programs of the differential tests."""

from __future__ import annotations

import json
import random
import subprocess
import time
from pathlib import Path

import torch
from hypothesis import strategies as st

WORDS = ("the eiffel tower is in city of paris colosseum rome madison square garden new york "
         "located _ a an and to").split()


def word_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<unk>": 1, **{w: i + 2 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>",
                                   eos_token="<pad>")


def tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=64, n_embd=32, n_layer=3, n_head=4, n_positions=64,
                     bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return GPT2LMHeadModel(cfg).eval()


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return LlamaForCausalLM(cfg).eval()


def layers_of(module):
    """The decoder layers of a tiny GPT-2 or Llama."""
    return module.transformer.h if hasattr(module, "transformer") else module.model.layers


def run_with_hooks(module, inputs, hooks):
    """A plain forward with hand-written forward hooks: the independent reference."""
    handles = [m.register_forward_hook(fn) for m, fn in hooks]
    try:
        with torch.no_grad():
            return module(**inputs)
    finally:
        for h in handles:
            h.remove()


def dataset(path: Path, n: int, seed: int = 0) -> Path:
    rng = random.Random(seed)
    with path.open("w") as f:
        for _ in range(n):
            f.write(json.dumps({"text": " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 12)))}) + "\n")
    return path


GEN_PROMPTS = ["the eiffel tower is in the city of", "paris is a city"]


def endless(kind):
    """A tiny LM that never stops early (no EOS), so every step runs."""
    from interp_dsl import LanguageModel
    module = tiny_gpt2() if kind == "gpt2" else tiny_llama()
    module.config.eos_token_id = None
    return LanguageModel(module, tokenizer=word_tokenizer())


def layers(model):
    """The decoder layers of a tiny GPT-2 or Llama, as envoys of `model`."""
    return model.transformer.h if hasattr(model.module, "transformer") else model.model.layers


def patch_one(model, clean, corrupt, layer):
    """One activation patch as its own trace: p(token 5) on `corrupt` with the clean last-position
    residual of `layer` patched in (the reference of the patching sweeps)."""
    with model.trace(compile="off") as tracer:
        with tracer.invoke(clean):
            h = layers(model)[layer].output[:, -1, :]
        with tracer.invoke(corrupt):
            layers(model)[layer].output[:, -1, :] = h
            p = model.lm_head.output[:, -1].softmax(-1)[:, 5].save()
    return p.value[0]


# the differential tests' programs: edits of a tiny 3-layer model's residual stream
DIFF_PROMPTS = ("the eiffel tower is in the city of", "rome is in")
LAYERS, WIDTH = 3, 32

edits = st.one_of(
    st.tuples(st.just("zero"), st.integers(0, LAYERS - 1), st.integers(-3, 2)),
    st.tuples(st.just("scale"), st.integers(0, LAYERS - 1), st.floats(-2, 2, allow_nan=False)),
    st.tuples(st.just("add"), st.integers(0, LAYERS - 1), st.integers(0, 10_000)),
    st.tuples(st.just("patch"), st.integers(0, LAYERS - 2), st.integers(1, LAYERS - 1)),
    st.tuples(st.just("save"), st.integers(0, LAYERS - 1)),
)


def vector(seed: int) -> torch.Tensor:
    return torch.randn(WIDTH, generator=torch.Generator().manual_seed(seed))


def traced(model, program, prompt, compile="off"):
    layers = model.model.layers if hasattr(model.module, "model") else model.transformer.h
    saves = []
    with model.trace(prompt, compile=compile):
        for edit in program:
            kind, layer = edit[0], edit[1]
            if kind == "zero":
                layers[layer].output[:, edit[2], :] = 0
            elif kind == "scale":
                layers[layer].output *= edit[2]
            elif kind == "add":
                layers[layer].output = layers[layer].output + vector(edit[2])
            elif kind == "patch" and edit[1] < edit[2]:
                layers[edit[2]].output[:, -1, :] = layers[edit[1]].output[:, 0, :]
            elif kind == "save":
                saves.append(layers[layer].output.save())
        logits = model.lm_head.output.save()
    return [s.value for s in saves], logits.value




def wait_for_shards(out: Path, n: int, process: subprocess.Popen, timeout: float = 120) -> None:
    """Return once the manifest in `out` lists `n` shards (or `process` ended, or `timeout` passed):
    the moment a test kills a sweep part way."""
    deadline = time.monotonic() + timeout
    manifest = Path(out) / "manifest.json"
    while time.monotonic() < deadline and process.poll() is None:
        try:
            if len(json.loads(manifest.read_text())["shards"]) >= n:
                return
        except FileNotFoundError:
            pass
        time.sleep(0.01)
