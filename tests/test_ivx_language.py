"""The .ivx language: parsing, canonical printing, round trips, fuzzing, lowering, the CLI."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from helpers import word_tokenizer
from hypothesis import given, settings
from hypothesis import strategies as st

from compiler.ir import SaveKey
from grammar import ast
from grammar.parser import IvxSyntaxError, parse
from grammar.printer import format_module
from interp_dsl import CheckError, LanguageModel, load_results
from interp_dsl.cli import main
from interp_dsl.ivx import ExperimentError, load_experiment, lower

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((ROOT / "examples").glob("*.ivx"))


# ------------------------------------------------------------------------------ parse and print
def test_examples_are_canonical():
    assert len(EXAMPLES) >= 7
    for path in EXAMPLES:
        module = parse(path.read_text(), str(path))
        assert format_module(module) == path.read_text(), path
        assert module.comments and module.comments[0].own_line  # each has a comment header


def test_fmt_keeps_comments_and_normalises_spacing():
    text = "# head\nmodel   'm'  # which\nsweep l in 0..3\ninvoke p {\n  x=model.a[l].output[:,-1]*2 # two\n  # end\n}\n"
    assert format_module(parse(text)) == (
        "# head\nmodel \"m\"  # which\n\nsweep l in 0..3\n\ninvoke p {\n"
        "    x = model.a[l].output[:, -1] * 2  # two\n    # end\n}\n")


names = st.sampled_from(["h", "x", "layer", "coef", "vec"])
ints = st.integers(0, 40).map(lambda v: ast.Literal(v))
floats = st.floats(0, 100, allow_nan=False, allow_infinity=False).map(lambda v: ast.Literal(v))
strings = st.text(st.characters(blacklist_categories=("Cs", "Cc")), max_size=8).map(lambda v: ast.Literal(v))
module_paths = st.lists(st.sampled_from(["model", "layers", "mlp", "lm_head"]), min_size=1, max_size=3).map(
    lambda parts: _path(parts))


def _path(parts):
    e = ast.ModelRef()
    for p in parts:
        e = ast.Attr(e, p)
    return e


def exprs():
    leaf = st.one_of(names.map(ast.Name), ints, floats, strings, st.just(ast.Literal(None)),
                     st.just(ast.Literal(True)),
                     module_paths.map(lambda p: ast.Attr(p, "output")))
    return st.recursive(leaf, lambda inner: st.one_of(
        st.builds(ast.BinOp, st.sampled_from(["+", "-", "*", "/", "//", "%", "@", "**"]), inner, inner),
        st.builds(ast.BinOp, st.sampled_from(["==", "<", ">="]), inner.filter(lambda e: not _is_cmp(e)),
                  inner.filter(lambda e: not _is_cmp(e))),
        st.builds(ast.Unary, st.sampled_from(["-", "~"]), inner),
        st.builds(ast.Attr, inner, names),
        st.builds(ast.Index, inner, st.lists(st.one_of(inner, st.builds(
            ast.Slice, st.none() | inner, st.none() | inner, st.none() | inner), st.just(ast.EllipsisLit())),
            min_size=1, max_size=3).map(tuple)),
        st.builds(ast.Call, inner, st.lists(inner, max_size=2).map(tuple),
                  st.lists(st.builds(ast.Kwarg, names, inner), max_size=2).map(tuple)),
        st.lists(inner, min_size=0, max_size=3).map(lambda xs: ast.TupleLit(tuple(xs))),
        st.lists(inner, max_size=3).map(lambda xs: ast.ListLit(tuple(xs))),
    ), max_leaves=8)


def _is_cmp(e):
    return isinstance(e, ast.BinOp) and e.op in ("==", "<", ">=")


statements = st.one_of(
    st.builds(ast.Assign, st.one_of(names.map(ast.Name), module_paths.map(lambda p: ast.Attr(p, "output"))),
              st.sampled_from(["=", "+=", "*="]), exprs()),
    st.builds(ast.Save, names, exprs()),
    st.builds(ast.Let, names, exprs()),
    st.just(ast.Stop()),
    st.builds(ast.Cache, names, st.none() | module_paths | st.lists(module_paths, max_size=2).map(
        lambda xs: ast.ListLit(tuple(xs)))),
)
declarations = st.one_of(
    st.builds(ast.ModelDecl, st.text(st.characters(blacklist_categories=("Cs", "Cc")), max_size=10)),
    st.builds(ast.PromptDecl, names, strings),
    st.builds(ast.SweepDecl, names, st.builds(ast.Range, st.integers(-3, 3), st.integers(4, 40))),
    st.builds(ast.SweepDecl, names, st.lists(st.one_of(ints, floats), min_size=1, max_size=4).map(
        lambda xs: ast.ListLit(tuple(xs)))),
    st.builds(ast.Invoke, names, st.lists(statements, max_size=4).map(tuple)),
    st.builds(ast.Trace, st.lists(st.one_of(statements, st.builds(
        ast.Invoke, names, st.lists(statements, max_size=2).map(tuple))), max_size=3).map(tuple)),
    statements,
)


@settings(max_examples=300, deadline=None)
@given(st.lists(declarations, max_size=6).map(lambda ds: ast.Module(tuple(ds))))
def test_generated_programs_print_and_parse_back_equal(module):
    text = format_module(module)
    again = parse(text)
    assert again == module
    assert format_module(again) == text


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=80))
def test_random_text_only_raises_our_syntax_error(text):
    try:
        parse(text)
    except IvxSyntaxError as e:
        assert e.diagnostics and all(d.span.line >= 1 for d in e.diagnostics)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(EXAMPLES), st.randoms(use_true_random=False))
def test_mutated_examples_only_raise_our_syntax_error(path, rng: random.Random):
    text = list(path.read_text())
    for _ in range(rng.randint(1, 4)):
        i = rng.randrange(len(text))
        choice = rng.random()
        if choice < 0.4:
            del text[i]
        elif choice < 0.8:
            text.insert(i, rng.choice("[](){}=:,.\"'#\n -+*/0a"))
        else:
            text[i] = rng.choice("[](){}=:,.\"' ")
    try:
        parse("".join(text))
    except IvxSyntaxError:
        pass


def test_several_syntax_errors_reported_in_line_order():
    with pytest.raises(IvxSyntaxError) as err:
        parse("invoke p {\n  x = a[0\n  y == 2\n  z = (1 +\n}\n", "f.ivx")
    lines = [d.span.line for d in err.value.diagnostics]
    assert lines == [2, 3, 4]
    assert "missing `]`" in str(err.value) and "`==` only compares" in str(err.value)


# ------------------------------------------------------------------------------------- lowering
def write(tmp_path, text, name="exp.ivx"):
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.fixture
def tiny(tiny_dir):
    return LanguageModel(str(tiny_dir))


def test_lowering_equals_the_proxy_twin(tmp_path, tiny):
    path = write(tmp_path, """
prompt a = "the eiffel tower is in the city of"
prompt b = "_ _ _ _ _ _ _ _"
invoke a {
    h = model.model.layers[1].output[:, -1, :]
}
invoke b {
    model.model.layers[1].output[:, -1, :] = h * 0.5
    model.model.layers[2].mlp.output *= 2.0
    save top = model.lm_head.output[:, -1, :].softmax(dim=-1).topk(3).indices
}
""")
    exp = load_experiment(path)
    dsl = lower(exp, tiny, {})
    with tiny.trace() as twin:
        with twin.invoke(["the eiffel tower is in the city of"]):
            h = tiny.model.layers[1].output[:, -1, :]
        with twin.invoke(["_ _ _ _ _ _ _ _"]):
            tiny.model.layers[1].output[:, -1, :] = h * 0.5
            tiny.model.layers[2].mlp.output *= 2.0
            top = tiny.lm_head.output[:, -1, :].softmax(dim=-1).topk(3).indices.save("top")
    assert dsl.program() == twin.program()
    assert torch.equal(dsl.result.saves["top"], top.value)
    assert dsl.typed.program.ops[0].span.file == str(path)


def test_an_edit_block_equals_the_edit_in_python_and_applies_to_every_invoke(tmp_path, tiny):
    path = write(tmp_path, """
prompt a = "the eiffel tower is in the city of"
prompt b = "rome is in"

edit {
    let layer = model.model.layers[1]
    layer.mlp.output[:, -1] = 0
}

invoke a {
    save ha = model.model.layers[1].mlp.output[:, -1]
}

invoke b {
    save hb = model.model.layers[1].mlp.output[:, -1]
    save top = model.lm_head.output[:, -1, :].argmax(dim=-1)
}
""")
    assert format_module(parse(path.read_text(), str(path))) == path.read_text().lstrip("\n")
    dsl = lower(load_experiment(path), tiny, {})
    with tiny.edit() as twin_model:
        tiny.model.layers[1].mlp.output[:, -1] = 0
    with twin_model.trace() as twin:
        with twin.invoke(["the eiffel tower is in the city of"]):
            tiny.model.layers[1].mlp.output[:, -1].save("ha")
        with twin.invoke(["rome is in"]):
            tiny.model.layers[1].mlp.output[:, -1].save("hb")
            top = tiny.lm_head.output[:, -1, :].argmax(dim=-1).save("top")
    assert dsl.program() == twin.program()
    assert dsl.result.saves["ha"].abs().sum() == 0 and dsl.result.saves["hb"].abs().sum() == 0
    assert torch.equal(dsl.result.saves["top"], top.value)
    assert dsl.typed.program.ops[1].span.file == str(path) and dsl.typed.program.ops[1].span.line == 7


def test_name_errors_are_all_reported_with_hints(tmp_path, tiny):
    path = write(tmp_path, """prompt a = "the eiffel tower"
invoke a {
    h = model.model.layrs[0].output
    x = sofmax(model.lm_head.output, dim=-1)
    y = hh + 1
}
invoke b {
    stop
}
""")
    exp = load_experiment(path)
    with pytest.raises(ExperimentError) as err:
        lower(exp, tiny, {})
    text = str(err.value)
    assert [d.span.line for d in err.value.diagnostics] == [3, 4, 5, 7]
    assert "did you mean 'layers'" in text and "did you mean 'softmax'" in text
    assert "unknown name 'hh'" in text and "unknown prompt 'b'" in text
    assert f"{path}:3:" in text


def test_check_errors_point_at_the_ivx_line(tmp_path, tiny):
    path = write(tmp_path, 'prompt a = "the eiffel tower"\ninvoke a {\n    model.model.layers[0].output[:, 5, :] = 0\n}\n')
    with pytest.raises(CheckError, match=rf"{path}:3:5: error: index out of range"):
        lower(load_experiment(path), tiny, {})


def test_prompts_from_files_and_tensors(tmp_path, tiny):
    from safetensors.torch import save_file

    from interp_dsl.ivx import sweep
    (tmp_path / "p.txt").write_text("the eiffel tower\nrome is in\n")
    (tmp_path / "p.jsonl").write_text('{"text": "the city of"}\n{"text": "paris"}\n')
    (tmp_path / "p.csv").write_text("id,text\n1,new york\n2,garden\n")
    save_file({"v": torch.ones(32)}, str(tmp_path / "v.safetensors"))
    path = write(tmp_path, """prompt a = lines("p.txt")
prompt b = jsonl("p.jsonl", field="text")
prompt c = csv("p.csv", column="text")
tensor v = load("v.safetensors", key="v")
invoke a {
    model.model.layers[0].output[:, -1, :] += v
    save ha = model.model.layers[0].output[:, -1, :]
}
invoke b {
    save hb = model.model.layers[0].output
}
invoke c {
    save hc = model.model.layers[0].output
}
""")
    exp = load_experiment(path)
    # files are streams: a sweep reads them row by row; checking and `lower` see the first row
    assert {n: list(s.rows()) for n, s in exp.sources.items()} == {
        "a": ["the eiffel tower", "rome is in"], "b": ["the city of", "paris"], "c": ["new york", "garden"]}
    assert exp.prompts == {"a": ["the eiffel tower"], "b": ["the city of"], "c": ["new york"]}
    assert lower(exp, tiny, {}).result.saves["ha"].shape == (1, 32)
    per_row = path.with_name("rows.ivx")  # a sweep's saves are per prompt: one position, not the sequence
    per_row.write_text(path.read_text().replace("layers[0].output\n", "layers[0].output[:, 0]\n"))
    results = sweep(load_experiment(per_row), tiny, batch_size=2).results
    assert results.n_prompts == 2 and results["ha"].shape == (2, 32) and results["hb"].shape == (2, 32)


@pytest.mark.parametrize("decl, message", [
    ('prompt a = lines("missing.txt")', "does not exist"),
    ('prompt a = jsonl("p.jsonl", field="txt")', "did you mean 'text'"),
    ('tensor v = load("v.safetensors", key="vv")', "did you mean 'v'"),
    ("sweep s in 5..5", "is empty"),
    ('sweep s in ["a"]', "sweep values are numbers"),
    ("prompt a = 3", "a prompt is a string"),
])
def test_bad_declarations(tmp_path, decl, message):
    from safetensors.torch import save_file
    (tmp_path / "p.jsonl").write_text('{"text": "x"}\n')
    save_file({"v": torch.ones(2)}, str(tmp_path / "v.safetensors"))
    with pytest.raises(ExperimentError, match=message) as err:
        load_experiment(write(tmp_path, decl + "\n"))
    assert err.value.diagnostics[0].span.line == 1


def test_sweep_points_and_stacking(tmp_path, tiny):
    from interp_dsl.ivx import run
    path = write(tmp_path, """prompt a = "the eiffel tower"
sweep layer in 0..3
sweep coef in [1.0, 2.0]
invoke a {
    model.model.layers[layer].output *= coef
    save h = model.model.layers[2].output[:, -1, :]
}
""")
    exp = load_experiment(path)
    output = run(exp, tiny)
    assert output.saves["h"].shape == (3, 2, 1, 32)
    assert len(output.points) == 6 and output.points[1] == {"layer": 0, "coef": 2.0}
    with tiny.trace("the eiffel tower"):
        tiny.model.layers[1].output *= 2.0
        expected = tiny.model.layers[2].output[:, -1, :].save()
    torch.testing.assert_close(output.saves["h"][1, 1], expected.value)
    assert len(set(output.ir_hashes)) == 3  # the coefficient is a parameter; the layer is not


# ------------------------------------------------------------------------------------------ CLI
def test_cli_run_writes_saves_and_manifest(tmp_path, tiny_dir, capsys):
    import json

    from safetensors.torch import load_file
    path = write(tmp_path, f'model "{tiny_dir}"\nprompt a = "the eiffel tower"\ninvoke a {{\n'
                           '    save logits = model.lm_head.output[:, -1, :]\n}\n')
    assert main(["run", str(path), "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "logits: float32[rows, 64]" in out and "top tokens" in out
    saves = load_file(str(tmp_path / "out" / "shard-00000.safetensors"))
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert saves["logits"].shape == (1, 64) and saves["__prompt__"].tolist() == [0]
    assert manifest["text"] == path.read_text() and len(manifest["ir_hash"]) == 64
    assert manifest["saves"]["logits"] == {"shape": [64], "dtype": "float32"} and manifest["complete"]
    assert "torch" in manifest["versions"]


def test_cli_explain_prints_typed_ir(tmp_path, tiny_dir, capsys):
    path = write(tmp_path, 'prompt a = "the eiffel tower"\ninvoke a {\n    save h = model.model.norm.output\n}\n')
    assert main(["explain", str(path), "--model", str(tiny_dir)]) == 0
    out = capsys.readouterr().out
    assert "%0 = read model.norm.output@0 : f32[1, 3, 32]" in out and f"{path}:3:14" in out


def test_cli_fmt(tmp_path, capsys):
    path = write(tmp_path, "sweep  x in 0..2\n")
    assert main(["fmt", str(path), "--check"]) == 1
    assert main(["fmt", str(path)]) == 0 and capsys.readouterr().out == "sweep x in 0..2\n"
    assert main(["fmt", str(path), "--write"]) == 0 and path.read_text() == "sweep x in 0..2\n"
    assert main(["fmt", str(path), "--check"]) == 0


@pytest.mark.parametrize("text, code", [
    ('model "M"\ninvoke a {\n  x = [\n}\n', 2),
    ('prompt a = "the"\ninvoke a {\n  x = nope + 1\n}\n', 1),
    ('prompt a = "the"\ninvoke a {\n  model.model.layers[0].output = model.model.layers[2].output\n}\n', 1),
])
def test_cli_exit_codes(tmp_path, tiny_dir, capsys, text, code):
    path = write(tmp_path, text)
    assert main(["run", str(path), "--model", str(tiny_dir), "--out", str(tmp_path / "o")]) == code
    err = capsys.readouterr().err
    assert f"{path}:" in err and "Traceback" not in err


def test_cli_usage_errors(tmp_path, capsys):
    assert main(["run", str(tmp_path / "missing.ivx")]) == 2
    assert "No such file" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    with pytest.raises(SystemExit) as e:
        main(["frobnicate"])
    assert e.value.code == 2
    path = write(tmp_path, 'prompt a = "the"\n')
    assert main(["run", str(path)]) == 1
    assert "names no model" in capsys.readouterr().err


def test_cli_explain_ivx_output_runs_with_runtime_prompt_and_param(tmp_path, tiny_dir, capsys):
    from safetensors.torch import save_file
    save_file({"v": torch.ones(32)}, str(tmp_path / "v.safetensors"))
    path = write(tmp_path, 'prompt a = "the eiffel tower"\ntensor v = load("v.safetensors")\ninvoke a {\n'
                           '    model.model.layers[0].output[:, -1, :] += v\n'
                           '    save h = model.model.norm.output[:, -1, :]\n}\n')
    assert main(["explain", str(path), "--model", str(tiny_dir), "--ivx"]) == 0
    text = "".join(line for line in capsys.readouterr().out.splitlines(True) if not line.startswith("#"))
    assert "prompt invoke0\n" in text and "param p0: f32[32]\n" in text
    decompiled = write(tmp_path, text, "decompiled.ivx")
    args = ["--model", str(tiny_dir), "--prompt", "invoke0=the eiffel tower", "--param", f"p0={tmp_path / 'v.safetensors'}"]
    assert main(["run", str(path), "--model", str(tiny_dir), "--out", str(tmp_path / "a"), "--quiet"]) == 0
    assert main(["run", str(decompiled), *args, "--out", str(tmp_path / "b"), "--quiet"]) == 0
    from interp_dsl import load_results
    torch.testing.assert_close(load_results(tmp_path / "a")["h"], load_results(tmp_path / "b")["h"])
    assert main(["run", str(decompiled), "--model", str(tiny_dir), "--param", "p0"]) == 2
    assert "--param expects NAME=VALUE" in capsys.readouterr().err
    assert main(["run", str(decompiled), "--model", str(tiny_dir)]) == 1
    err = capsys.readouterr().err
    assert f"{decompiled}:1:1: error: prompt invoke0 has no text" in err and "param p0 has no value" in err


def test_zipped_sweeps_move_together(tmp_path, tiny, capsys):
    from grammar.parser import parse
    from grammar.printer import format_module
    from interp_dsl.ivx import sweep
    text = """prompt a = ["the eiffel tower", "rome is in"]
sweep layer in 0..2
sweep coef, shift in zip([1.0, 2.0, 3.0], [0.0, 0.5, 1.0])
invoke a {
    model.model.layers[0].output[:, -1, :] *= coef
    model.model.layers[0].output[:, -1, :] += shift
    save h = model.model.layers[layer].output[:, -1, :]
}
"""
    canonical = format_module(parse(text, "exp.ivx"))
    assert "\nsweep coef, shift in zip([1.0, 2.0, 3.0], [0.0, 0.5, 1.0])\n" in canonical
    assert format_module(parse(canonical, "exp.ivx")) == canonical
    exp = load_experiment(write(tmp_path, text))
    assert exp.axes() == [("layer",), ("coef", "shift")]
    assert len(exp.points()) == 6 and exp.points()[1] == {"layer": 0, "coef": 2.0, "shift": 0.5}
    results = sweep(exp, tiny, batch_size=2).results
    assert results.dims == [("coef+shift", 3), ("layer", 2)]
    grid = results.grid("h")
    for j, (c, s) in enumerate([(1.0, 0.0), (2.0, 0.5), (3.0, 1.0)]):
        with tiny.trace("rome is in"):
            tiny.model.layers[0].output[:, -1, :] *= c
            tiny.model.layers[0].output[:, -1, :] += s
            h = tiny.model.layers[1].output[:, -1, :].save()
        torch.testing.assert_close(grid[1, j, 1], h.value[0], atol=1e-5, rtol=1e-5)
    bad = write(tmp_path, 'sweep a, b in zip([1.0, 2.0], [1.0])\n', "bad.ivx")
    with pytest.raises(ExperimentError, match="a has 2, b has 1") as err:
        load_experiment(bad)
    assert err.value.diagnostics[0].span.line == 1


# ------------------------------------------------------------------------------------ generation
GENERATE = """model "{model}"
prompt a = "the eiffel tower is in the city of"
generate max_new_tokens=4, seed=0
invoke a {{
    steps all {{
        model.model.layers[1].output[:, -1, :] *= 0.5
        save top = argmax(model.lm_head.output[:, -1, :], dim=-1)
    }}
    steps [1:3] {{
        save h = model.model.layers[2].output
    }}
    save ids = model.generator.output
}}
"""


def test_generate_block_lowers_to_the_proxy_twin(tmp_path, tiny, tiny_dir):
    path = write(tmp_path, GENERATE.format(model=tiny_dir))
    dsl = lower(load_experiment(path), tiny, {})
    with tiny.generate(max_new_tokens=4, seed=0) as tracer:
        with tracer.invoke(["the eiffel tower is in the city of"]):
            with tracer.all():
                tiny.model.layers[1].output[:, -1, :] *= 0.5
                top = torch.argmax(tiny.lm_head.output[:, -1, :], dim=-1).save("top")
            with tracer.iter[1:3]:
                tiny.model.layers[2].output.save("h")
            ids = tiny.generator.output.save("ids")
    assert dsl.program() == tracer.program()
    assert torch.equal(dsl.result.saves["ids"], ids.value)
    assert dsl.result.saves["top"] == top.value  # a steps block's save: a list, one value per step
    assert set(dsl.result.saved) == {SaveKey("ids"), *(SaveKey("top", k) for k in range(4)),
                                     SaveKey("h", 1), SaveKey("h", 2)}


def test_cli_runs_a_generation(tmp_path, tiny_dir, capsys):
    path = write(tmp_path, GENERATE.format(model=tiny_dir).replace(
        "generate max_new_tokens=4, seed=0", "sweep scale in [0.5, 1.0]\ngenerate max_new_tokens=4, seed=0"
    ).replace("*= 0.5", "*= scale"))
    out = tmp_path / "out"
    assert main(["run", str(path), "--out", str(out), "--compile", "off"]) == 0
    printed = capsys.readouterr().out
    results = load_results(out)
    assert results.dims == [("scale", 2)]
    top, ids, h, new = (results.grid(name)[0] for name in ("top", "ids", "h", "__ids__:a"))  # [scale, ...]
    assert ids.shape == (2, 8 + 4) and top.shape == (2, 4) and h.shape == (2, 2, 1, 32)  # steps stacked
    assert torch.equal(top, ids[:, 8:]) and torch.equal(new, ids[:, 8:])  # greedy: the argmax is the token
    for scale, text in zip([0.5, 1.0], results.texts["a"], strict=True):
        assert text == word_tokenizer().decode(new[[0.5, 1.0].index(scale)], skip_special_tokens=True)
        assert f"[scale={scale}] 'the eiffel tower is in the city of' -> {text!r}" in printed
    for scale in (0.5, 1.0):  # each point equals its own one-prompt run
        alone = lower(load_experiment(path), LanguageModel(str(tiny_dir)), {"scale": scale}, compile="off")
        assert torch.equal(alone.result.saves["ids"][0], ids[[0.5, 1.0].index(scale)])
    assert main(["show", str(out)]) == 0
    shown = capsys.readouterr().out
    assert "generation: max_new_tokens=4, seed=0" in shown and "[scale=1.0] 'the eiffel tower" in shown
    assert main(["check", str(path), "--model", str(tiny_dir)]) == 0
    assert main(["explain", str(path)]) == 0
    assert "model.layers.1.call3.output" in capsys.readouterr().out  # step 3 of a once-per-step module
    assert main(["explain", "--ivx", str(path)]) == 2


@pytest.mark.parametrize("text, message", [
    ("generate max_new_tokenz=3\n", "did you mean 'max_new_tokens'"),
    ("generate max_new_tokens=0\n", "max_new_tokens must be >= 1"),
    ("invoke a {\n    steps all {\n        save h = model.model.norm.output\n    }\n}\n",
     "a steps block is for generation"),
    ("generate max_new_tokens=2\ninvoke a {\n    steps [3] {\n        save h = model.model.norm.output\n    }\n}\n",
     "step 3 does not exist: this generation has 2 steps"),
])
def test_generation_errors_point_at_the_line(tmp_path, tiny_dir, capsys, text, message):
    path = write(tmp_path, f'model "{tiny_dir}"\nprompt a = "the eiffel tower"\n' + text)
    assert main(["run", str(path), "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert message in err and f"{path}:" in err


def test_a_generation_streams_a_prompt_file(tmp_path, tiny_dir, capsys):
    rows = ["the eiffel tower", "paris is", "rome"]
    (tmp_path / "rows.txt").write_text("\n".join(rows) + "\n")
    path = write(tmp_path, f'model "{tiny_dir}"\nprompt a = lines("rows.txt")\ngenerate max_new_tokens=2\n'
                           'invoke a {\n    save last = model.generator.output[:, -1]\n}\n')
    out = tmp_path / "out"
    assert main(["run", str(path), "--out", str(out), "--batch-size", "2"]) == 0
    results = load_results(out)
    assert results.annotations["prompt:a"] == rows and len(results.texts["a"]) == 3
    model = LanguageModel(str(tiny_dir))
    for i, row in enumerate(rows):
        with model.generate(row, max_new_tokens=2, compile="off"):
            ids = model.generator.output.save()
        assert results["__ids__:a"][i].tolist() == ids.value[0, -2:].tolist()
        assert results["last"][i] == ids.value[0, -1]
    (tmp_path / "rows.txt").write_text("\n".join(rows) + "\nnew york\n")
    assert main(["run", str(path), "--out", str(out)]) == 1  # the prompts changed: refused, named
    assert "the number of prompts: 3 there, 4 now" in capsys.readouterr().err


def test_a_per_token_save_over_prompts_of_two_lengths_is_refused_at_its_line(tmp_path, tiny_dir, capsys):
    (tmp_path / "rows.txt").write_text("the eiffel tower\nrome\n")
    path = write(tmp_path, f'model "{tiny_dir}"\nprompt a = lines("rows.txt")\ngenerate max_new_tokens=2\n'
                           'invoke a {\n    save ids = model.generator.output\n}\n')
    assert main(["run", str(path), "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert f"{path}:5:5: error: save ids has a value per token" in err and "kept for you as __ids__:" in err


def test_a_bad_generation_point_is_refused_before_any_point_runs(tmp_path, tiny_dir, capsys):
    path = write(tmp_path, f'model "{tiny_dir}"\nprompt a = "the eiffel tower"\nsweep layer in [0, 1, 7]\n'
                           'generate max_new_tokens=2\ninvoke a {\n    steps all {\n'
                           '        model.model.layers[layer].output[:, -1, :] *= 0.5\n    }\n}\n')
    out = tmp_path / "out"
    assert main(["run", str(path), "--out", str(out)]) == 1
    assert f"{path}:7:9: error: model.model.layers has 3 modules; index 7 is out of range" in capsys.readouterr().err
    assert not out.exists()


def test_a_bad_step_selector_is_a_syntax_error(tmp_path, capsys):
    path = write(tmp_path, 'prompt a = "x"\ngenerate max_new_tokens=2\ninvoke a {\n    steps every {\n    }\n}\n')
    assert main(["fmt", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"{path}:4:11: error: syntax error: unexpected 'every'" in err and "expected `[` or `all`" in err


def test_fmt_keeps_a_comment_on_a_closing_brace():
    text = "trace {\n    invoke p {\n        save a = model.x.output  # a\n    }  # end invoke\n}  # end trace\n"
    assert format_module(parse(text)) == text
