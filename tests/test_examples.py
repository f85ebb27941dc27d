"""Every example experiment runs on SmolLM2 and equals its proxy-API twin: same IR, same values."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch.testing import assert_close

from interp_dsl import load_results
from interp_dsl.ivx import load_experiment, lower, lower_traces

pytestmark = pytest.mark.e2e
EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
EIFFEL = "The Eiffel Tower is in the city of"


def paris(m):
    return m.tokenizer.encode(" Paris", add_special_tokens=False)[0]


def twin_hidden_states(m, point):
    with m.trace() as tracer:
        with tracer.invoke([EIFFEL]):
            m.model.layers[-1].output.save("hidden")
            m.lm_head.output[:, -1, :].save("logits")
    return tracer


def twin_logit_lens(m, point):
    with m.trace() as tracer:
        with tracer.invoke([EIFFEL]):
            h = m.model.layers[point["layer"]].output[:, -1, :]
            m.lm_head(m.model.norm(h)).save("lens")
    return tracer


def twin_ablate_mlp(m, point):
    with m.trace() as tracer:
        with tracer.invoke([EIFFEL]):
            m.model.layers[-1].mlp.output[:] = 0
            m.lm_head.output[:, -1, :].save("ablated")
        with tracer.invoke([EIFFEL]):
            m.lm_head.output[:, -1, :].save("original")
    return tracer


def twin_noise(m, point):
    with m.trace() as tracer:
        with tracer.invoke([EIFFEL]):
            h = m.model.layers[5].output
            m.model.layers[5].output = h + 0.5 * torch.randn_like(h)
            m.lm_head.output[:, -1, :].save("noised")
        with tracer.invoke([EIFFEL]):
            m.lm_head.output[:, -1, :].save("clean")
    return tracer


def twin_transplant(m, point):
    with m.trace() as tracer:
        with tracer.invoke([EIFFEL]):
            embeddings = m.model.embed_tokens.output
        with tracer.invoke(["_ _ _ _ _ _ _ _ _"]):
            m.model.embed_tokens.output = embeddings
            m.lm_head.output[:, -1, :].save("transplanted")
    return tracer


def twin_patching(m, point):
    layer = point["layer"]
    with m.trace() as tracer:
        with tracer.invoke([EIFFEL]):
            h = m.model.layers[layer].output[:, -1, :]
        with tracer.invoke(["The Colosseum is in the city of"]):
            m.model.layers[layer].output[:, -1, :] = h
            torch.softmax(m.lm_head.output[:, -1, :], dim=-1)[:, paris(m)].save("p_paris")
    return tracer


def twin_attribution_patching(m, point):
    layer = point["layer"]
    with m.trace() as tracer:
        with tracer.invoke([EIFFEL]):
            h = m.model.layers[layer].output[:, -1, :]
        with tracer.invoke(["The Colosseum is in the city of"]):
            p_paris = torch.softmax(m.lm_head.output[:, -1, :], dim=-1)[:, paris(m)]
            p_paris.save("p_corrupt")
            with p_paris.sum().backward():
                delta = h - m.model.layers[layer].output[:, -1, :]
                (delta * m.model.layers[layer].output.grad[:, -1, :]).sum(dim=-1).save("attribution")
    return tracer


STEER = load_file(str(EXAMPLES / "data" / "steer.safetensors"))["paris_minus_rome"]


def twin_steering(m, point):
    with m.trace() as tracer:
        with tracer.invoke(["The Colosseum is a stadium in the city of"]):
            m.model.layers[24].output[:, -1, :] += point["coef"] * STEER
            m.lm_head.output[:, -1, :].save("logits")
            torch.softmax(m.lm_head.output[:, -1, :], dim=-1)[:, paris(m)].save("p_paris")
    return tracer


def twin_probe_dataset(m, point):
    first = json.loads((EXAMPLES / "data" / "landmarks.jsonl").read_text().splitlines()[0])["text"]
    with m.trace() as tracer:
        with tracer.invoke([first]):  # lowered on its own, a prompt file is its first row
            for i in (7, 15, 22):
                m.model.layers[i].output[:, -1, :].save(f"h{i}")
            m.lm_head.output[:, -1, :].argmax(dim=-1).save("answer")
    return tracer


def twin_generate_steering(m, point):
    with m.generate(max_new_tokens=8) as tracer:
        with tracer.invoke(["The Colosseum is a stadium in the city of"]):
            with tracer.all():
                m.model.layers[24].output[:, -1, :] += point["coef"] * STEER
                torch.argmax(m.lm_head.output[:, -1, :], dim=-1).save("top")
            with tracer.iter[0]:
                torch.softmax(m.lm_head.output[:, -1, :], dim=-1)[:, paris(m)].save("p_paris")
    return tracer


def twin_steering_session(m, point):
    with m.session():
        with m.trace() as first:
            with first.invoke([EIFFEL]):
                h_paris = m.model.layers[24].output[:, -1, :]
            with first.invoke(["The Colosseum is in the city of"]):
                direction = h_paris - m.model.layers[24].output[:, -1, :]
        with m.trace() as second:
            with second.invoke(["The Colosseum is a stadium in the city of"]):
                m.model.layers[24].output[:, -1, :] += point["coef"] * direction
                torch.softmax(m.lm_head.output[:, -1, :], dim=-1)[:, paris(m)].save("p_paris")
    return [first, second]


TWINS = {
    "steering_session": (twin_steering_session, None),
    "generate_steering": (twin_generate_steering, [0, 2]),
    "probe_dataset": (twin_probe_dataset, None),
    "hidden_states": (twin_hidden_states, None),
    "logit_lens": (twin_logit_lens, [0, 29]),
    "ablate_mlp": (twin_ablate_mlp, None),
    "noise": (twin_noise, None),
    "transplant": (twin_transplant, None),
    "patching": (twin_patching, [0, 25]),
    "attribution_patching": (twin_attribution_patching, [0, 29]),
    "steering": (twin_steering, [0, 3]),
}


def test_every_example_has_a_twin():
    assert {p.stem for p in EXAMPLES.glob("*.ivx")} == set(TWINS)


@pytest.mark.parametrize("name", sorted(TWINS))
def test_example_equals_its_twin(smollm, name):
    twin, indices = TWINS[name]
    exp = load_experiment(EXAMPLES / f"{name}.ivx")
    points = exp.points()
    for point in [points[i] for i in indices] if indices else points:
        torch.manual_seed(0)
        traces = lower_traces(exp, smollm, point)
        torch.manual_seed(0)
        twins = twin(smollm, point)
        twins = twins if isinstance(twins, list) else [twins]  # a session: a tracer per trace
        assert len(traces) == len(twins)
        for dsl, python in zip(traces, twins, strict=True):
            assert dsl.program() == python.program()
            assert dsl.program().structural_hash() == python.program().structural_hash()
            assert dsl.result.saves.keys() == python.result.saves.keys()
            for key in dsl.result.saves:
                assert_close(dsl.result.saves[key], python.result.saves[key])


def test_examples_show_what_they_claim(smollm):
    decode = smollm.tokenizer.decode
    transplant = lower(load_experiment(EXAMPLES / "transplant.ivx"), smollm, {}).result.saves
    assert decode(transplant["transplanted"][0].argmax()) == " Paris"
    patch = load_experiment(EXAMPLES / "patching.ivx")
    early = lower(patch, smollm, {"layer": 0}).result.saves["p_paris"]
    late = lower(patch, smollm, {"layer": 25}).result.saves["p_paris"]
    assert late.item() > 100 * early.item()
    steer = load_experiment(EXAMPLES / "steering.ivx")
    ps = [lower(steer, smollm, p).result.saves["p_paris"].item() for p in steer.points()]
    assert ps == sorted(ps) and ps[-1] > 0.3
    session = load_experiment(EXAMPLES / "steering_session.ivx")
    ps = [lower(session, smollm, p).result.saves["p_paris"].item() for p in session.points()]
    assert ps == sorted(ps) and ps[0] < 0.001 and ps[-1] > 0.3
    generate = load_experiment(EXAMPLES / "generate_steering.ivx")
    texts = [decode(lower(generate, smollm, p).result.output[0, -8:]) for p in generate.points()]
    assert texts[0].startswith(" Rome") and texts[-1].startswith(" Paris")


def test_attribution_patching_estimates_activation_patching(smollm, monkeypatch, tmp_path):
    """The claim in examples/attribution_patching.ivx's header: over the 30 layers, its estimate
    follows the real patching effect (Pearson and rank correlation)."""
    import interp_dsl.ivx as experiment
    from interp_dsl.cli import main
    monkeypatch.setattr(experiment, "resolve_model", lambda exp, override=None: smollm)
    for name in ("attribution_patching", "patching"):
        assert main(["run", str(EXAMPLES / f"{name}.ivx"), "--out", str(tmp_path / name)]) == 0
    attribution = load_results(tmp_path / "attribution_patching")
    estimate = attribution.saves["attribution"].flatten()
    effect = load_results(tmp_path / "patching").saves["p_paris"].flatten() - attribution.saves["p_corrupt"][0]
    assert estimate.shape == effect.shape == (30,)

    def correlation(a, b):
        return float(torch.corrcoef(torch.stack([a, b]))[0, 1])
    ranks = lambda x: x.argsort().argsort().float()  # noqa: E731
    assert correlation(estimate, effect) > 0.95
    assert correlation(ranks(estimate), ranks(effect)) > 0.95


@pytest.mark.parametrize("name", sorted(TWINS))
def test_ivx_run_on_every_example(smollm, name, monkeypatch, tmp_path, capsys):
    import json

    import interp_dsl.ivx as experiment
    from interp_dsl.cli import main
    monkeypatch.setattr(experiment, "resolve_model", lambda exp, override=None: smollm)
    assert main(["run", str(EXAMPLES / f"{name}.ivx"), "--out", str(tmp_path)]) == 0
    exp = load_experiment(EXAMPLES / f"{name}.ivx")
    if exp.generate is not None:  # one row per point; the texts are those of the single runs
        results = load_results(tmp_path)
        new = results.grid("__ids__:stadium")[0]  # [points, max_new_tokens]
        assert new.shape == (len(exp.points()), exp.generate["max_new_tokens"])
        for point, ids, text in zip(exp.points(), new, results.texts["stadium"], strict=True):
            alone = lower(exp, smollm, point).result.output[0, -len(ids):]
            assert torch.equal(ids, alone) and text == smollm.tokenizer.decode(ids, skip_special_tokens=True)
        return
    results = load_results(tmp_path)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert set(results.saves) == set(manifest["saves"]) and manifest["model"] == "smollm2-135m"
    sweeps = load_experiment(EXAMPLES / f"{name}.ivx").sweeps
    assert sorted(results.dims) == sorted((k, len(v)) for k, v in sweeps.items())
    for key, value in results.saves.items():
        assert list(value.shape[1:]) == manifest["saves"][key]["shape"]
        assert results.grid(key).shape[1: 1 + len(sweeps)] == tuple(size for _, size in results.dims)
    assert "results in" in capsys.readouterr().out
