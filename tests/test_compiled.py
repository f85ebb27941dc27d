"""Compiled execution against the reference interpreter: the spliced graph must give the same
numbers (exactly without inductor), compile once per experiment and shape bucket, and fall back
loudly, never silently, where it cannot run."""

from __future__ import annotations

import subprocess
import sys
import warnings

import pytest
import torch
from helpers import DIFF_PROMPTS as PROMPTS
from helpers import edits, tiny_gpt2, tiny_llama, traced, word_tokenizer
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.testing import assert_close

from interp_dsl import CompileFallbackWarning, LanguageModel, Model, load_results

A = "the eiffel tower is in the city of"


def make(kind):
    return LanguageModel(tiny_gpt2() if kind == "gpt2" else tiny_llama(), tokenizer=word_tokenizer())


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def model(request):
    return make(request.param)


def layers(lm):
    return lm.model.layers if hasattr(lm.module, "model") else lm.transformer.h


def assert_equal(got, want):
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert torch.equal(g, w), (g - w).abs().max()


@settings(max_examples=10, deadline=None)
@given(st.lists(edits, min_size=1, max_size=5).map(lambda xs: list(dict.fromkeys(tuple(x) for x in xs))),
       st.sampled_from(PROMPTS))
def test_graph_mode_equals_the_reference_exactly(model, program, prompt):
    n = len(model.tokenizer(prompt)["input_ids"])
    program = [e for e in program if not (e[0] == "zero" and not -n <= e[2] < n)]
    with warnings.catch_warnings():
        warnings.simplefilter("error", CompileFallbackWarning)
        saves, logits = traced(model, program, prompt, compile="graph")
    ref_saves, ref_logits = traced(model, program, prompt, compile="off")
    assert_equal([*saves, logits], [*ref_saves, ref_logits])


def intervene(lm, prompts, alpha, vector, compile):
    """Steering, zeroing, a cross-layer patch and reads: one program with several kinds of ops."""
    with lm.trace(prompts, compile=compile):
        hidden = layers(lm)[0].output[:, 0].save()
        layers(lm)[1].output[:, -1] = layers(lm)[1].output[:, -1] * alpha + vector
        layers(lm)[2].output[:, -1, :4] = layers(lm)[0].output[:, -2, :4]
        logits = lm.lm_head.output[:, -1].save()
    return [hidden.value, logits.value]


def test_inputs_module_calls_and_the_model_output_compile_exactly(model):
    """Input writes, `.inputs`, an ad-hoc module call (the logit lens) and `model.output`."""
    final_norm = model.model.norm if hasattr(model.module, "model") else model.transformer.ln_f

    def run(compile):
        with model.trace([A, "rome is in"], compile=compile):
            layers(model)[1].input[:, -1] = 0
            inputs = layers(model)[2].inputs.save()
            lens = model.lm_head(final_norm(layers(model)[0].output)).save()
            logits = model.output.logits.save()
        return [inputs.value[0][0], lens.value, logits.value]

    with warnings.catch_warnings():
        warnings.simplefilter("error", CompileFallbackWarning)
        got = run("graph")
    assert_equal(got, run("off"))


def test_auto_does_not_compile_a_one_off_trace_on_a_cpu(model):
    before = model.compile_stats().artefacts
    for _ in range(4):
        with model.trace(A):
            layers(model)[0].output.save()
    assert model.compile_stats().artefacts == before


def test_cudagraphs_without_a_gpu_falls_back_and_says_why(model):
    with pytest.warns(CompileFallbackWarning, match="CUDA graphs need the model on a CUDA device"):
        with model.trace(A, compile="cudagraphs"):
            hidden = layers(model)[0].output.save()
    assert hidden.value.shape[0] == 1


def test_inductor_agrees_with_the_reference(model):
    fallbacks = model.compile_stats().fallbacks
    vector = torch.randn(32)
    got = intervene(model, [A, "rome is in"], 1.5, vector, "inductor")
    want = intervene(model, [A, "rome is in"], 1.5, vector, "off")
    for g, w in zip(got, want, strict=True):
        assert_close(g, w, rtol=1e-4, atol=1e-5)
    assert model.compile_stats().fallbacks == fallbacks


def test_values_batch_sizes_and_lengths_share_one_compilation():
    lm = make("llama")
    runs = [([A, "rome is in"], 0.5), ([A, "rome is in"], 2.0), ([A, "rome", "paris is in the city"], -1.0),
            (["the tower is", "new york is located in the city of paris", "a", "an"], 3.0)]
    for prompts, alpha in runs:
        vector = torch.randn(32)
        assert_equal(intervene(lm, prompts, alpha, vector, "graph"), intervene(lm, prompts, alpha, vector, "off"))
    assert lm.compile_stats().compilations == 1
    assert lm.compile_stats().calls == len(runs)
    intervene(lm, A, 1.0, torch.randn(32), "graph")  # batch size 1 is its own shape bucket
    assert lm.compile_stats().compilations == 2


def test_invokes_compile_and_agree():
    lm = make("gpt2")

    def run(compile):
        with lm.trace(compile=compile) as tracer:
            with tracer.invoke(A):
                clean = lm.transformer.h[1].output[:, -1].save()
            with tracer.invoke("rome is in the city of"):
                lm.transformer.h[1].output[:, -1] = clean
                logits = lm.lm_head.output.save()
        return [clean.value, logits.value]

    assert_equal(run("graph"), run("off"))
    assert lm.compile_stats().fallbacks == 0


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_invokes_of_many_lengths_share_one_graph(kind):
    """Two invokes fix the batch layout, not the prompt length: twelve lengths (past dynamo's
    recompile limit of 8) are one capture, each call equal to the reference interpreter."""
    lm = make(kind)
    words = "the eiffel tower is in city of paris colosseum rome madison square garden new york".split()
    layer = (lm.transformer.h if kind == "gpt2" else lm.model.layers)[1]

    def run(n, compile):
        with lm.trace(compile=compile) as tracer:
            with tracer.invoke(" ".join(words[:n])):
                clean = layer.output[:, -1].save()
            with tracer.invoke(" ".join(words[1:n + 1])):
                layer.output[:, -1] = clean
                logits = lm.lm_head.output.save()
        return [clean.value, logits.value]

    for n in range(2, 14):
        got, want = run(n, "graph"), run(n, "off")
        assert [g.shape[-2:] for g in got[1:]] == [(n, lm.lm_head.out_features)]
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
    stats = lm.compile_stats()
    assert (stats.compilations, stats.calls, stats.fallbacks) == (1, 12, 0)


def zeroed_logits(lm, compile):
    """The logits with layer 0's output zeroed."""
    with lm.trace(A, compile=compile):
        lm.model.layers[0].output[:] = 0
        logits = lm.lm_head.output.save()
    return logits.value


def test_hooks_around_compile_cannot_hide_the_intervention():
    """The trap of hooks registered around torch.compile: a compiled plain forward first, then
    ours with an edit, on the same instance and on a second one: ours is the edited result."""
    first, second = make("llama"), make("llama")
    ids = first.tokenizer(A, return_tensors="pt")
    with torch.no_grad():
        plain = torch.compile(first.module, backend="eager")(**ids).logits
    for lm in (first, second):
        logits = zeroed_logits(lm, "graph")
        assert torch.equal(logits, zeroed_logits(lm, "off"))
        assert not torch.allclose(logits, plain)


def test_no_python_hook_runs_in_a_compiled_forward():
    lm = make("llama")
    vector = torch.randn(32)
    intervene(lm, [A, "rome is in"], 1.0, vector, "graph")  # compiles
    called = set()
    sys.setprofile(lambda frame, event, arg: called.add((frame.f_code.co_filename, frame.f_code.co_name))
                   if event == "call" else None)
    try:
        intervene(lm, [A, "paris"], 2.0, vector, "graph")
    finally:
        sys.setprofile(None)
    assert lm.compile_stats().compilations == 1
    hooks = {name for f, name in called if f.endswith(("compiler/markers.py", "runtime/interpreter.py"))}
    assert hooks <= {"install", "activated"}  # bookkeeping around the call, no hook inside it
    assert any(f.endswith("runtime/compiled.py") for f, _ in called)  # the profiler saw our calls


def test_early_stop_drops_the_later_layers():
    lm = make("llama")

    def run(compile, stop):
        with lm.trace(A, compile=compile) as tracer:
            hidden = lm.model.layers[0].output.save()
            if stop:
                tracer.stop()
        return tracer, hidden.value

    stopped, hidden = run("graph", True)
    full, _ = run("graph", False)
    assert torch.equal(hidden, run("off", True)[1])
    assert stopped.result.stopped and stopped.result.output is None
    def compute(tracer):
        return [n for n in tracer.result.graph.module.graph.nodes if n.op.startswith("call")]

    assert len(compute(stopped)) < len(compute(full)) / 2  # layers 1 and 2 and the head are gone


def test_capture_failure_falls_back_once_naming_the_cause():
    class Breaks(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Linear(4, 4), torch.nn.Linear(4, 2)

        def forward(self, x):
            x = self.a(x)
            torch._dynamo.graph_break()
            return self.b(x)

    net = Model(Breaks().requires_grad_(False))
    x = torch.randn(3, 4)
    with pytest.warns(CompileFallbackWarning, match="graph_break.*reference interpreter ran instead") as caught:
        with net.trace(x, compile="graph"):
            out = net.a.output.save()
    assert caught[0].filename == __file__
    assert torch.equal(out.value, net.module.a(x))
    with warnings.catch_warnings():
        warnings.simplefilter("error", CompileFallbackWarning)
        with net.trace(x, compile="graph"):
            net.a.output.save()
    assert net.compile_stats().fallbacks == 2


def test_a_compiled_call_that_skips_our_graph_is_caught():
    """If the model ran without our graph (here: dynamo disabled), the markers would run as plain
    hooks and the edit would be lost; that is noticed (by fullgraph, or by the artefact's own
    check that its graph ran) and the reference runs."""
    lm = make("llama")
    with torch._dynamo.config.patch(disable=True):
        with pytest.warns(CompileFallbackWarning, match="reference interpreter ran instead"):
            logits = zeroed_logits(lm, "graph")
    assert torch.equal(logits, zeroed_logits(lm, "off"))


def test_unknown_mode_is_located():
    lm = make("gpt2")
    with pytest.raises(Exception, match="did you mean 'inductor'") as err:
        lm.trace(A, compile="indcutor")
    assert f"{__file__}:" in str(err.value)


def test_explain_graph_shows_the_inserted_nodes_with_their_lines():
    lm = make("llama")
    with lm.trace(A, compile="graph") as tracer:
        lm.model.layers[1].output[:, -1] *= 2.0
        lm.lm_head.output.save()
    text = tracer.explain_graph()
    assert "# --- model.model.layers[1].output" in text
    assert f"{__file__}:" in text
    assert "  + " in text and "operator.setitem" in text


def test_ivx_run_compiled_and_explain_graph(tiny_dir, tmp_path):
    exp = tmp_path / "exp.ivx"
    exp.write_text(f'model "{tiny_dir}"\n'
                   'prompt p = "the eiffel tower is in"\n'
                   'sweep alpha in [0.5, 1.0, 2.0]\n'
                   'invoke p {\n'
                   '    model.model.layers[1].output[:, -1] *= alpha\n'
                   '    save logits = model.lm_head.output[:, -1]\n'
                   '}\n')
    results = {}
    for mode in ("graph", "off"):
        done = subprocess.run([sys.executable, "-m", "interp_dsl.cli", "run", str(exp), "--compile", mode,
                               "--out", str(tmp_path / mode), "--quiet"], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        results[mode] = load_results(tmp_path / mode)["logits"]
    assert torch.equal(results["graph"], results["off"])
    shown = subprocess.run([sys.executable, "-m", "interp_dsl.cli", "explain", str(exp), "--graph"],
                           capture_output=True, text=True)
    assert shown.returncode == 0, shown.stderr
    assert "exp.ivx:5:5" in shown.stdout and "  + " in shown.stdout


@pytest.mark.e2e
def test_smollm2_steering_sweep_compiles_once_and_equals_the_reference(smollm):
    from pathlib import Path

    from interp_dsl.ivx import load_experiment, run

    exp = load_experiment(Path(__file__).parent.parent / "examples" / "steering.ivx")
    before = smollm.compile_stats().compilations
    compiled = run(exp, smollm, compile="graph")
    assert smollm.compile_stats().compilations == before + 1
    reference = run(exp, smollm, compile="off")
    for name, value in reference.saves.items():
        assert torch.equal(compiled.saves[name], value)


def test_the_reference_interpreter_tests_pass_compiled():
    """The proxy-API test modules rerun with every trace in `graph` mode (IVX_COMPILE): their
    programs, checked against hand-written hooks, give the same results spliced into the graph."""
    import os
    from pathlib import Path
    tests = Path(__file__).parent
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "not e2e and not reference_only",
         *(str(tests / f) for f in ("test_walkthrough.py", "test_language_model.py", "test_models.py"))],
        env={**os.environ, "IVX_COMPILE": "graph"}, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:]


def test_a_layer_input_read_after_the_layer_before_is_written_sees_the_write(model):
    """The next layer's input is the written output (the graph must not hand back the old node)."""
    out, fallbacks = {}, model.compile_stats().fallbacks
    for mode in ("off", "graph"):
        with model.trace("the eiffel tower is in", compile=mode):
            layers(model)[0].output[:, -1, :] = layers(model)[0].output[:, -1, :] * -1.0
            x = layers(model)[1].input[:, -1, :].save()
            y = layers(model)[0].output[:, -1, :].save()
        out[mode] = x.value
        torch.testing.assert_close(x.value, y.value)
    torch.testing.assert_close(out["graph"], out["off"])
    assert model.compile_stats().fallbacks == fallbacks  # the module's model fell back in earlier tests
