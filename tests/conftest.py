"""Fixtures: tiny random GPT-2 and Llama models with a word-level tokenizer built here (no hub),
and the embedded SmolLM2 for end-to-end tests."""

from __future__ import annotations

import os
from collections import OrderedDict

import pytest
import torch

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


@pytest.fixture(params=["gpt2", "llama"])
def lm(request):
    from interp_dsl import LanguageModel
    module = tiny_gpt2() if request.param == "gpt2" else tiny_llama()
    return LanguageModel(module, tokenizer=word_tokenizer())


@pytest.fixture
def llama():
    from interp_dsl import LanguageModel
    return LanguageModel(tiny_llama(), tokenizer=word_tokenizer())


@pytest.fixture
def net():
    torch.manual_seed(0)
    return torch.nn.Sequential(OrderedDict([
        ("layer1", torch.nn.Linear(5, 10)), ("layer2", torch.nn.Linear(10, 2)),
    ])).requires_grad_(False)


@pytest.fixture(scope="session")
def smollm():
    from interp_dsl import LanguageModel
    return LanguageModel("smollm2-135m")


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


@pytest.fixture(autouse=True, scope="session")
def _quiet_transformers():
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """A tiny Llama saved as a local HF directory with the word tokenizer (for `ivx` tests)."""
    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama().save_pretrained(path)
    word_tokenizer().save_pretrained(path)
    return path
