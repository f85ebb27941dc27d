"""README.md and docs/ are executed: their Python blocks run in order on SmolLM2 (README first,
then the docs in the order a reader meets them), their `ivx` commands run, and README's set-up
and test commands are CI's."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import pytest
import torch

from interp_dsl import load_results

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = [README, *(ROOT / "docs" / f"{name}.md" for name in ("api", "ivx", "compiled", "sweeps", "generation",
                                                             "remote", "architecture", "benchmarks"))]


def blocks(language: str, files: list[Path] = DOCS) -> list[tuple[Path, int, str]]:
    """(file, first line number, code) of each fenced block in `files`, in order."""
    out = []
    for path in files:
        text = path.read_text()
        for m in re.finditer(rf"^```{language}\n(.*?)^```", text, flags=re.S | re.M):
            out.append((path, text[: m.start(1)].count("\n") + 1, m.group(1)))
    return out


def test_every_doc_is_executed_here_and_linked_from_the_readme():
    written = {p.name for p in (ROOT / "docs").glob("*.md")} - {"vocabulary.md"}  # generated, no code
    assert written == {p.name for p in DOCS[1:]}
    readme = README.read_text()
    assert all(f"(docs/{name})" in readme for name in written)


def test_ci_runs_the_readme_commands():
    setup, test = (code.strip() for _, _, code in blocks("bash", [README]))
    ci = (ROOT / ".ci" / "run").read_text()
    assert setup[setup.index("pip install torch"):] in ci  # everything after creating the venv
    assert test in ci


@pytest.mark.e2e
def test_readme_python_blocks_run(smollm, monkeypatch):
    import interp_dsl
    monkeypatch.setattr(interp_dsl, "LanguageModel", lambda *a, **k: smollm)  # load once per session
    namespace: dict = {"__name__": "readme"}
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        for path, first_line, code in blocks("python"):
            padded = "\n" * (first_line - 1) + code  # spans point at the document's own lines
            exec(compile(padded, str(path), "exec"), namespace)
    out = printed.getvalue()
    assert out.splitlines()[0] == " Paris"
    assert namespace["model"].tokenizer.decode(namespace["transplanted"].argmax()) == " Paris"
    assert "index 12 on dim 1 of size 9" in out and "found f32[1, 9, 64]" in out
    assert f"{ROOT / 'docs' / 'api.md'}:" in out  # errors name the document's own lines
    assert namespace["width"] == 1536 and namespace["early"].shape == (1, 9, 576)
    rome, paris = namespace["generated"][:2]  # the steered generation sweep, coef 0.0 and 2.0
    assert rome.startswith(" Rome") and paris.startswith(" Paris"), namespace["generated"]


@pytest.mark.e2e
def test_readme_ivx_commands_run(smollm, monkeypatch, tmp_path, capsys):
    """Each `$ ivx ...` line of the README runs and succeeds (on the session's SmolLM2)."""
    import interp_dsl.ivx as experiment
    from interp_dsl.cli import main

    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(experiment, "resolve_model", lambda exp, override=None, weights=None: smollm)
    commands = [line[2:].split() for _, _, code in blocks("console") for line in code.splitlines()
                if line.startswith("$ ivx ")]
    assert len(commands) >= 4
    try:
        for argv in commands:
            argv = [a.replace("runs/", f"{tmp_path}/") for a in argv[1:]]
            argv = [p for a in argv for p in (sorted(map(str, Path().glob(a))) if "*" in a else [a])]
            assert main(argv) == 0, argv
    finally:
        import ray
        ray.shutdown()  # the local instance `--executor ray` started in this process
    out = capsys.readouterr().out
    probe, on_ray = load_results(tmp_path / "probe"), load_results(tmp_path / "probe-ray")
    assert on_ray.manifest["executor"] == {"kind": "ray", "workers": 2} and on_ray.complete
    assert torch.equal(on_ray["answer"], probe["answer"])
    torch.testing.assert_close(on_ray["h22"], probe["h22"], rtol=1e-5, atol=1e-5)  # 1 thread vs 2
    assert "1 prompts x layer[30] = 30 rows" in out and "p_paris: float32[rows]" in out
    pairs = load_results(tmp_path / "attribution-pairs")  # 32 clean/corrupt pairs, one backward per batch
    assert pairs.complete and pairs.n_prompts == 32 and pairs.grid("attribution").shape == (32, 30)
    assert torch.isfinite(pairs["attribution"]).all() and pairs["attribution"].abs().sum() > 0
    assert "%0 = read model.layers.29.output@0 : f32[1, 9, 576]" in out
    session = load_results(tmp_path / "steering_session")  # docs/ivx.md: a session of two traces
    assert session.complete and session.manifest["session"] == 2
    assert session.grid("p_paris").flatten().tolist() == sorted(session.grid("p_paris").flatten().tolist())
    assert "# trace 2 of 2" in out
    # the steered generation over a dataset, as `ivx show` prints it
    assert "[coef=1.0] 'Everyone knows that The Brandenburg Gate can be found in' -> \" Paris" in out


def test_readme_shows_the_patching_example_verbatim():
    shown = [code for _, _, code in blocks("ivx", [README])]
    assert shown and shown[0] == (ROOT / "examples" / "patching.ivx").read_text()
    sessions = [code for _, _, code in blocks("ivx", [ROOT / "docs" / "ivx.md"]) if "trace {" in code]
    assert sessions == [(ROOT / "examples" / "steering_session.ivx").read_text()]
