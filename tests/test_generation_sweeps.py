"""Generation over datasets: `model.sweep(..., generate=...)` and `ivx run` of a `generate`
experiment stream prompts in batches into the same shards, manifest, identity and resume as a
forward sweep; each row equals its own `model.generate`."""

from __future__ import annotations

import signal
import subprocess
import sys

import pytest
import torch
from helpers import dataset, tiny_llama, wait_for_shards, word_tokenizer

from interp_dsl import LanguageModel, load_results
from interp_dsl.cli import main

PROMPTS = ["the eiffel tower is in", "rome", "new york is a city of", "paris", "the colosseum is in the city"]


@pytest.fixture(scope="module")
def model():
    return LanguageModel(tiny_llama(), tokenizer=word_tokenizer())


def generate_one(model, prompt, coef, vec, steps, **sampling):
    """The independent reference: one `model.generate` per prompt and coefficient."""
    with model.generate(prompt, max_new_tokens=steps, compile="off", **sampling) as tracer:
        with tracer.all():
            model.model.layers[1].output[:, -1, :] += coef * vec
            top = model.lm_head.output[:, -1, :].argmax(-1).save("top")
        ids = model.generator.output.save()
    return ids.value[0, -steps:], torch.stack(top.value, dim=1)[0]


@pytest.mark.parametrize("mode", ["off", "graph"])
def test_each_row_equals_its_own_generate(model, mode, tmp_path):
    vec = torch.randn(32, generator=torch.Generator().manual_seed(0))
    with model.sweep(PROMPTS, batch_size=2, shard_size=4, generate={"max_new_tokens": 4}, compile=mode,
                     out=tmp_path / "gen") as sweep:
        coef = sweep.param("coef", [0.0, 3.0])
        with sweep.all():
            model.model.layers[1].output[:, -1, :] += coef * vec
            model.lm_head.output[:, -1, :].argmax(-1).save("top")
    results = sweep.results
    assert results.grid("__ids__:prompts").shape == (5, 2, 4) and results.grid("top").shape == (5, 2, 4)
    assert [s["prompts"] for s in results.manifest["shards"]] == [[0, 4], [4, 5]]
    tokenizer = word_tokenizer()
    for i, prompt in enumerate(PROMPTS):
        for j, c in enumerate([0.0, 3.0]):
            ids, top = generate_one(model, prompt, c, vec, 4)
            assert results.grid("__ids__:prompts")[i, j].tolist() == ids.tolist(), (prompt, c)
            assert results.grid("top")[i, j].tolist() == top.tolist()
            assert results.texts["prompts"][2 * i + j] == tokenizer.decode(ids, skip_special_tokens=True)
            assert results.annotations["prompt:prompts"][2 * i + j] == prompt


def test_sampled_generation_sweep_is_reproducible(model):
    vec = torch.zeros(32)

    def run():
        with model.sweep(PROMPTS, batch_size=5, generate={"max_new_tokens": 6, "do_sample": True, "seed": 3},
                         compile="off") as sweep:
            model.model.layers[1].output[:, -1, :] += vec
        return sweep.results["__ids__:prompts"]
    first = run()
    assert torch.equal(first, run()) and first.shape == (5, 6)
    # the same seed and batch as one plain generate of all five prompts
    with model.generate(max_new_tokens=6, do_sample=True, seed=3, compile="off") as tracer:
        with tracer.invoke(sorted(PROMPTS, key=lambda p: len(p.split()))):
            ids = model.generator.output.save()
    order = sorted(range(5), key=lambda i: len(PROMPTS[i].split()))
    assert torch.equal(first[order], ids.value[:, -6:])


def test_generate_errors_point_at_the_user(model):
    with pytest.raises(Exception, match=r"(?s)generate= got unexpected argument\(s\) max_new_token.*did you mean "
                                        "'max_new_tokens'") as info:
        with model.sweep(PROMPTS, generate={"max_new_token": 3}):
            pass
    assert f"{__file__}:" in str(info.value)
    with pytest.raises(Exception, match="save ids has a value per token") as info:
        with model.sweep(PROMPTS, batch_size=2, generate={"max_new_tokens": 2}, compile="off"):
            model.generator.output.save("ids")  # the whole sequence: its length follows the prompt
    assert f"{__file__}:" in str(info.value)


STEERING = """model "{model}"
prompt text
tensor v = load("{vector}")
sweep coef in [0.0, 4.0]
generate max_new_tokens=8, do_sample=True, seed=1
invoke text {{
    steps all {{
        model.model.layers[1].output[:, -1, :] += coef * v
    }}
    steps [0] {{
        save first = argmax(model.lm_head.output[:, -1, :], dim=-1)
    }}
}}
"""


def test_a_thousand_prompt_generation_killed_and_resumed_equals_an_uninterrupted_run(tmp_path, tiny_dir, capsys):
    from safetensors.torch import save_file
    save_file({"v": torch.randn(32, generator=torch.Generator().manual_seed(2))}, str(tmp_path / "v.safetensors"))
    exp = tmp_path / "steer.ivx"
    exp.write_text(STEERING.format(model=tiny_dir, vector=tmp_path / "v.safetensors"))
    data = dataset(tmp_path / "p.jsonl", 1000, seed=5)
    args = ["run", str(exp), "--prompts", str(data), "--batch-size", "32", "--shard-size", "100", "--quiet"]
    out = tmp_path / "killed"
    process = subprocess.Popen([sys.executable, "-m", "interp_dsl.cli", *args, "--out", str(out)])
    wait_for_shards(out, 2, process, timeout=300)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL, "the run ended before it was killed"
    assert not load_results(out).complete
    assert main([*args, "--out", str(out)]) == 0
    assert main([*args, "--out", str(tmp_path / "whole")]) == 0
    resumed, whole = load_results(out), load_results(tmp_path / "whole")
    assert resumed.complete and resumed.n_prompts == 1000 and resumed.dims == [("coef", 2)]
    for name in ("__ids__:text", "first"):
        assert torch.equal(resumed[name], whole[name])
    assert resumed.texts == whole.texts and len(resumed.texts["text"]) == 2000
    assert resumed["first"].shape == (2000, 1)  # one steps block of one step: [rows, steps]
    # the manifest has a sweep's fields, and a changed value is refused as for any sweep
    assert {"ir_hash", "values", "weights", "versions", "prompts", "points", "generate"} <= set(resumed.manifest)
    exp.write_text(exp.read_text().replace("seed=1", "seed=2"))
    assert main([*args, "--out", str(out)]) == 1
    assert "holds results of a different experiment: the program differs" in capsys.readouterr().err
    assert main(["show", str(out)]) == 0
    shown = capsys.readouterr().out
    assert "generation: max_new_tokens=8, do_sample=True, seed=1" in shown
    first = resumed.annotations["prompt:text"][0]
    assert f"[coef=0.0] {first!r} -> {resumed.texts['text'][0]!r}" in shown and "... and 1980 more" in shown
