"""Gradients: `.grad` of module values, gradient writes, backward passes, trained tensors, in
the proxy API and in `.ivx`, against plain autograd with hand-written hooks on the same model."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import layers, layers_of
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from compiler.ir import dumps, loads
from compiler.validate import PayloadError
from interp_dsl import CheckError, InterventionError, NNsight
from runtime.engine import CompileFallbackWarning

PROMPT = "the eiffel tower is in the city of"


def autograd(lm, metric, keep=(), edits=None, prompt=PROMPT):
    """Plain autograd: decoder layer outputs `keep` retain their gradients, `edits` maps a layer
    to a function applied to the gradient arriving at its output (a tensor hook)."""
    module, kept = lm.module, {}

    def hook(i):
        def fn(m, args, output):
            if i in keep:
                output.retain_grad()
                kept[i] = output
            if edits and i in edits:
                output.register_hook(edits[i])
        return fn
    handles = [layer.register_forward_hook(hook(i)) for i, layer in enumerate(layers_of(module))]
    try:
        inputs = lm.tokenizer(prompt, return_tensors="pt")
        out = module(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
        metric(out.logits).backward()
    finally:
        for h in handles:
            h.remove()
        module.zero_grad(set_to_none=True)
    return {i: t.grad for i, t in kept.items()}


def answer(logits):
    return logits[0, -1, 7] - logits[0, -1, 3]


def test_gradients_of_layer_outputs_equal_autograd(lm):
    with lm.trace(PROMPT):
        hidden = [layers(lm)[i].output for i in range(3)]
        logits = lm.lm_head.output
        with answer(logits).backward():
            grads = [h.grad.save() for h in reversed(hidden)]  # nnsight's reverse order
            last = hidden[0].grad[:, -1].save()
    want = autograd(lm, answer, keep=(0, 1, 2))
    for i, g in zip((2, 1, 0), grads, strict=True):
        torch.testing.assert_close(g.value, want[i], rtol=0, atol=0)
    torch.testing.assert_close(last.value, want[0][:, -1], rtol=0, atol=0)
    assert all(p.grad is None for p in lm.module.parameters())  # the model's weights are not touched


def test_the_older_spelling_reads_gradients_before_backward_is_called(lm):
    with lm.trace(PROMPT):
        g1 = layers(lm)[1].output.grad.save()  # any order: the scheduler orders them
        g2 = layers(lm)[2].output.grad.save()
        answer(lm.lm_head.output).backward()
    want = autograd(lm, answer, keep=(1, 2))
    torch.testing.assert_close(g1.value, want[1], rtol=0, atol=0)
    torch.testing.assert_close(g2.value, want[2], rtol=0, atol=0)


def test_gradient_writes_reach_the_earlier_layers(lm):
    with lm.trace(PROMPT):
        logits = lm.lm_head.output
        with answer(logits).backward():
            layers(lm)[2].output.grad[:, -1, :16] = 0
            layers(lm)[1].output.grad = layers(lm)[1].output.grad * 3
            g2 = layers(lm)[2].output.grad.save()
            g0 = layers(lm)[0].output.grad.save()

    def zero_last(g):
        g = g.clone()
        g[:, -1, :16] = 0
        return g
    want = autograd(lm, answer, keep=(0, 2), edits={2: zero_last, 1: lambda g: g * 3})
    torch.testing.assert_close(g2.value, want[2], rtol=0, atol=0)
    torch.testing.assert_close(g0.value, want[0], rtol=1e-6, atol=1e-7)
    assert g2.value[:, -1, :16].abs().sum() == 0 and g2.value[:, -1, 16:].abs().sum() > 0
    assert g0.value.abs().sum() > 0


def test_seed_walkthrough_gradients_on_a_frozen_model(net):
    """seed 004: `.grad` on a model whose weights require no gradient, and zeroing/doubling."""
    tiny_model = NNsight(net)
    x = torch.rand((1, 5), generator=torch.Generator().manual_seed(0))
    with tiny_model.trace(x):
        tiny_model.layer1.output.requires_grad = True
        layer1_output_grad = tiny_model.layer1.output.grad.save()
        layer2_output_grad = tiny_model.layer2.output.grad.save()
        loss = tiny_model.output.sum()
        loss.backward()
    torch.testing.assert_close(layer2_output_grad.value, torch.ones(1, 2))
    torch.testing.assert_close(layer1_output_grad.value, net.layer2.weight.sum(0, keepdim=True))

    with tiny_model.trace(x):
        tiny_model.layer1.output.grad[:] = 0
        tiny_model.layer2.output.grad = tiny_model.layer2.output.grad * 2
        layer1_output_grad = tiny_model.layer1.output.grad.save()
        layer2_output_grad = tiny_model.layer2.output.grad.save()
        tiny_model.output.sum().backward()
    torch.testing.assert_close(layer1_output_grad.value, torch.zeros(1, 10))
    torch.testing.assert_close(layer2_output_grad.value, torch.full((1, 2), 2.0))


def test_retain_grad_gives_the_gradient_after_the_trace(llama):
    with llama.trace(PROMPT):
        hidden = llama.model.layers[-1].output.save()
        hidden.retain_grad()
        logits = llama.lm_head.output.save()
        logits.sum().backward()
    torch.testing.assert_close(hidden.grad, autograd(llama, lambda lg: lg.sum(), keep=(2,))[2], rtol=0, atol=0)


def test_each_invoke_gets_its_own_rows_and_a_metric_may_span_invokes(llama):
    clean, corrupt = "the eiffel tower is in the city of", "the colosseum is in the city of"
    with llama.trace() as tracer:
        with tracer.invoke(clean):
            clean_logits, clean_hidden = llama.lm_head.output, llama.model.layers[1].output
        with tracer.invoke(corrupt):
            corrupt_logits = llama.lm_head.output
            with (answer(corrupt_logits) - answer(clean_logits)).backward():
                g_corrupt = llama.model.layers[1].output.grad.save()
                g_clean = clean_hidden.grad.save()
    # alone, each prompt's gradient of its own term (rows do not interact in the forward)
    want_corrupt = autograd(llama, answer, keep=(1,), prompt=corrupt)[1]
    want_clean = autograd(llama, answer, keep=(1,), prompt=clean)[1]
    n = want_corrupt.shape[1]
    torch.testing.assert_close(g_corrupt.value[:, -n:], want_corrupt, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g_clean.value, -want_clean, rtol=1e-5, atol=1e-6)


def test_two_backward_passes_in_one_trace(llama):
    with llama.trace(PROMPT):
        logits = llama.lm_head.output
        with logits[0, -1, 7].backward():
            first = llama.model.layers[0].output.grad.save()
        with logits[0, -1].logsumexp(-1).backward():
            second = llama.model.layers[0].output.grad.save()
    torch.testing.assert_close(first.value, autograd(llama, lambda lg: lg[0, -1, 7], keep=(0,))[0], rtol=0, atol=0)
    torch.testing.assert_close(second.value, autograd(llama, lambda lg: lg[0, -1].logsumexp(-1), keep=(0,))[0],
                               rtol=0, atol=0)


def test_a_site_the_metric_does_not_depend_on_has_a_zero_gradient(llama):
    with llama.trace(PROMPT):
        h2 = llama.model.layers[2].output
        with llama.model.layers[0].output[0, -1].sum().backward():
            g = h2.grad.save()
    assert torch.equal(g.value, torch.zeros(1, 8, 32))


def test_tensors_that_require_grad_are_trained_through_the_trace(llama):
    """seed 004's LoRA: user tensors with requires_grad receive their gradients through the trace
    (the model's weights do not), and an optimizer trains them over traces exactly as it trains
    the same LoRA written as a forward hook."""
    mlp, target = llama.model.layers[-1].mlp, torch.tensor([5])

    def traced(wa, wb):
        with llama.trace(PROMPT):
            mlp.output = mlp.output + (mlp.input @ wa) @ wb
            loss = torch.nn.functional.cross_entropy(llama.lm_head.output[:, -1], target)
            loss.backward()
            kept = loss.save()
        return float(kept)

    def hooked(wa, wb):
        handle = llama.module.model.layers[-1].mlp.register_forward_hook(lambda m, a, o: o + (a[0] @ wa) @ wb)
        try:
            out = llama.module(**llama.tokenizer(PROMPT, return_tensors="pt"))
            loss = torch.nn.functional.cross_entropy(out.logits[:, -1], target)
            loss.backward()
        finally:
            handle.remove()
            llama.module.zero_grad(set_to_none=True)
        return float(loss.detach())

    def train(step):
        torch.manual_seed(0)
        wa, wb = torch.randn(32, 4, requires_grad=True), torch.zeros(4, 32, requires_grad=True)
        optimizer, losses, grads = torch.optim.SGD([wa, wb], lr=0.5), [], []
        for _ in range(4):
            losses.append(step(wa, wb))
            grads.append((wa.grad.clone(), wb.grad.clone()))
            optimizer.step()
            optimizer.zero_grad()
        return losses, grads, (wa, wb)
    losses, grads, weights = train(traced)
    assert all(p.grad is None for p in llama.module.parameters())
    want_losses, want_grads, want_weights = train(hooked)
    assert losses == pytest.approx(want_losses, rel=1e-6)
    assert losses[-1] < losses[0] - 0.2
    for got, want in zip([*grads, weights], [*want_grads, want_weights], strict=True):
        torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-6)


def test_compiled_modes_fall_back_with_the_reason_and_agree(llama):
    def run(mode):
        with llama.trace(PROMPT, compile=mode):
            with answer(llama.lm_head.output).backward():
                g = llama.model.layers[1].output.grad.save()
        return g.value
    with pytest.warns(CompileFallbackWarning, match="gradients"):
        compiled = run("graph")
    assert torch.equal(compiled, run("off"))


def test_a_sweep_with_gradients_equals_one_trace_per_prompt(llama):
    """Batched and left-padded rows, the head on the last position only where the program allows
    it (not here: the head's own gradient is read)."""
    prompts = [PROMPT, "rome is in", "the colosseum is in the city of rome"]
    with llama.sweep(prompts, batch_size=2, progress=False) as sweep:
        logits = llama.lm_head.output
        with logits[:, -1, 5].sum().backward():
            llama.model.layers[1].output.grad[:, -1].save("g1")
            logits.grad[:, -1].save("head")
            logits.grad[:, 0].save("head_first")
    assert sweep.results.saves["head_first"].abs().sum() == 0  # the metric reads the last position only
    for i, prompt in enumerate(prompts):
        with llama.trace(prompt):
            logits = llama.lm_head.output
            with logits[:, -1, 5].sum().backward():
                g1 = llama.model.layers[1].output.grad[:, -1].save()
                head = logits.grad[:, -1].save()
        torch.testing.assert_close(sweep.results.saves["g1"][i], g1.value[0], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(sweep.results.saves["head"][i], head.value[0], rtol=0, atol=0)


# ------------------------------------------------------------------------------------- errors
def test_backward_of_a_non_scalar_is_located(llama):
    with pytest.raises(CheckError) as e:
        with llama.trace(PROMPT):
            llama.lm_head.output.backward()
    assert "backward() differentiates a floating-point scalar, found f32[1, 8, 64]" in str(e.value)
    assert "test_gradients.py" in str(e.value) and ".sum()" in str(e.value)


def test_a_gradient_without_a_backward_is_located(llama):
    with pytest.raises(CheckError, match=r"gradient of model.model.layers\[1\].output is used, but no "
                                         r"backward\(\) follows"):
        with llama.trace(PROMPT):
            llama.model.layers[1].output.grad.save()


def test_grad_of_a_computed_value_and_of_integers_are_refused(llama):
    with pytest.raises(InterventionError, match="taken of a module's value"):
        with llama.trace(PROMPT):
            (llama.model.layers[1].output * 2).grad
    with pytest.raises(CheckError, match="only floating-point tensors have gradients"):
        with llama.trace(PROMPT):
            ids = llama.model.embed_tokens.input
            with llama.lm_head.output.sum().backward():
                ids.grad.save()


def test_a_gradient_write_cannot_use_a_gradient_that_arrives_later(llama):
    with pytest.raises(CheckError, match=r"computed from the gradient of model.model.layers\[0\].output, "
                                         "which the backward reaches later"):
        with llama.trace(PROMPT):
            with llama.lm_head.output.sum().backward():
                llama.model.layers[2].output.grad = llama.model.layers[0].output.grad


def test_a_forward_write_cannot_use_a_gradient(llama):
    with pytest.raises(CheckError, match="computed from a gradient, which exists only once the forward has ended"):
        with llama.trace(PROMPT):
            with llama.lm_head.output.sum().backward():
                g = llama.model.layers[1].output.grad
            llama.model.layers[2].output = g


def test_backward_in_a_generation_is_refused(llama):
    with pytest.raises(CheckError, match="backward\\(\\) in a generation"):
        with llama.generate(PROMPT, max_new_tokens=2):
            llama.lm_head.output.sum().backward()


def test_gradient_programs_round_trip_as_json_and_hostile_ones_are_refused(llama):
    with llama.trace(PROMPT) as tracer:
        with llama.lm_head.output[0, -1, 3].backward():
            llama.model.layers[1].output.grad[:, 0] = 0
            llama.model.layers[1].output.grad.save("g")
    program = tracer.program()
    assert loads(dumps(program)) == program
    assert [op.opcode for op in program.ops].count("setgrad") == 1
    data = json.loads(dumps(program))
    ops = {op["opcode"]: i for i, op in enumerate(data["ops"])}

    def altered(opcode, **fields):
        bad = json.loads(dumps(program))
        bad["ops"][ops[opcode]].update(fields)
        return json.dumps(bad)
    hostile = [
        altered("backward", target="os.system"),
        altered("backward", args=[]),
        altered("grad", args=[{"$": "Const", "value": "0"}]),
        altered("grad", args=[{"$": "Const", "value": 2**40}]),
        altered("setgrad", args=[{"$": "Const", "value": 0}]),
        altered("grad", site=None),
        altered("backward", path=[{"$": "Const", "value": 0}]),
        altered("grad", kwargs=[["dim", {"$": "Const", "value": 0}]]),
    ]
    for payload in hostile:
        with pytest.raises(PayloadError):
            loads(payload)


# ------------------------------------------------------------------------- generated programs
edits = st.lists(st.one_of(
    st.tuples(st.just("scale"), st.integers(0, 2), st.floats(-2, 2, allow_nan=False, width=32)),
    st.tuples(st.just("zero"), st.integers(0, 2), st.integers(-8, 7)),
    st.tuples(st.just("read"), st.integers(0, 2)),
), max_size=5)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(program=edits, token=st.integers(0, 63))
def test_generated_gradient_programs_equal_autograd_with_hooks(llama, program, token):
    """Any mix of gradient reads and writes at layer outputs equals plain autograd with the same
    edits as tensor hooks (applied in the order the backward reaches them, then program order)."""
    metric = lambda lg: lg[0, -1, token]  # noqa: E731
    by_layer: dict[int, list] = {}
    with llama.trace(PROMPT):
        with metric(llama.lm_head.output).backward():
            reads = []
            for edit in program:
                h = llama.model.layers[edit[1]].output
                if edit[0] == "scale":
                    h.grad = h.grad * edit[2]
                elif edit[0] == "zero":
                    h.grad[:, edit[2]] = 0
                else:
                    reads.append((edit[1], len(by_layer.get(edit[1], [])), h.grad.save()))
                by_layer.setdefault(edit[1], []).append(edit)

    seen: dict[tuple[int, int], torch.Tensor] = {}

    def chain(layer):
        def fn(g):
            count = 0
            for edit in by_layer[layer]:
                if edit[0] == "scale":
                    g = g * edit[2]
                elif edit[0] == "zero":
                    g = g.clone()
                    g[:, edit[2]] = 0
                else:
                    seen[(layer, count)] = g
                count += 1
            return g
        return fn
    autograd(llama, metric, edits={layer: chain(layer) for layer in by_layer})
    for layer, count, proxy in reads:
        torch.testing.assert_close(proxy.value, seen[(layer, count)], rtol=1e-6, atol=1e-7)


# ------------------------------------------------------------- found by a hostile review
def test_frozen_weights_give_the_gradients_trainable_ones_do(llama):
    """A metric read at the site whose gradient is taken, and a metric that uses the site twice:
    a frozen model gives what autograd gives with trainable weights."""
    def run():
        with llama.trace(PROMPT):
            h = llama.model.layers[2].output
            logits = llama.lm_head.output
            with (logits[0, -1, 3] + (h * h).sum()).backward():
                gh = h.grad.save()
                gl = logits.grad.save()
        return gh.value, gl.value
    trainable = run()
    llama.module.requires_grad_(False)
    try:
        frozen = run()
    finally:
        llama.module.requires_grad_(True)
    assert all(p.requires_grad and p.grad is None for p in llama.module.parameters())
    for a, b in zip(frozen, trainable, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert frozen[1][0, -1, 3] == 1 and frozen[1].abs().sum() == 1


def test_a_gradient_is_of_the_value_at_the_site_before_later_in_place_work(net):
    """Linear -> ReLU(inplace) -> Linear: the gradient of the first Linear's output is the one
    before the ReLU masks it, as autograd gives it."""
    model_net = torch.nn.Sequential(net.layer1, torch.nn.ReLU(inplace=True), net.layer2)
    x = torch.rand(3, 5, generator=torch.Generator().manual_seed(2)) - 0.5
    want_input = net.layer1(x).detach().requires_grad_()
    net.layer2(torch.relu(want_input)).sum().backward()
    for frozen in (True, False):
        model_net.requires_grad_(not frozen)
        wrapped = NNsight(model_net)
        with wrapped.trace(x):
            with wrapped.output.sum().backward():
                g = wrapped[0].output.grad.save()
        torch.testing.assert_close(g.value, want_input.grad, rtol=0, atol=0)
    model_net.requires_grad_(False)


def test_a_tensor_computed_from_a_trained_one_passes_its_gradient_on(llama):
    wa = torch.randn(32, requires_grad=True)
    scale = wa * 0.1  # computed before the trace: its gradient reaches wa, as backward() would
    with llama.trace(PROMPT):
        llama.model.layers[1].output[:, -1, :] += scale
        llama.lm_head.output[0, -1, 3].backward()
    want = wa.detach().clone().requires_grad_()
    hook = llama.module.model.layers[1].register_forward_hook(lambda m, a, o: torch.cat([o[:, :-1], o[:, -1:] + want * 0.1], 1))
    try:
        llama.module(**llama.tokenizer(PROMPT, return_tensors="pt")).logits[0, -1, 3].backward()
    finally:
        hook.remove()
        llama.module.zero_grad(set_to_none=True)
    torch.testing.assert_close(wa.grad, want.grad, rtol=1e-5, atol=1e-7)


def test_indices_into_gradients_and_unreached_metrics_are_located(llama):
    with pytest.raises(CheckError, match=r"index into the gradient of model.model.layers\[1\].output is "
                                         r"computed from model.lm_head.output"):
        with llama.trace(PROMPT):
            top = llama.lm_head.output[0, -1].argmax(-1) % 8
            with llama.lm_head.output.sum().backward():
                llama.model.layers[1].output[0, top].grad.save()
    with pytest.raises(CheckError, match="index into the gradient of .* is computed from a gradient"):
        with llama.trace(PROMPT):
            with llama.lm_head.output.sum().backward():
                g2 = llama.model.layers[2].output.grad
                llama.model.layers[1].output.grad[:, g2[0, 0].argmax(-1) % 8] = 0
    with pytest.raises(InterventionError, match="the forward stopped before the value it differentiates"):
        with llama.trace(PROMPT):
            llama.model.layers[0].output.stop()
            llama.lm_head.output.sum().backward()


def test_backward_passes_are_bounded(llama):
    with pytest.raises(CheckError, match="more than 32 backward passes"):
        with llama.trace(PROMPT):
            logits = llama.lm_head.output
            for i in range(33):
                logits[0, -1, i].backward()
