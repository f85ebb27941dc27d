"""`tracer.cond` and `tracer.log` (seed 004): writes under a condition are selects, saves are kept
only when it holds, logs print after the run; against plain forwards with hand-written hooks."""

from __future__ import annotations

import warnings

import pytest
import torch

from interp_dsl import InterventionError, NNsight

PROMPT = "the eiffel tower is in the city of"


def test_seed_log_and_cond_examples_print_what_the_walkthrough_shows(net, capsys):
    tiny_model = NNsight(net)
    x = torch.rand((1, 5), generator=torch.Generator().manual_seed(0))
    with tiny_model.trace(x) as tracer:
        tracer.log("Layer 1 - out: ", tiny_model.layer1.output)
    with tiny_model.trace(x) as tracer:
        rand_int = torch.tensor([-5])
        with tracer.cond(rand_int % 2 == 0):
            tracer.log("Random Integer ", rand_int, " is Even")
        with tracer.cond(rand_int % 2 == 1):
            tracer.log("Random Integer ", rand_int, " is Odd")
    with tiny_model.trace(x) as tracer:
        non_rand_int = 8
        with tracer.cond(non_rand_int > 0):
            with tracer.cond(non_rand_int % 2 == 0):
                tracer.log("Rand Int ", non_rand_int, " is Positive and Even")
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("Layer 1 - out:  tensor([[") and str(net.layer1(x)[0, 0].item())[:5] in lines[0]
    assert lines[-2:] == ["Random Integer  tensor([-5])  is Odd", "Rand Int  8  is Positive and Even"]


@pytest.mark.parametrize("threshold", [-1e9, 1e9])
def test_a_write_under_a_traced_condition_is_a_select(llama, threshold, capsys):
    def run(compile):
        with llama.trace(PROMPT, compile=compile) as tracer:
            h0 = llama.model.layers[0].output
            with tracer.cond(h0.abs().sum() > threshold):
                llama.model.layers[1].output[:, -1, :] = 0
                kept = llama.model.layers[1].output.save()
                tracer.log("zeroed")
            logits = llama.lm_head.output.save()
        return kept, logits.value
    kept, logits = run("off")
    holds = threshold < 0
    inputs = llama.tokenizer(PROMPT, return_tensors="pt")

    def zero_last(m, a, o):
        o = o.clone()
        o[:, -1] = 0
        return o
    handle = llama.module.model.layers[1].register_forward_hook(zero_last) if holds else None
    try:
        with torch.no_grad():
            want = llama.module(**inputs).logits
    finally:
        if handle is not None:
            handle.remove()
    torch.testing.assert_close(logits, want, rtol=0, atol=0)
    assert capsys.readouterr().out == ("zeroed\n" if holds else "")
    if holds:
        assert kept.value[:, -1].abs().sum() == 0
    else:
        with pytest.raises(InterventionError, match="condition was false"):
            kept.value
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a select splices into the compiled graph
        _, compiled = run("graph")
    torch.testing.assert_close(compiled, logits, rtol=1e-5, atol=1e-5)


def test_nested_conditions_are_anded_and_a_per_row_condition_selects_rows(llama):
    prompts = [PROMPT, "rome is in the city of the world"]
    with llama.trace(prompts) as tracer:
        h = llama.model.layers[0].output
        first_row = torch.arange(2) == 0
        with tracer.cond(h.sum() == h.sum()):  # always true
            with tracer.cond(first_row[:, None, None]):
                llama.model.layers[0].output[:] = 7.0
        out = llama.model.layers[0].output.save()
    assert torch.all(out.value[0] == 7.0) and not torch.any(out.value[1] == 7.0)


def test_a_condition_the_forward_never_computed_is_named(llama):
    with llama.trace(PROMPT) as tracer:
        llama.model.layers[0].output.stop()
        with tracer.cond(llama.lm_head.output[0, -1, 0] > 0):
            kept = llama.model.layers[0].output.save()
    with pytest.raises(InterventionError, match="condition was not computed: the forward stopped before it"):
        kept.value


def test_a_gradient_write_under_a_condition(llama):
    with llama.trace(PROMPT) as tracer:
        logits = llama.lm_head.output
        with logits[0, -1, 3].backward():
            with tracer.cond(logits[0, -1, 3] > 1e9):  # false: the gradient is left as it is
                llama.model.layers[2].output.grad = llama.model.layers[2].output.grad * 0
            g = llama.model.layers[2].output.grad.save()
    assert g.value.abs().sum() > 0


def test_conditions_and_logs_refused_where_they_cannot_mean_anything(llama):
    with pytest.raises(InterventionError, match="a condition is a boolean"):
        with llama.trace(PROMPT) as tracer:
            tracer.cond("yes")
    with pytest.raises(InterventionError, match="tracer.cond on a traced value inside a sweep"):
        with llama.sweep([PROMPT], batch_size=1, progress=False) as sweep:
            with sweep.tracer.cond(llama.model.layers[0].output.sum() > 0):
                pass
    with pytest.raises(InterventionError, match="a condition is a boolean, found a float32 value"):
        with llama.trace(PROMPT) as tracer:
            with tracer.cond(llama.model.layers[0].output.sum()):
                llama.model.layers[0].output.save()
    with pytest.raises(InterventionError, match="the library's own"):
        with llama.trace(PROMPT):
            llama.model.layers[0].output.save("ivx_hidden_0")


def test_apply_records_the_functions_operations_like_writing_them_inline(llama):
    import interp_dsl

    def centred_norm(h):
        return (h - h.mean(dim=-1, keepdim=True)).norm(dim=-1)

    with llama.trace(PROMPT) as applied:
        norms = interp_dsl.apply(centred_norm, llama.model.layers[1].output).save()
        total = interp_dsl.apply(torch.sum, llama.model.layers[1].output).save()
    with llama.trace(PROMPT) as inline:
        h = llama.model.layers[1].output
        (h - h.mean(dim=-1, keepdim=True)).norm(dim=-1).save()
        torch.sum(llama.model.layers[1].output).save()
    assert applied.program() == inline.program()
    hidden = {}
    handle = llama.module.model.layers[1].register_forward_hook(lambda m, i, o: hidden.update(h=o))
    with torch.no_grad():
        ids = llama.tokenizer(PROMPT, return_tensors="pt")
        llama.module(input_ids=ids["input_ids"], attention_mask=ids["attention_mask"])
    handle.remove()
    torch.testing.assert_close(norms.value, centred_norm(hidden["h"]))
    torch.testing.assert_close(total.value, hidden["h"].sum())


def test_apply_of_a_function_outside_the_vocabulary_is_an_error_at_its_line(llama):
    import interp_dsl

    def tensor_sum(tensor):  # seed 004's example: element by element, with .item()
        total = 0
        for element in tensor.flatten():
            total += element.item()
        return torch.tensor(total)

    with pytest.raises(InterventionError) as caught:
        with llama.trace(PROMPT):
            interp_dsl.apply(tensor_sum, llama.model.layers[1].output).save()
    assert ".item is not in interp_dsl's vocabulary" in str(caught.value)
    assert caught.value.diagnostics[0].span.line == tensor_sum.__code__.co_firstlineno + 3
    with pytest.raises(InterventionError, match="apply takes a function, not a int"):
        with llama.trace(PROMPT):
            interp_dsl.apply(3, llama.model.layers[1].output)
