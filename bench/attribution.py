"""Benchmark attribution patching on SmolLM2 against activation patching, in one run.

    python bench/attribution.py              # 64 clean/corrupt pairs x 30 layers, CPU, 2 threads
    python bench/attribution.py --pairs 256  # the issue's size (activation patching takes minutes)

Per pair, attribution patching runs one forward of both prompts and one backward and estimates,
for every layer, the change of the clean answer's logit on the corrupt prompt when the clean
last-position hidden state is patched in: (clean - corrupt) . d logit / d corrupt. Columns:
  interp_dsl attribution  a `model.sweep` with a vectorised layer axis and a backward
  hand-written autograd   forward hooks that keep the hidden states, `retain_grad`, `backward()`
  nnsight 0.8.1           the same in nnsight, one trace per batch (with the `bench` extra)
  activation patching     interp_dsl's batched sweep: the real patch at every layer
The attribution columns are checked against each other before their times count, and the estimate
is compared with the real effect (Pearson correlation over pairs x layers). One run; times are
wall seconds.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from interp_dsl import LanguageModel  # noqa: E402

SUBJECTS = ["The Eiffel Tower", "The Colosseum", "Big Ben", "The Brandenburg Gate", "The Sagrada Familia",
            "The Statue of Liberty", "The Golden Gate Bridge", "The Acropolis", "The Kremlin"]
TEMPLATES = ["{} is in the city of", "{} is located in the city of", "Tourists visiting {} travel to",
             "Everyone knows that {} can be found in"]


def pairs(n: int, seed: int = 0) -> dict[str, list[str]]:
    """Clean/corrupt prompts that differ in the landmark only."""
    rng = random.Random(seed)
    clean, corrupt = [], []
    for _ in range(n):
        template, (a, b) = rng.choice(TEMPLATES), rng.sample(SUBJECTS, 2)
        clean.append(template.format(a))
        corrupt.append(template.format(b))
    return {"clean": clean, "corrupt": corrupt}


def attribution(model: LanguageModel, data: dict[str, list[str]], batch: int, token: int) -> dict[str, torch.Tensor]:
    layers = model.model.layers
    with model.sweep(data, batch_size=batch, progress=False) as sweep:
        layer = sweep.param("layer", range(len(layers)))
        with sweep.invoke("clean"):
            h = layers[layer].output[:, -1, :]
        with sweep.invoke("corrupt"):
            logit = model.lm_head.output[:, -1, token]
            logit.save("base")
            with logit.sum().backward():
                delta = h - layers[layer].output[:, -1, :]
                (delta * layers[layer].output.grad[:, -1, :]).sum(dim=-1).save("attribution")
    return _by_pair(sweep, len(layers))


def patching(model: LanguageModel, data: dict[str, list[str]], batch: int, token: int) -> dict[str, torch.Tensor]:
    layers = model.model.layers
    with model.sweep(data, batch_size=batch, progress=False) as sweep:
        layer = sweep.param("layer", range(len(layers)))
        with sweep.invoke("clean"):
            h = layers[layer].output[:, -1, :]
        with sweep.invoke("corrupt"):
            layers[layer].output[:, -1, :] = h
            model.lm_head.output[:, -1, token].save("logit")
    return _by_pair(sweep, len(layers))


def _by_pair(sweep: Any, n_layers: int) -> dict[str, torch.Tensor]:
    rows = len(sweep.results.index["prompt"])
    return {k: v.reshape(rows // n_layers, n_layers) for k, v in sweep.results.saves.items()}


def hand_autograd(model: LanguageModel, data: dict[str, list[str]], batch: int, token: int) -> torch.Tensor:
    """What a researcher writes with hooks and autograd, one clean forward, one corrupt forward
    and one backward per batch."""
    module, layers = model.module, list(model.module.model.layers)
    out = []
    for start in range(0, len(data["clean"]), batch):
        clean_hidden: dict[int, torch.Tensor] = {}
        corrupt_hidden: dict[int, torch.Tensor] = {}

        def keep(store: dict[int, torch.Tensor], i: int, grad: bool) -> Any:
            def hook(m: Any, a: Any, o: torch.Tensor) -> None:
                if grad:
                    o.retain_grad()
                store[i] = o
            return hook
        for store, name, grad in ((clean_hidden, "clean", False), (corrupt_hidden, "corrupt", True)):
            handles = [layer.register_forward_hook(keep(store, i, grad)) for i, layer in enumerate(layers)]
            try:
                with torch.set_grad_enabled(grad):
                    logits = module(**encode(model, data[name][start: start + batch])).logits
            finally:
                for h in handles:
                    h.remove()
        logits[:, -1, token].sum().backward()
        module.zero_grad(set_to_none=True)
        out.append(torch.stack([((clean_hidden[i][:, -1] - corrupt_hidden[i][:, -1].detach())
                                 * corrupt_hidden[i].grad[:, -1]).sum(-1) for i in range(len(layers))], 1))
    return torch.cat(out)


def nnsight_attribution(model: LanguageModel, data: dict[str, list[str]], batch: int, token: int) -> torch.Tensor:
    """nnsight 0.8.1 (the `bench` extra): the same, one trace per batch, gradients read in the
    reverse order nnsight requires."""
    import warnings

    from nnsight import LanguageModel as NNsightModel
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # 0.8.1 prefers TransformersModel(repo_id); this wraps a loaded module
        nn_model = NNsightModel(model.module, tokenizer=model.tokenizer)
    layers, n = nn_model.model.layers, len(model.model.layers)
    out = []
    for start in range(0, len(data["clean"]), batch):
        with nn_model.trace() as tracer:
            with tracer.invoke(data["clean"][start: start + batch]):
                clean = [layers[i].output[:, -1, :] for i in range(n)]
            with tracer.invoke(data["corrupt"][start: start + batch]):
                corrupt = [layers[i].output for i in range(n)]
                logit = nn_model.lm_head.output[:, -1, token]
                with logit.sum().backward():
                    found = [((clean[i] - corrupt[i][:, -1, :]) * corrupt[i].grad[:, -1, :]).sum(dim=-1)
                             for i in reversed(range(n))]
                    result = torch.stack(found[::-1], dim=1).save()
        out.append(result)
    return torch.cat(out).detach()


def encode(model: LanguageModel, texts: list[str]) -> dict[str, torch.Tensor]:
    tokenizer = model.tokenizer
    tokenizer.padding_side = "left"
    enc = tokenizer(texts, return_tensors="pt", padding=True)
    mask = enc["attention_mask"]
    return {"input_ids": enc["input_ids"], "attention_mask": mask,
            "position_ids": (mask.cumsum(-1) - 1).clamp(min=0), "use_cache": False}


def timed(fn: Any) -> tuple[float, Any]:
    start = time.perf_counter()
    value = fn()
    return time.perf_counter() - start, value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = LanguageModel("smollm2-135m")
    token = model.tokenizer.encode(" Paris", add_special_tokens=False)[0]
    data = pairs(args.pairs)
    attribution(model, pairs(args.batch, seed=1), args.batch, token)  # warm up
    t_dsl, ours = timed(lambda: attribution(model, data, args.batch, token))
    t_hand, hand = timed(lambda: hand_autograd(model, data, args.batch, token))
    torch.testing.assert_close(ours["attribution"], hand, rtol=1e-3, atol=1e-3)
    columns = [("interp_dsl attribution", t_dsl), ("hand-written autograd", t_hand)]
    try:
        import nnsight  # noqa: F401
    except ImportError:
        print("nnsight is not installed (pip install -e '.[bench]'): its column is left out")
    else:
        t_nn, theirs = timed(lambda: nnsight_attribution(model, data, args.batch, token))
        torch.testing.assert_close(theirs, hand, rtol=1e-3, atol=1e-3)
        columns.append(("nnsight 0.8.1 attribution", t_nn))
    t_patch, patched = timed(lambda: patching(model, data, args.batch, token))
    columns.append(("activation patching (sweep)", t_patch))
    effect = patched["logit"] - ours["base"]
    pearson = float(torch.corrcoef(torch.stack([ours["attribution"].flatten(), effect.flatten()]))[0, 1])
    n = args.pairs * 30
    print(f"{args.pairs} pairs x 30 layers, batch {args.batch}, {args.threads} threads, torch {torch.__version__}")
    print(f"{'column':28} {'seconds':>8} {'layer-estimates/s':>18} {'ratio':>6}")
    for name, seconds in columns:
        print(f"{name:28} {seconds:8.1f} {n / seconds:18.0f} {seconds / t_hand:6.2f}")
    print(f"attribution vs activation patching: Pearson {pearson:.3f} over {n} (pair, layer) values; "
          f"attribution is {t_patch / t_dsl:.1f}x faster")


if __name__ == "__main__":
    main()
