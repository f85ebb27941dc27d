"""`ivx check`: the bad corpus as golden output, the examples passing, the output formats, the
symbolic cache, and no weights ever allocated."""

from __future__ import annotations

import contextlib
import io
import json
import os
from pathlib import Path

import pytest
from torch._subclasses.fake_tensor import FakeTensor

import interp_dsl.models as models
from interp_dsl.cli import main
from interp_dsl.ivx.check import check_files

ROOT = Path(__file__).resolve().parent.parent
BAD = sorted((ROOT / "tests" / "ivx_bad").glob("*.ivx"))


@pytest.fixture
def no_weights(monkeypatch):
    """Loading real weights, or building a model with real parameters, fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError("ivx check must not load weights")
    monkeypatch.setattr(models, "_load_directory", refuse)
    real_from_config = models._from_config
    monkeypatch.setattr(models, "_from_config",
                        lambda config, weights: refuse() if weights != "fake" else real_from_config(config, weights))


def run_check(args):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(["check", *args])
    return code, out.getvalue()


@pytest.mark.parametrize("path", BAD, ids=[p.stem for p in BAD])
def test_bad_file_check_message(path, tiny_dir, monkeypatch, no_weights):
    monkeypatch.chdir(ROOT)
    code, out = run_check([str(path.relative_to(ROOT)), "--model", str(tiny_dir)])
    got = f"exit {code}\n{out}"
    golden = path.with_suffix(".check.expected")
    if os.environ.get("IVX_REGOLD"):
        golden.write_text(got)
    assert got == golden.read_text()


def test_all_bad_files_in_one_run_sorted(tiny_dir, monkeypatch, no_weights):
    monkeypatch.chdir(ROOT)
    report = check_files([p.relative_to(ROOT) for p in BAD], str(tiny_dir))
    keys = [(d.span.file, d.span.line, d.span.col) for d in report.diagnostics]
    assert keys == sorted(keys)
    assert {Path(d.span.file).stem for d in report.diagnostics} == {p.stem for p in BAD}
    assert report.exit_code() == 2  # some files have syntax errors


def test_examples_pass_without_weights(monkeypatch, no_weights):
    monkeypatch.chdir(ROOT)
    report = check_files(sorted(Path("examples").glob("*.ivx")) + sorted(Path("examples/specs").glob("*.ivx")))
    assert report.diagnostics == [] and report.exit_code() == 0


def test_models_built_for_checking_hold_only_fake_tensors(tiny_dir):
    from interp_dsl.config_models import config_model_for
    spec = config_model_for(str(tiny_dir))
    with spec.scan("the eiffel tower"):
        spec.lm_head(spec.model.norm(spec.model.layers[0].output)).save()
    assert all(isinstance(p, FakeTensor) for p in spec.module.parameters())
    assert all(isinstance(p, FakeTensor) for p in spec._engine.sites.real().parameters())


def test_second_check_uses_the_cached_signature(tiny_dir, monkeypatch):
    import interp_dsl.config_models as spec
    check_files([ROOT / "tests" / "ivx_bad" / "index_out_of_range.ivx"], str(tiny_dir))
    monkeypatch.setattr(spec, "record_sites", lambda *a, **k: pytest.fail("no fake forward when cached"))
    monkeypatch.setattr(spec, "_build_real", lambda *a: pytest.fail("no model build when cached"))
    report = check_files([ROOT / "tests" / "ivx_bad" / "index_out_of_range.ivx"], str(tiny_dir))
    assert [d.message for d in report.errors] == [
        "index out of range writing model.model.layers[0].output: index 3 on dim 1 of size 3"]


def test_formats(tiny_dir, monkeypatch):
    monkeypatch.chdir(ROOT)
    path = "tests/ivx_bad/shape_mismatch.ivx"
    code, out = run_check([path, "--model", str(tiny_dir), "--format", "json"])
    records = json.loads(out)
    assert code == 1 and records == [{
        "file": path, "line": 4, "col": 5, "end_line": 4, "end_col": 55, "severity": "error",
        "message": "shape mismatch writing model.model.layers[0].output: the value must broadcast "
                   "to f32[1, 32], found f32[16]",
        "hint": "index the site to the part you mean to replace, e.g. [:, -1, :]"}]
    code, out = run_check([path, "--model", str(tiny_dir), "--format", "github"])
    assert out.startswith(f"::error file={path},line=4,col=5,endLine=4,endColumn=55::shape mismatch")
    code, out = run_check(["tests/ivx_bad/saves_nothing.ivx", "--model", str(tiny_dir), "--format", "github"])
    assert code == 0 and out.startswith("::warning file=tests/ivx_bad/saves_nothing.ivx,line=3")


def test_usage(capsys):
    assert main(["check", "no/such/file.ivx"]) == 2
    assert "no such file" in capsys.readouterr().err


def test_parse_cache_returns_the_same_tree_and_reports_syntax_errors(tmp_path):
    from grammar.parser import IvxSyntaxError, parse
    from interp_dsl.ivx.check import cached_parse
    text = (ROOT / "examples" / "steering.ivx").read_text()
    first, second = cached_parse(text, "s.ivx"), cached_parse(text, "s.ivx")
    assert first == second == parse(text, "s.ivx")
    assert [d.span for d in second.body] == [d.span for d in parse(text, "s.ivx").body]
    assert second.comments == parse(text, "s.ivx").comments
    with pytest.raises(IvxSyntaxError):
        cached_parse("x = [\n", "bad.ivx")
