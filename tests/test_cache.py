"""`tracer.cache()` (nnsight's cache): every module's output, or a chosen set with their inputs,
against hand-written forward hooks on the same forward."""

from __future__ import annotations

import pytest
import torch
from helpers import layers, run_with_hooks

from interp_dsl import InterventionError

PROMPT = "the eiffel tower is in the city of"


def hooked(lm, with_inputs=False):
    """Every module's output (and args/kwargs) of a plain forward, by nnsight's path."""
    seen: dict[str, tuple] = {}
    names = {id(m): ("model." + n if n else "model") for n, m in lm.module.named_modules()}

    def hook(module, args, kwargs, output):
        seen.setdefault(names[id(module)], (args, kwargs, output))
    handles = [m.register_forward_hook(hook, with_kwargs=True) for m in lm.module.modules()]
    try:
        ids = lm.tokenizer(PROMPT, return_tensors="pt")
        run_with_hooks(lm.module, {"input_ids": ids["input_ids"], "attention_mask": ids["attention_mask"]}, [])
    finally:
        for h in handles:
            h.remove()
    return seen


@pytest.mark.parametrize("mode", ["off", "graph"])
def test_the_cache_holds_every_module_output_of_the_forward(lm, mode):
    with lm.trace(PROMPT, compile=mode) as tracer:
        cache = tracer.cache()
    reference = hooked(lm)
    assert set(cache) == set(reference)  # every module the forward calls, the root included
    for path, (_, _, output) in reference.items():
        if isinstance(output, torch.Tensor):
            torch.testing.assert_close(cache[path].output, output, atol=1e-6, rtol=1e-6)
    first = "model.transformer.h.0" if "model.transformer.h.0" in cache else "model.model.layers.0"
    walked = cache.model.transformer.h[0] if "transformer" in first else cache.model.model.layers[0]
    assert torch.equal(walked.output, cache[first].output)
    last = cache.model.transformer.h[-1] if "transformer" in first else cache.model.model.layers[-1]
    assert torch.equal(last.output, cache[first[:-1] + str(len(layers(lm)) - 1)].output)
    assert cache[first].inputs is None  # inputs only with include_inputs=True


def test_chosen_modules_with_their_inputs_and_a_dtype(lm):
    block = layers(lm)[1]
    name = "model.transformer.h.0" if hasattr(lm.module, "transformer") else "model.model.layers.0"
    with lm.trace(PROMPT, compile="off") as tracer:
        cache = tracer.cache(modules=[block, name], include_inputs=True, dtype=torch.float64)
    reference = hooked(lm)
    assert list(cache) == [f"model.{block._path}", name]
    for path in cache:
        args, kwargs, output = reference[path]
        assert cache[path].output.dtype == torch.float64
        torch.testing.assert_close(cache[path].output, output.double(), atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(cache[path].input, args[0].double(), atol=1e-6, rtol=1e-6)
        assert set(cache[path].inputs[1]) == set(kwargs)


def test_a_module_the_forward_never_calls_is_an_error_at_the_users_line(llama):
    with pytest.raises(InterventionError, match=r"(?s)test_cache.py:\d+.*never calls model.model.layers.7.*"
                                                r"did you mean 'model.model.layers.2'"):
        with llama.trace(PROMPT, compile="off") as tracer:
            tracer.cache(modules=["model.model.layers.7"])


def test_cached_values_exist_after_the_trace_only(llama):
    with llama.trace(PROMPT, compile="off") as tracer:
        cache = tracer.cache(modules=["model.model.norm"])
        with pytest.raises(InterventionError, match="not available inside the trace"):
            cache["model.model.norm"].output
    assert cache.model.model.norm.output.shape == (1, 8, 32)
    with pytest.raises(AttributeError, match="'model.model.layers' was not cached"):
        cache.model.model.layers


@pytest.mark.parametrize("module", ["model.__class__", "model.model.layers.0.__dict__", "../etc", 3])
def test_cache_modules_reach_only_modules_the_forward_calls(llama, module):
    """A name outside the model's called modules (a private attribute, a path, a number) is refused
    at the user's line before anything is recorded."""
    with pytest.raises(InterventionError, match=r"test_cache.py:\d+"):
        with llama.trace(PROMPT, compile="off") as tracer:
            tracer.cache(modules=[module])


def test_a_module_list_the_forward_never_calls_stands_for_its_modules(lm):
    with lm.trace(PROMPT) as tracer:
        cache = tracer.cache(modules=[layers(lm)])
    reference = hooked(lm)
    prefix = "model.transformer.h" if hasattr(lm.module, "transformer") else "model.model.layers"
    assert list(cache) == [f"{prefix}.{i}" for i in range(len(layers(lm)))]
    for path in cache:
        output = reference[path][2]
        output = output[0] if isinstance(output, tuple) else output
        torch.testing.assert_close(cache[path].output if isinstance(cache[path].output, torch.Tensor)
                                   else cache[path].output[0], output)
