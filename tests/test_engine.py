"""One Engine runs Programs: built by hand from IR records or by the proxy API, it gives the saves of
`model.trace` and of hand-written hooks; the config-only model is an engine with another site
source; no import cycle among interp_dsl's modules; bad model inputs are located errors."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import run_with_hooks, tiny_llama, word_tokenizer
from torch.testing import assert_close

from compiler.ir import Op, Program, Ref, Site
from interp_dsl import InterventionError, LanguageModel, Model
from runtime.engine import Engine, RecordedSites
from runtime.interpreter import Batch
from runtime.sweep_runner import SweepError

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "the eiffel tower is in"


def test_a_hand_built_program_runs_on_an_engine_like_a_trace_and_like_hooks(net):
    x = torch.randn(3, 5)
    program = Program((Op("read", result=0, site=Site("layer1", "output")),
                       Op("call", result=1, target="torch.relu", args=(Ref(0),)),
                       Op("save", target="h", args=(Ref(1),))))
    engine = Engine(net)
    typed, result = engine.run(program, Batch((x,), {}, (slice(0, 3),), 3), {})
    seen = {}
    run_with_hooks(net, {"input": x}, [(net.layer1, lambda m, i, o: seen.setdefault("h", o.relu()))])
    model = Model(net)
    with model.trace(x, compile="off"):
        traced = model.layer1.output.relu().save()
    assert_close(result.saves["h"], seen["h"])
    assert_close(traced.value, seen["h"])
    assert typed.program == program


def test_a_proxy_built_program_runs_on_the_engine_of_another_model(llama):
    with llama.scan(PROMPT) as tracer:
        llama.model.layers[1].output[:, -1, :] *= 0.5
        logits = llama.lm_head.output[:, -1].save("logits")
    program, batch, params = tracer.program(), tracer.batch(), tracer.params
    assert logits.shape == (1, 64)
    other = tiny_llama()  # same weights (seeded), a fresh module and engine
    _, result = Engine(other).run(program, batch, params)

    def halve(module, inputs, output):
        hidden = output[0] if isinstance(output, tuple) else output
        hidden[:, -1, :] *= 0.5
    with torch.no_grad():
        reference = run_with_hooks(other, batch.kwargs, [(other.model.layers[1], halve)]).logits[:, -1]
    with llama.trace(PROMPT, compile="off"):
        llama.model.layers[1].output[:, -1, :] *= 0.5
        traced = llama.lm_head.output[:, -1].save()
    assert_close(result.saves["logits"], reference)
    assert_close(traced.value, reference)


def test_check_only_returns_fake_saves_and_fake_engines_do_not_run(llama):
    with llama.scan(PROMPT) as tracer:
        llama.model.layers[0].output.save("h")
    engine = llama._engine
    _, result = engine.run(tracer.program(), tracer.batch(), {}, execute=False)
    assert [tuple(v.shape) for v in result.values.values()] == [(1, 5, 32)]
    fake = LanguageModel(tiny_llama().config, weights="fake")._engine
    with pytest.raises(InterventionError, match="no weights"):
        fake.run(tracer.program(), tracer.batch(), {})


def test_site_tables_are_cached_per_shape_and_compiled_state_is_the_engines(llama):
    engine = llama._engine
    with llama.scan(PROMPT) as tracer:
        llama.lm_head.output.save()
    batch = tracer.batch()
    assert engine.site_table(batch) is engine.site_table(batch)
    assert engine.compile_stats() is llama.compile_stats()
    engine.release_compiled()
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in llama.module.modules())


def test_the_config_only_model_is_an_engine_with_another_site_source(tiny_dir):
    from interp_dsl.config_models import ConfigSites, config_model_for
    spec = config_model_for(str(tiny_dir))
    assert type(spec) is LanguageModel and isinstance(spec._engine.sites, ConfigSites)
    real = LanguageModel(str(tiny_dir))
    assert isinstance(real._engine.sites, RecordedSites)
    shapes = []
    for model in (spec, real):
        with model.scan(PROMPT) as tracer:
            h = model.model.layers[1].mlp.output.save()
            logits = model.lm_head(model.model.norm(h)).save()
        table = model._engine.site_table(tracer.batch())
        shapes.append((tuple(h.shape), tuple(logits.shape), [e for e in table.order],
                       [tuple(getattr(v, "shape", ())) for v in table.values.values()]))
    assert shapes[0] == shapes[1]


INTERP_DSL = sorted(p.stem for p in (ROOT / "interp_dsl").glob("*.py") if p.stem != "__init__")


def test_every_module_imports_on_its_own():
    """Each module in a fresh interpreter (started together: torch's import dominates)."""
    runs = {name: subprocess.Popen([sys.executable, "-c", f"import interp_dsl.{name}"], cwd=ROOT,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for name in INTERP_DSL}
    failed = {name: run.communicate()[1] for name, run in runs.items() if run.wait() != 0}
    assert not failed, failed


def _imports(path: Path) -> set[str]:
    """Modules a file imports when it is loaded (module level, not under TYPE_CHECKING)."""
    out = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)
    return out


def test_no_import_cycle_among_interp_dsl_modules_and_runtime_stays_below():
    graph = {f"interp_dsl.{n}": {m for m in _imports(ROOT / "interp_dsl" / f"{n}.py")
                                 if m.removeprefix("interp_dsl.") in INTERP_DSL} for n in INTERP_DSL}
    done: set[str] = set()

    def visit(node: str, stack: tuple[str, ...]) -> None:
        assert node not in stack, f"import cycle: {' -> '.join((*stack, node))}"
        if node not in done:
            for child in graph[node]:
                visit(child, (*stack, node))
            done.add(node)
    for node in graph:
        visit(node, ())
    for package in ("runtime", "compiler"):
        for path in (ROOT / package).glob("*.py"):
            every = {n.module for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.ImportFrom)}
            assert not any((m or "").startswith("interp_dsl") for m in every), path


@pytest.mark.parametrize("prompt", ["", [], ["rome", ""]], ids=["empty", "no-prompts", "one-empty"])
def test_an_empty_prompt_is_a_located_error_where_it_is_given(llama, prompt):
    with pytest.raises(InterventionError, match="empty") as err:
        llama.trace(prompt)
    assert err.value.diagnostics[0].span.file == __file__ and "expected" in str(err.value)


def test_an_empty_invoke_or_token_row_is_a_located_error(llama):
    with pytest.raises(InterventionError, match='an empty prompt: expected text, found ""') as err:
        with llama.trace() as tracer:
            with tracer.invoke("rome"):
                llama.lm_head.output.save()
            with tracer.invoke(""):
                llama.lm_head.output.save()
    assert err.value.diagnostics[0].span.file == __file__
    assert llama._tracer is None
    with pytest.raises(InterventionError, match="row 0 of the token ids has no tokens: expected at least one"):
        llama.trace(torch.zeros(1, 0, dtype=torch.long))


def test_a_prompt_longer_than_the_context_names_the_prompt_and_both_lengths(llama):
    prompt = "the eiffel tower is in paris " * 13  # 78 tokens; the context is 64
    with pytest.raises(InterventionError) as err:
        with llama.trace(prompt):
            llama.lm_head.output.save()
    message = str(err.value)
    assert repr(prompt[:40] + "...") in message and "78 tokens" in message and "context is 64" in message
    assert err.value.diagnostics[0].span.file == __file__


PROMPTS = ["the eiffel tower is in", "paris is a city", "rome", "the colosseum is in the city of rome"]


@pytest.mark.parametrize("batch_size", [1, 32])
def test_a_whole_sequence_save_over_prompts_of_different_lengths_is_refused_at_every_batch_size(llama, batch_size):
    with pytest.raises(SweepError, match="has a value per token, and the prompts have different lengths "
                                         r"\(1 and 8 tokens\): a sweep's saves must not depend on prompt length"):
        with llama.sweep(PROMPTS, batch_size=batch_size, compile="off"):
            llama.model.layers[0].output.save("h")
    with llama.sweep(PROMPTS, batch_size=batch_size, compile="off") as last:  # one position: fine
        llama.model.layers[0].output[:, -1].save("h")
    same = ["the eiffel tower", "paris is a", "new york city"]  # one length: the sequence is the prompt's own
    with llama.sweep(same, batch_size=batch_size, compile="off") as whole:
        llama.model.layers[0].output.save("h")
    for i, prompt in enumerate(same):
        with llama.trace(prompt, compile="off"):
            h = llama.model.layers[0].output.save()
        assert_close(whole.results["h"][i], h.value[0])
    assert last.results["h"].shape == (4, 32)


def test_a_generation_on_a_module_without_config_is_a_located_error(net):
    from compiler.ir import Generation
    engine = Engine(net)
    with pytest.raises(InterventionError, match="cannot generate with interventions: Sequential is not a causal"):
        engine.site_table(Batch((torch.randn(1, 5),), {}, (slice(0, 1),), 1), Generation(2))


def test_language_models_are_thin_wrappers_over_their_engine(llama):
    assert llama.module is llama._engine.module and llama._engine.name == "LlamaForCausalLM"
    assert LanguageModel(tiny_llama(), tokenizer=word_tokenizer())._engine is not llama._engine
