"""Bad input reaches the user as a located error, never as an internal one: prompt files that are
not UTF-8 (or malformed), `.ivx` files that are binary, tensor files that are truncated, sweeps too
large to run. Each case runs the real `ivx` command and checks the exit code and the file:line."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from grammar.parser import IvxSyntaxError
from interp_dsl.cli import main
from interp_dsl.ivx import MAX_SWEEP_POINTS, experiment_from_text, load_experiment

SAVE = "invoke p {\n    save h = model.model.norm.output[:, -1, :]\n}\n"
GOOD = "the eiffel tower"


def ivx(capsys, *args):
    """Exit code, and stdout and stderr together."""
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    assert "Traceback" not in out.err and "internal error" not in out.err
    return code, out.out + out.err


def experiment(tmp_path, model, prompt, extra=""):
    path = tmp_path / "exp.ivx"
    path.write_text(f'model "{model}"\nprompt p{prompt}\n{extra}{SAVE}')
    return path


# ------------------------------------------------------------------------------- prompt files
BAD_FILES = {  # name -> bytes with a bad byte on line 3
    "p.txt": f"{GOOD}\n{GOOD}\nthe \xff tower\n".encode("latin-1"),
    "p.jsonl": "".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in (GOOD, GOOD, "the \xff")).encode("latin-1"),
    "p.csv": f"text\n{GOOD}\nthe \xff tower\n".encode("latin-1"),
}
SOURCES = {"p.txt": 'lines("p.txt")', "p.jsonl": 'jsonl("p.jsonl")', "p.csv": 'csv("p.csv")'}


@pytest.mark.parametrize("name", BAD_FILES)
def test_prompt_file_not_utf8_names_file_and_line(tmp_path, tiny_dir, capsys, name):
    (tmp_path / name).write_bytes(BAD_FILES[name])
    path = experiment(tmp_path, tiny_dir, f" = {SOURCES[name]}")
    code, out = ivx(capsys, "run", path, "--out", tmp_path / "out", "--quiet")
    assert code == 1 and f"{tmp_path / name}:3:" in out
    assert "not UTF-8 text: byte 0xff" in out


@pytest.mark.parametrize("name", BAD_FILES)
def test_prompts_flag_file_not_utf8(tmp_path, tiny_dir, capsys, name):
    (tmp_path / name).write_bytes(BAD_FILES[name])
    path = experiment(tmp_path, tiny_dir, "")
    code, out = ivx(capsys, "run", path, "--prompts", tmp_path / name, "--out", tmp_path / "out", "--quiet")
    assert code == 1 and f"{tmp_path / name}:" in out and "not UTF-8" in out


def test_first_row_not_utf8_is_an_error_at_the_declaration(tmp_path, tiny_dir, capsys):
    (tmp_path / "p.txt").write_bytes(b"\xfe the tower\n")
    path = experiment(tmp_path, tiny_dir, ' = lines("p.txt")')
    code, out = ivx(capsys, "check", path)
    assert code == 1 and f"{path}:2:" in out and f"{tmp_path / 'p.txt'}:1:1" in out


@pytest.mark.parametrize("name, text, line, message", [
    ("p.csv", f"id,text\n1,{GOOD}\n2\n", 3, "the row has 1 of the 2 columns"),
    ("p.csv", f'text\n{GOOD}\n"{"a" * 200_000}"\n', 3, "not a CSV record: field larger than field limit"),
    ("p.jsonl", json.dumps({"text": GOOD}) + "\n" + "[" * 100_000 + "]" * 100_000 + "\n", 2,
     "not a JSON record: maximum recursion depth"),
    ("p.jsonl", json.dumps({"text": GOOD}) + '\n{"text": ' + "1" * 5000 + "}\n", 2, "not a JSON record: Exceeds"),
    ("p.jsonl", json.dumps({"text": GOOD}) + '\n{"text": 3}\n', 2, "field 'text' holds 3, expected a string"),
])
def test_malformed_prompt_records(tmp_path, tiny_dir, capsys, name, text, line, message):
    (tmp_path / name).write_text(text)
    path = experiment(tmp_path, tiny_dir, f" = {SOURCES[name]}")
    code, out = ivx(capsys, "run", path, "--out", tmp_path / "out", "--quiet")
    assert code == 1 and f"{tmp_path / name}:{line}: error: {message}" in out


def test_byte_order_mark_is_not_part_of_the_first_prompt(tmp_path, tiny_dir, capsys):
    (tmp_path / "p.csv").write_text(f"text\n{GOOD}\n", encoding="utf-8-sig")
    path = experiment(tmp_path, tiny_dir, ' = csv("p.csv")')
    assert load_experiment(path).prompts["p"] == [GOOD]


def test_bad_byte_found_mid_sweep_keeps_shards_and_resumes(tmp_path, tiny_dir, capsys):
    """The second of two zipped files is read as the sweep streams: its bad line 9 stops the
    sweep after two complete shards of four prompts, which stay; a rerun resumes after them."""
    (tmp_path / "a.txt").write_text(f"{GOOD}\n" * 12)
    bad = tmp_path / "b.txt"
    bad.write_bytes(f"{GOOD}\n".encode() * 8 + b"the \xff\n" + f"{GOOD}\n".encode() * 3)
    path = tmp_path / "exp.ivx"
    path.write_text(f'model "{tiny_dir}"\nprompt a = lines("a.txt")\nprompt b = lines("b.txt")\n'
                    "invoke a {\n    save h = model.model.norm.output[:, -1, :]\n}\n"
                    "invoke b {\n    save g = model.model.norm.output[:, -1, :]\n}\n")
    out = tmp_path / "out"
    args = ("run", path, "--out", out, "--quiet", "--batch-size", 2, "--shard-size", 4)
    code, text = ivx(capsys, *args)
    assert code == 1 and f"{bad}:9:5: error: not UTF-8 text" in text and "stopped after 8 prompts" in text
    manifest = json.loads((out / "manifest.json").read_text())
    assert not manifest["complete"] and [s["prompts"] for s in manifest["shards"]] == [[0, 4], [4, 8]]
    assert manifest["stopped"]["after_prompts"] == 8 and f"{bad}:9:5" in manifest["stopped"]["errors"][0]
    assert load_file(str(out / "shard-00001.safetensors"))["__prompt__"].tolist() == [4, 5, 6, 7]
    bad.write_text(f"{GOOD}\n" * 12)
    assert ivx(capsys, *args)[0] == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] and "stopped" not in manifest and manifest["shards"][-1]["prompts"] == [8, 12]


def test_failure_before_any_shard_leaves_the_directory_alone(tmp_path, tiny_dir, capsys):
    (tmp_path / "p.txt").write_bytes(f"{GOOD}\n".encode() * 3 + b"\xff\n")
    path = experiment(tmp_path, tiny_dir, ' = lines("p.txt")')
    code, out = ivx(capsys, "run", path, "--out", tmp_path / "out", "--quiet")
    assert code == 1 and f"{tmp_path / 'p.txt'}:4:1" in out and "stopped after" not in out
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------------- .ivx files
@pytest.mark.parametrize("command", ["check", "run", "fmt", "explain"])
@pytest.mark.parametrize("data, where, found", [
    (b'model "m"\nprompt p = "caf\xe9"\n', ":2:16", "byte 0xe9 is not UTF-8 (byte offset 25)"),
    (b"\x7fELF\x02\x01\x01\x00\x00", ":1:8", "a NUL byte: this is a binary file (byte offset 7)"),
])
def test_unreadable_ivx_file(tmp_path, capsys, command, data, where, found):
    path = tmp_path / "exp.ivx"
    path.write_bytes(data)
    code, out = ivx(capsys, command, path)
    assert code == 2 and f"{path}{where}: error: cannot read this file as .ivx text: {found}" in out


def test_unreadable_ivx_file_is_reported_with_the_others(tmp_path, tiny_dir, capsys):
    bad, good = tmp_path / "a.ivx", tmp_path / "b.ivx"
    bad.write_bytes(b"\xff\n")
    good.write_text(f'model "{tiny_dir}"\nprompt p = "{GOOD}"\n{SAVE}')
    code, out = ivx(capsys, "check", bad, good, "--format", "json")
    assert code == 2 and [(d["file"], d["line"]) for d in json.loads(out)] == [(str(bad), 1)]


def test_load_experiment_on_a_binary_file(tmp_path):
    path = tmp_path / "exp.ivx"
    path.write_bytes(b"sweep i in 0..3\n\x00")
    with pytest.raises(IvxSyntaxError, match=rf"{path}:2:1: error: .*binary file \(byte offset 16\)"):
        load_experiment(path)


# ------------------------------------------------------------------------------- tensor files
def tensor_files(tmp_path):
    save_file({"v": torch.ones(32)}, tmp_path / "good.safetensors")
    data = (tmp_path / "good.safetensors").read_bytes()
    (tmp_path / "trunc.safetensors").write_bytes(data[:-20])
    (tmp_path / "junk.safetensors").write_bytes(b"not a tensor file at all")
    (tmp_path / "empty.safetensors").write_bytes(b"")


@pytest.mark.parametrize("name, found", [
    ("trunc", "incomplete metadata, file not fully covered"), ("junk", "header too large"),
    ("empty", "header too small")])
@pytest.mark.parametrize("command", ["check", "run"])
def test_corrupt_tensor_file_in_load(tmp_path, tiny_dir, capsys, name, found, command):
    tensor_files(tmp_path)
    path = experiment(tmp_path, tiny_dir, f' = "{GOOD}"', f'tensor v = load("{name}.safetensors", key="v")\n')
    code, out = ivx(capsys, command, path, *(["--out", tmp_path / "out"] if command == "run" else []))
    assert code == 1 and f"{path}:3:12: error: cannot read {tmp_path / name}.safetensors as safetensors" in out
    assert found in out


def test_tensor_key_errors_in_load(tmp_path, tiny_dir, capsys):
    save_file({"a": torch.ones(32), "b": torch.ones(32)}, tmp_path / "two.safetensors")
    for call, message in [('load("two.safetensors")', "holds 2 tensors; say which one"),
                          ('load("two.safetensors", key="c")', "has no tensor 'c'")]:
        path = experiment(tmp_path, tiny_dir, f' = "{GOOD}"', f"tensor v = {call}\n")
        code, out = ivx(capsys, "check", path)
        assert code == 1 and f"{path}:3:12: error: {tmp_path / 'two.safetensors'} {message}" in out


@pytest.mark.parametrize("value, code, message", [
    ("trunc.safetensors", 1, "--param v: error: cannot read trunc.safetensors as safetensors: "),
    ("junk.safetensors:v", 1, "header too large"),
    ("good.safetensors:w", 1, "--param v: error: good.safetensors has no tensor 'w'"),
    ("missing.safetensors", 2, "--param v=missing.safetensors: expected a number or FILE.safetensors[:KEY]"),
    ("abc", 2, "there is no file 'abc'"),
    ("", 2, "--param v=: expected a number"),
])
def test_param_values(tmp_path, tiny_dir, capsys, monkeypatch, value, code, message):
    tensor_files(tmp_path)
    monkeypatch.chdir(tmp_path)
    path = experiment(tmp_path, tiny_dir, f' = "{GOOD}"', "param v: f32[32]\n")
    got, out = ivx(capsys, "run", path, "--out", tmp_path / "out", "--quiet", "--param", f"v={value}")
    assert got == code and message in out


# ------------------------------------------------------------------------------------- sweeps
@pytest.mark.parametrize("sweeps, line, found", [
    ("sweep i in 0..99999999999999999999", 3, "sweep i has 99,999,999,999,999,999,999 values"),
    ("sweep i in -99999999999999999999..0", 3, "sweep i has 99,999,999,999,999,999,999 values"),
    ("sweep i, j in zip(0..2000000, 0..2000000)", 3, "sweep i has 2,000,000 values"),
    ("sweep i in 0..1000\nsweep c in [1.0, 2.0]\nsweep j in 0..1000", 5, "the sweep has 2,000,000 points with this axis"),
])
def test_sweep_too_large(tmp_path, tiny_dir, capsys, sweeps, line, found):
    path = experiment(tmp_path, tiny_dir, f' = "{GOOD}"', sweeps + "\n")
    code, out = ivx(capsys, "check", path)
    assert code == 1 and f"{path}:{line}:1: error: {found}; an experiment sweeps at most 1,000,000 points" in out


def test_largest_sweep_is_a_range_not_a_list():
    exp = experiment_from_text(f"sweep i in 0..{MAX_SWEEP_POINTS}\n", "exp.ivx")
    assert exp.sweeps["i"] == range(MAX_SWEEP_POINTS)


# ------------------------------------------------------------------------- other CLI input
def test_undeclared_prompt_or_param_is_an_error(tmp_path, tiny_dir, capsys):
    path = experiment(tmp_path, tiny_dir, f' = "{GOOD}"', "param coef: float\n")
    code, out = ivx(capsys, "run", path, "--out", tmp_path / "out", "--param", "coef=1", "--param", "cof=2")
    assert code == 1 and f"{path}: error: a value is given for 'cof', which is not a prompt or param" in out
    assert "did you mean 'coef'" in out


@pytest.mark.parametrize("decl, given", [(' = lines("d.txt")', ()), ("", ("--prompts", "d.txt"))])
def test_prompt_file_that_is_a_directory(tmp_path, tiny_dir, capsys, monkeypatch, decl, given):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "d.txt").mkdir()
    path = experiment(tmp_path, tiny_dir, decl)
    code, out = ivx(capsys, "run", path, *given, "--out", tmp_path / "out", "--quiet")
    assert code == 1 and "d.txt is a directory" in out and (not decl or f"{path}:2:12" in out)


def test_out_is_a_file(tmp_path, tiny_dir, capsys):
    (tmp_path / "out").write_text("")
    code, out = ivx(capsys, "run", experiment(tmp_path, tiny_dir, f' = "{GOOD}"'), "--out", tmp_path / "out")
    assert code == 2 and f"--out {tmp_path / 'out'} is a file" in out


@pytest.mark.parametrize("manifest, message", [
    (b"[]", "{out} does not hold sweep results"),
    (b'{"format": "interp_dsl.sweep/1"}', "the manifest is damaged: it has no shards, complete, points"),
    (b'{"a": "\xff"}', "cannot read the manifest: 'utf-8' codec"),
])
def test_damaged_manifest(tmp_path, tiny_dir, capsys, manifest, message):
    out = tmp_path / "out"
    out.mkdir()
    (out / "manifest.json").write_bytes(manifest)
    code, text = ivx(capsys, "run", experiment(tmp_path, tiny_dir, f' = "{GOOD}"'), "--out", out)
    assert code == 1 and f"{out / 'manifest.json'}: error: {message.format(out=out)}" in text


def test_show_damaged_manifest(tmp_path, capsys):
    (tmp_path / "manifest.json").write_text('{"format": "interp_dsl.sweep/1", "shards": []}')
    code, text = ivx(capsys, "show", tmp_path)
    assert code == 1 and f"{tmp_path / 'manifest.json'}: error: the manifest is damaged: it has no complete" in text


def test_truncated_shard(tmp_path, tiny_dir, capsys):
    path, out = experiment(tmp_path, tiny_dir, f' = "{GOOD}"'), tmp_path / "out"
    assert ivx(capsys, "run", path, "--out", out, "--quiet")[0] == 0
    shard = out / "shard-00000.safetensors"
    shard.write_bytes(shard.read_bytes()[:-8])
    code, text = ivx(capsys, "show", out)
    assert code == 1 and "damaged: shard-00000.safetensors (prompts 0..0) was changed or cut short after it " \
                         "was written (its sha256 differs)" in text and "(incomplete: 0 of 1 prompts readable" in text


def test_param_types(tmp_path, tiny_dir, capsys):
    """An unknown param type is an error at its line; an int param takes a whole number."""
    bogus = experiment(tmp_path, tiny_dir, ' = "the tower"', "param k: bogus\n")
    code, out = ivx(capsys, "check", bogus)
    assert code == 1 and f"{bogus}:3:1: error: param k has the unknown type 'bogus'" in out
    layer = tmp_path / "layer.ivx"
    layer.write_text(f'model "{tiny_dir}"\nprompt p = "the tower"\nparam n: int\n'
                     "invoke p {\n    save h = model.model.layers[n].output[:, -1, :]\n}\n")
    code, out = ivx(capsys, "run", layer, "--param", "n=2", "--out", tmp_path / "out", "--quiet")
    assert code == 0, out
    saved = load_file(str(next((tmp_path / "out").glob("*.safetensors"))))
    from transformers import AutoModelForCausalLM, AutoTokenizer
    reference = AutoModelForCausalLM.from_pretrained(tiny_dir).eval()
    seen = []
    reference.model.layers[2].register_forward_hook(lambda m, a, o: seen.append(o[:, -1, :]))
    with torch.no_grad():
        reference(**AutoTokenizer.from_pretrained(tiny_dir)("the tower", return_tensors="pt"))
    torch.testing.assert_close(saved["h"].reshape(seen[0].shape), seen[0])
