"""Fixtures: tiny random GPT-2 and Llama models with a word-level tokenizer built here (no hub),
and the embedded SmolLM2 for end-to-end tests."""

from __future__ import annotations

import os
from collections import OrderedDict

import pytest
import torch
from helpers import tiny_gpt2, tiny_llama, word_tokenizer

# Compiled graphs are not kept on disk during tests (the counts of captures they assert would
# depend on earlier tests); tests/test_graph_cache.py gives its models a directory of their own.
os.environ["IVX_GRAPH_CACHE"] = "off"


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
