"""`.ivx` sessions (several `trace` blocks) and `cache` statements, against their proxy-API twins
and hand-written hooks."""

from __future__ import annotations

import json

import pytest
import torch

from compiler.errors import InterventionError
from grammar.parser import parse
from grammar.printer import format_module
from interp_dsl import LanguageModel, load_results
from interp_dsl.cli import main
from interp_dsl.ivx import ExperimentError, load_experiment, lower_traces, run

CLEAN, CORRUPT = "the eiffel tower is in the city of", "rome is in the city of"

SESSION = f"""
# patch a clean activation into a corrupt prompt, across two traces
prompt clean = "{CLEAN}"
prompt corrupt = "{CORRUPT}"

let layer = model.model.layers[1]

trace {{
    invoke clean {{
        h = layer.output[:, -1, :]
        save clean_logits = model.lm_head.output[:, -1, :]
    }}
}}

trace {{
    invoke corrupt {{
        layer.output[:, -1, :] = h * 0.5
        save patched = model.lm_head.output[:, -1, :]
    }}
}}
"""


@pytest.fixture
def tiny(tiny_dir):
    return LanguageModel(str(tiny_dir))


def write(tmp_path, text, name="exp.ivx"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_a_session_file_equals_its_python_twin_and_a_hand_written_hook(tmp_path, tiny):
    path = write(tmp_path, SESSION)
    assert format_module(parse(path.read_text(), str(path))) == path.read_text().lstrip("\n")
    first, second = lower_traces(load_experiment(path), tiny, {})
    with tiny.session():
        with tiny.trace(CLEAN) as twin1:
            h = tiny.model.layers[1].output[:, -1, :]
            tiny.lm_head.output[:, -1, :].save("clean_logits")
        with tiny.trace(CORRUPT) as twin2:
            tiny.model.layers[1].output[:, -1, :] = h * 0.5
            tiny.lm_head.output[:, -1, :].save("patched")
    assert first.program() == twin1.program() and second.program() == twin2.program()
    assert second.typed.program.ops[0].span.file == str(path)

    # the reference: two plain forwards, the second with a forward hook writing the first's value
    module, tok = tiny._engine.module, tiny.tokenizer
    with torch.no_grad():
        kept = {}
        handle = module.model.layers[1].register_forward_hook(lambda m, i, o: kept.update(h=o[:, -1, :].clone()))
        clean_logits = module(**tok(CLEAN, return_tensors="pt")).logits[:, -1, :]
        handle.remove()

        def patch(m, i, o):
            o = o.clone()
            o[:, -1, :] = kept["h"] * 0.5
            return o
        handle = module.model.layers[1].register_forward_hook(patch)
        patched = module(**tok(CORRUPT, return_tensors="pt")).logits[:, -1, :]
        handle.remove()
    torch.testing.assert_close(first.result.saves["clean_logits"], clean_logits)
    torch.testing.assert_close(second.result.saves["patched"], patched)
    assert not torch.allclose(patched, module(**tok(CORRUPT, return_tensors="pt")).logits[:, -1, :])


def test_ivx_run_writes_every_traces_saves_and_does_not_rerun_a_complete_session(tmp_path, tiny_dir, tiny, capsys):
    path = write(tmp_path, SESSION.replace("prompt clean", "sweep scale in [0.5, 2.0]\nprompt clean")
                 .replace("h * 0.5", "h * scale"))
    out = tmp_path / "out"
    assert main(["run", str(path), "--model", str(tiny_dir), "--out", str(out)]) == 0
    results = load_results(out)
    assert results.complete and results.dims == [("scale", 2)]
    assert results["patched"].shape == (2, 1, tiny._engine.module.config.vocab_size)
    assert results["clean_logits"].shape == results["patched"].shape
    expected = run(load_experiment(path), tiny).saves  # one run per point, in memory
    torch.testing.assert_close(results.grid("patched")[0], expected["patched"])
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["session"] == 2 and len(manifest["ir"]) == 2
    capsys.readouterr()
    assert main(["run", str(path), "--model", str(tiny_dir), "--out", str(out)]) == 0
    assert "already complete; nothing ran" in capsys.readouterr().out
    path.write_text(path.read_text().replace("h * scale", "h * scale * 2.0"))
    assert main(["run", str(path), "--model", str(tiny_dir), "--out", str(out)]) == 1  # another experiment
    assert "different experiment" in capsys.readouterr().err


def test_a_session_check_finds_errors_in_later_traces_without_weights(tmp_path):
    path = write(tmp_path, """
model "smollm2-135m"
prompt clean = "The Eiffel Tower is in the city of"

trace {
    invoke clean {
        save h = model.model.layers[5].output[:, -1, :]
    }
}

trace {
    invoke clean {
        model.model.layers[5].output[:, 0, :64] = h
        save h = model.lm_head.output[:, -1, :]
    }
}
""")
    assert main(["check", str(path), "--format", "json"]) == 1


@pytest.mark.parametrize(("text", "line", "message"), [
    ("trace {\n    invoke p {\n        save a = model.lm_head.output\n    }\n}\n"
     "trace {\n    invoke p {\n        save a = model.lm_head.output\n    }\n}\n",
     10, "save a is also made by an earlier trace (line 5)"),
    ("trace {\n    invoke p {\n        save a = model.lm_head.output\n    }\n}\n"
     "invoke p {\n    save b = model.lm_head.output\n}\n",
     8, "this invoke is outside them"),
    ("trace {\n    invoke p {\n        save a = model.lm_head.output\n    }\n}\n"
     "save b = a + 1\n",
     8, "a statement after the last trace block runs in no trace"),
    ("generate max_new_tokens=2\ntrace {\n    invoke p {\n        save a = model.lm_head.output\n    }\n}\n",
     3, "generation is not part of sessions"),
    ("trace {\n    invoke p {\n        h = model.model.layers[0].output\n    }\n}\n"
     "trace {\n    invoke p {\n        save b = model.model.layers[1].output[:, :, :3] + h\n    }\n}\n",
     10, "broadcast"),
    ("trace {\n}\ntrace {\n    invoke p {\n        save a = model.lm_head.output\n    }\n}\n",
     3, "this trace block has no invoke"),
    ("trace {\n    invoke p {\n        cache ivx_hidden_x = model.lm_head\n    }\n}\n",
     5, "save names starting with 'ivx_hidden_' are the library's own"),
])
def test_session_mistakes_are_errors_at_their_lines(tmp_path, tiny, text, line, message):
    path = write(tmp_path, 'prompt p = "rome is in"\n\n' + text)
    with pytest.raises(InterventionError) as caught:
        lower_traces(load_experiment(path), tiny, {}, execute=False)
    found = caught.value.diagnostics[0]
    assert found.span.line == line and message in found.message, str(caught.value)


def test_session_values_do_not_leak_into_a_file_without_a_session(tmp_path, tiny):
    path = write(tmp_path, 'prompt p = "rome is in"\ninvoke p {\n    save a = model.lm_head.output[:, -1]\n'
                           '    save b = a * 2.0\n}\n')
    (trace,) = lower_traces(load_experiment(path), tiny, {})
    torch.testing.assert_close(trace.result.saves["b"], trace.result.saves["a"] * 2.0)


def test_cache_statements_save_each_modules_output_like_hooks(tmp_path, tiny):
    path = write(tmp_path, """
prompt p = "the eiffel tower is in the city of"

invoke p {
    cache acts = model.model.layers
    cache tail = [model.model.norm, model.lm_head]
}
""")
    assert format_module(parse(path.read_text(), str(path))) == path.read_text().lstrip("\n")
    (trace,) = lower_traces(load_experiment(path), tiny, {})
    module = tiny._engine.module
    outputs = {}
    names = {m: n for n, m in module.named_modules()}
    handles = [m.register_forward_hook(lambda m, i, o: outputs.update({names[m]: o}))
               for m in [*module.model.layers, module.model.norm, module.lm_head]]
    with torch.no_grad():
        module(**tiny.tokenizer(["the eiffel tower is in the city of"], return_tensors="pt"))
    for h in handles:
        h.remove()
    layers = len(module.model.layers)
    expected = {f"acts__model__layers__{i}": outputs[f"model.layers.{i}"] for i in range(layers)}
    expected |= {"tail__model__norm": outputs["model.norm"], "tail__lm_head": outputs["lm_head"]}
    assert sorted(trace.result.saves) == sorted(expected)
    for name, value in expected.items():
        torch.testing.assert_close(trace.result.saves[name], value)


def test_a_bare_cache_saves_every_module_the_forward_calls(tmp_path, tiny):
    path = write(tmp_path, 'prompt p = "rome is in"\ninvoke p {\n    cache all\n}\n')
    (trace,) = lower_traces(load_experiment(path), tiny, {})
    with tiny.trace("rome is in") as twin:
        cache = twin.cache()
    tensors = {key for key, entry in cache.items() if isinstance(entry.output, torch.Tensor)}
    assert {"model", "model.model", "model.model.rotary_emb"}.isdisjoint(tensors)  # outputs, tuples: left out
    assert len(trace.result.saves) == len(tensors) > 30
    for key in tensors:
        name = "__".join(["all", *key.split(".")[1:]])
        torch.testing.assert_close(trace.result.saves[name], cache[key].output)


@pytest.mark.parametrize(("modules", "message"), [
    ("[model.model.layers[0], 3]", "cache takes modules, not a number"),
    ("model.model.layer", "did you mean"),
    ("model.model.layers[0].output", "cache takes modules"),
    ("model.model.rotary_emb", "cache keeps tensors, and model.model.rotary_emb's output is a tuple"),
    ("model.model.layers[layer]", "cache names fixed modules, not one chosen by the sweep axis layer"),
])
def test_cache_of_something_else_is_an_error_at_its_line(tmp_path, tiny, modules, message):
    path = write(tmp_path, f'sweep layer in 0..2\nprompt p = "rome is in"\ninvoke p {{\n    cache c = {modules}\n}}\n')
    with pytest.raises(ExperimentError) as caught:
        lower_traces(load_experiment(path), tiny, {"layer": 0}, execute=False)
    found = caught.value.diagnostics[0]
    assert found.span.line == 4 and message in str(caught.value), str(caught.value)


def test_an_integer_from_an_earlier_trace_is_checked_and_used(tmp_path, tiny):
    path = write(tmp_path, f"""
prompt a = "{CLEAN}"
prompt b = "{CORRUPT}"

trace {{
    invoke a {{
        n = model.model.layers[0].output[0, 0, :3].argmax()
    }}
}}

trace {{
    invoke b {{
        save q = model.model.layers[0].output[:, :, :3] * n
    }}
}}
""")
    lower_traces(load_experiment(path), tiny, {}, execute=False)  # the check: a fake integer, no value
    first, second = lower_traces(load_experiment(path), tiny, {})
    hidden = {}
    module = tiny._engine.module
    handle = module.model.layers[0].register_forward_hook(lambda m, i, o: hidden.setdefault(len(hidden), o))
    with torch.no_grad():
        module(**tiny.tokenizer(CLEAN, return_tensors="pt"))
        module(**tiny.tokenizer(CORRUPT, return_tensors="pt"))
    handle.remove()
    torch.testing.assert_close(second.result.saves["q"], hidden[1][:, :, :3] * hidden[0][0, 0, :3].argmax())


@pytest.mark.parametrize(("body", "message"), [
    ("save t = model.model.layers[0].self_attn.output[1]", "save t: a session's results are tensors, and this is a NoneType"),
    ("save s = model.model.layers[1].output[0, :k]", "save s is [2, 32] at {'k': 2} and [1, 32] at {'k': 1}"),
])
def test_ivx_run_refuses_session_saves_it_cannot_stack_before_running(tmp_path, tiny_dir, capsys, body, message):
    path = write(tmp_path, f'sweep k in [1, 2]\nprompt p = "rome is in"\n\ntrace {{\n    invoke p {{\n'
                           f'        {body}\n    }}\n}}\n')
    out = tmp_path / "out"
    assert main(["run", str(path), "--model", str(tiny_dir), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert f"{path}:6:9: error: {message}" in err and "Traceback" not in err
    assert not (out / "manifest.json").exists()
