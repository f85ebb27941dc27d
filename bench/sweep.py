"""Benchmark sweeps on SmolLM2: prompts/s and ratios to the plain HF forward of the same batches.

    python bench/sweep.py                 # CPU, fp32, 2 threads, batch 32
    python bench/sweep.py --prompts 512   # more prompts; --device cuda --dtype bfloat16 on a GPU

Workloads (all save per prompt, at the last position):
  read   residual at layers 7, 15, 22 + argmax of the last logits
  probe  the same three residuals, no logits
  steer  add a vector at layer 15, save the last logits
  patch  clean -> corrupt at the last position, for every layer (30), the clean answer's logit
Columns: interp_dsl compiled (`graph` on a CPU, `inductor` on a GPU), interp_dsl reference
interpreter, hand-written hooks, nnsight when installed. The floor is the plain forward of the same
batches: one forward per prompt; for patch, the batched schedule every library can reach: one
plain forward of the rows [clean, corrupt x 30] of each pair, in batches of the same size (the
per-layer floor, a clean and a corrupt forward per layer, is printed beside it). interp_dsl's
patch sweep takes `--patch-batch` pairs per batch (default 8): each batch grows to pairs x 32 rows
by its last layer, and on a CPU a few hundred rows per forward run fastest. Every column is
checked against the hand-written hooks in every round. One run, in which the columns take turns
`--rounds` times (default 5), starting one later each round; a column's ratio is the median over
the rounds of its time over the same round's floor (paired, so that the machine's drift cancels;
the spread is printed too). Lower ratios are better.
Compiled graphs are kept in a fresh temporary directory: "first 2 batches" is a cold capture,
and "from kept graphs" the same batches on a second model object that reads what the first kept
(what a second process pays, less imports and the model load).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from interp_dsl import LanguageModel  # noqa: E402

PROBE_LAYERS = (7, 15, 22)
STEER_LAYER = 15
SUBJECTS = ["The Eiffel Tower", "The Colosseum", "Big Ben", "The Brandenburg Gate", "The Sagrada Familia",
            "The Statue of Liberty", "The Golden Gate Bridge", "The Acropolis", "The Kremlin",
            "The Louvre", "The Little Mermaid statue", "The Atomium"]
TEMPLATES = ["{} is in the city of", "{} is located in the city of", "Tourists visiting {} travel to",
             "Everyone knows that {} can be found in", "{}, a famous landmark, stands in the city of",
             "If you want to see {} you have to go to"]


def prompts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [rng.choice(TEMPLATES).format(rng.choice(SUBJECTS)) for _ in range(n)]


def batches(items: list[Any], size: int) -> list[list[Any]]:
    return [items[i: i + size] for i in range(0, len(items), size)]


# ------------------------------------------------------------------------------------ interp_dsl
def dsl(model: LanguageModel, work: str, data: Any, batch: int, compile: str, vector: torch.Tensor,
        token: int) -> dict[str, torch.Tensor]:
    layers = model.model.layers
    with model.sweep(data, batch_size=batch, compile=compile, progress=False) as sweep:
        if work == "patch":
            layer = sweep.param("layer", range(len(layers)))
            with sweep.invoke("clean"):
                h = layers[layer].output[:, -1, :]
            with sweep.invoke("corrupt"):
                layers[layer].output[:, -1, :] = h
                model.lm_head.output[:, -1, token].save("logit")
        else:
            if work == "steer":
                layers[STEER_LAYER].output[:, -1, :] += vector
                model.lm_head.output[:, -1, :].save("logits")
            else:
                for i in PROBE_LAYERS:
                    layers[i].output[:, -1, :].save(f"h{i}")
                if work == "read":
                    model.lm_head.output[:, -1, :].argmax(-1).save("top")
    out = sweep.results.saves
    return {k: v.reshape(len(sweep.results.index["prompt"]) // len(layers), len(layers))
            if work == "patch" else v for k, v in out.items()}


# ---------------------------------------------------------------------------------- plain torch
def encode(model: LanguageModel, texts: list[str], device: str) -> dict[str, torch.Tensor]:
    enc = model.tokenizer(texts, return_tensors="pt", padding=True)
    mask = enc["attention_mask"]
    return {"input_ids": enc["input_ids"].to(device), "attention_mask": mask.to(device),
            "position_ids": (mask.cumsum(-1) - 1).clamp(min=0).to(device), "use_cache": False}


@contextlib.contextmanager
def hooks(module_hooks: list[tuple[torch.nn.Module, Any]]):
    handles = [m.register_forward_hook(h) for m, h in module_hooks]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def by_length(model: LanguageModel, texts: list[str]) -> list[int]:
    return sorted(range(len(texts)), key=lambda i: len(model.tokenizer(texts[i])["input_ids"]))


def floor(model: LanguageModel, work: str, data: Any, batch: int, device: str, per_layer: bool = False) -> None:
    """Plain forwards of the work's rows: for patch, [clean, corrupt x layers] per pair (the batched
    schedule), or with `per_layer` the clean and the corrupt prompts once per layer."""
    module, layers = model.module, len(model.model.layers)
    if work != "patch":
        texts = data
    elif per_layer:
        texts = (data["clean"] + data["corrupt"]) * layers
    else:
        texts = [t for clean, corrupt in zip(data["clean"], data["corrupt"], strict=True)
                 for t in [clean] + [corrupt] * layers]
    order = by_length(model, texts) if work != "patch" or per_layer else list(range(len(texts)))
    with torch.no_grad():
        for chunk in batches(order, batch):
            module(**encode(model, [texts[i] for i in chunk], device))


def hand_hooks(model: LanguageModel, work: str, data: Any, batch: int, device: str, vector: torch.Tensor,
               token: int) -> dict[str, torch.Tensor]:
    """What a researcher writes with forward hooks: a full forward per batch (per layer for patch)."""
    module, layers = model.module, list(model.model.layers)
    texts = data if work != "patch" else data["clean"]
    order = by_length(model, texts)
    out: dict[str, list[torch.Tensor]] = {}
    with torch.no_grad():
        for chunk in batches(order, batch):
            enc = encode(model, [texts[i] for i in chunk], device)
            if work == "patch":
                cache: dict[int, torch.Tensor] = {}
                grab = [(layers[i], lambda m, a, o, i=i: cache.__setitem__(i, o[:, -1].clone())) for i in range(len(layers))]
                with hooks(grab):
                    module(**enc)
                corrupt = encode(model, [data["corrupt"][i] for i in chunk], device)
                row = []
                for i in range(len(layers)):
                    def patch(m: Any, a: Any, o: torch.Tensor, i: int = i) -> torch.Tensor:
                        o = o.clone()
                        o[:, -1] = cache[i]
                        return o
                    with hooks([(layers[i], patch)]):
                        row.append(module(**corrupt).logits[:, -1, token])
                out.setdefault("logit", []).append(torch.stack(row, 1))
                continue
            got: dict[str, torch.Tensor] = {}
            edits = [(layers[i], lambda m, a, o, i=i: got.__setitem__(f"h{i}", o[:, -1].clone())) for i in PROBE_LAYERS]
            if work == "steer":
                def add(m: Any, a: Any, o: torch.Tensor) -> torch.Tensor:
                    o = o.clone()
                    o[:, -1] += vector
                    return o
                edits = [(layers[STEER_LAYER], add)]
            with hooks(edits):
                logits = module(**enc).logits[:, -1]
            if work == "steer":
                got = {"logits": logits}
            elif work == "read":
                got["top"] = logits.argmax(-1)
            for k, v in got.items():
                out.setdefault(k, []).append(v)
    back = torch.tensor(order).argsort()
    return {k: torch.cat(v)[back].cpu() for k, v in out.items()}


def nnsight_column(model: LanguageModel, work: str, data: Any, batch: int, vector: torch.Tensor) -> None:
    """nnsight 0.8.1, when installed: the same work, one trace per batch (per layer for patch)."""
    from nnsight import LanguageModel as NNLanguageModel
    nn_model = NNLanguageModel(model.module, tokenizer=model.tokenizer)
    layers = nn_model.model.layers
    texts = data if work != "patch" else data["clean"]
    for chunk in batches(list(range(len(texts))), batch):
        if work == "patch":
            for i in range(len(layers)):
                with nn_model.trace() as tracer:
                    barrier = tracer.barrier(2)  # 0.8.1 needs it to pass a value between invokes at one module
                    with tracer.invoke([data["clean"][j] for j in chunk]):
                        h = layers[i].output[:, -1, :]
                        barrier()
                    with tracer.invoke([data["corrupt"][j] for j in chunk]):
                        barrier()
                        layers[i].output[:, -1, :] = h
                        nn_model.lm_head.output[:, -1].save()
            continue
        with nn_model.trace([texts[j] for j in chunk]):
            if work == "steer":  # what the hooks do: add the vector, save the last logits
                layers[STEER_LAYER].output[:, -1, :] += vector
            else:
                for i in PROBE_LAYERS:
                    layers[i].output[:, -1, :].save()
            if work != "probe":
                nn_model.lm_head.output[:, -1].save()


def timed(fn: Any, sync: Any) -> tuple[float, Any]:
    sync()
    start = time.perf_counter()
    value = fn()
    sync()
    return time.perf_counter() - start, value


def first_batches(load: Any, work: str, data: Any, batch: int, compiled: str, vector: torch.Tensor,
                  token: int, sync: Any) -> tuple[float, float]:
    """Seconds for `data` on a fresh model object (a cold capture, kept on disk), then on a second
    one, which runs the graphs the first kept. Fresh objects, since nnsight patches the forward of
    a model it wraps, and a model with a patched forward keeps no graph."""
    first = load()
    cold, _ = timed(lambda: dsl(first, work, data, batch, compiled, vector, token), sync)
    second = load()
    warm, _ = timed(lambda: dsl(second, work, data, batch, compiled, vector, token), sync)
    stats = second.compile_stats()
    assert stats.compilations == 0 and stats.loaded > 0, stats
    return cold, warm


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=256, help="prompts for read/probe/steer")
    parser.add_argument("--pairs", type=int, default=64, help="clean/corrupt pairs for patch (x30 layers)")
    parser.add_argument("--batch", type=int, default=32, help="rows per forward (prompts; for patch, the floor's and hooks' rows)")
    parser.add_argument("--patch-batch", type=int, default=8,
                        help="pairs per interp_dsl patch batch: each grows to pairs x (2 + 30 layers) rows")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--work", default="read,probe,steer,patch")
    parser.add_argument("--rounds", type=int, default=5,
                        help="the columns take turns this many times; ratios are medians over the rounds")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.environ["IVX_GRAPH_CACHE"] = tempfile.mkdtemp(prefix="ivx-bench-graphs-")

    def load() -> LanguageModel:
        loaded = LanguageModel("smollm2-135m")
        loaded.module.to(args.device, getattr(torch, args.dtype))
        return loaded

    model = load()
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    compiled = "inductor" if args.device.startswith("cuda") else "graph"
    vector = torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(0)).to(
        args.device, getattr(torch, args.dtype))
    token = model.tokenizer.encode(" Paris", add_special_tokens=False)[0]
    try:
        import nnsight  # noqa: F401
        have_nnsight = True
        nn_base = load()  # nnsight patches the forward of the model it wraps: a model of its own
    except ImportError:
        have_nnsight = False
    rows, spreads = [], []
    for work in args.work.split(","):
        if work == "patch":
            clean = prompts(args.pairs, seed=1)
            data: Any = {"clean": clean, "corrupt": prompts(args.pairs, seed=2)}
            n = args.pairs
        else:
            data, n = prompts(args.prompts), args.prompts
        # Warm-up: a full untimed pass fills the per-length site tables both interp_dsl columns
        # share; two compiled batches capture the graph (on fresh models, reported apart; then
        # untimed on the model of the other columns).
        size = args.patch_batch if work == "patch" else args.batch  # interp_dsl's prompts (pairs) per batch
        warm = {k: v[: 2 * size] for k, v in data.items()} if isinstance(data, dict) else data[: 2 * size]
        t_compile, t_kept = first_batches(load, work, warm, size, compiled, vector, token, sync)
        dsl(model, work, warm, size, compiled, vector, token)
        t_tables, _ = timed(lambda: dsl(model, work, data, size, "off", vector, token), sync)
        if work == "patch":
            t_layer_floor, _ = timed(lambda: floor(model, work, data, args.batch, args.device, per_layer=True), sync)
        times: dict[str, list[float]] = {}

        def measure(column: str, fn: Any) -> Any:
            seconds, value = timed(fn, sync)
            times.setdefault(column, []).append(seconds)
            return value

        def check(name: str, got: dict[str, torch.Tensor]) -> None:
            tol = 1e-3 if args.dtype == "float32" else 5e-2
            for key, value in expected.items():
                if value.is_floating_point():
                    torch.testing.assert_close(got[key].float(), value.float(), atol=tol, rtol=tol,
                                               msg=f"{work} {name} {key}")
                else:
                    assert (got[key] == value).float().mean() > 0.99, f"{work} {name} {key}"

        expected = hand_hooks(model, work, data, args.batch, args.device, vector, token)
        columns = {"floor": lambda: floor(model, work, data, args.batch, args.device),
                   "hooks": lambda: hand_hooks(model, work, data, args.batch, args.device, vector, token),
                   "reference": lambda: check("reference", dsl(model, work, data, size, "off", vector, token)),
                   "compiled": lambda: check("compiled", dsl(model, work, data, size, compiled, vector, token))}
        if have_nnsight:
            columns["nnsight"] = lambda: nnsight_column(nn_base, work, data, args.batch, vector)
        order = list(columns)
        for turn in range(args.rounds):  # the columns take turns, starting one later each round
            for column in order[turn % len(order):] + order[: turn % len(order)]:
                measure(column, columns[column])
        per_round = {column: [t / f for t, f in zip(seconds, times["floor"], strict=True)]
                     for column, seconds in times.items()}
        ratio = {column: statistics.median(r) for column, r in per_round.items()}
        spread = {column: (min(r), max(r)) for column, r in per_round.items()}
        t_floor = statistics.median(times["floor"])
        t_comp, t_ref, t_hooks = (ratio[c] * t_floor for c in ("compiled", "reference", "hooks"))
        t_nn = ratio["nnsight"] * t_floor if "nnsight" in ratio else None
        t_tables -= times["reference"][0]  # the first pass's extra time: a single run against a single run
        spreads.append(spread)
        rows.append((work, n, t_floor, t_comp, t_ref, t_hooks, t_nn, t_compile, t_kept, t_tables))
        print(f"{work}: done", rows[-1], file=sys.stderr)  # kept if a later workload fails
    print(f"SmolLM2-135M, {args.device} {args.dtype}, {args.threads} threads, batch {args.batch} "
          f"(interp_dsl patch: {args.patch_batch} pairs per batch); "
          f"compiled = {compiled!r}; ratio = time / floor (lower is better)\n")
    print("| workload | prompts | floor prompts/s | compiled | reference | hooks | nnsight | "
          "compiled: first 2 batches (from kept graphs) | site tables, first pass |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for work, n, t_floor, t_comp, t_ref, t_hooks, t_nn, t_compile, t_kept, t_setup in rows:
        nn = f"{t_nn / t_floor:.2f}" if t_nn is not None else "not installed"
        print(f"| {work} | {n}{' pairs x 30 layers' if work == 'patch' else ''} | {n / t_floor:.1f} | "
              f"**{t_comp / t_floor:.2f}** ({n / t_comp:.1f}/s) | {t_ref / t_floor:.2f} | {t_hooks / t_floor:.2f} | "
              f"{nn} | {t_compile:.1f} s ({t_kept:.1f} s) | +{t_setup:.1f} s |")
    if "patch" in args.work.split(","):
        print(f"\npatch: the per-layer floor (a clean and a corrupt forward per layer) took {t_layer_floor:.1f} s, "
              f"{t_layer_floor / next(r[2] for r in rows if r[0] == 'patch'):.2f}x the batched floor")

    print("\nper-round ratios, min-max (each round's time over the same round's floor):")
    for row, spread in zip(rows, spreads, strict=True):
        print(f"  {row[0]}: " + ", ".join(f"{c} {lo:.2f}-{hi:.2f}" for c, (lo, hi) in spread.items() if c != "floor"))

if __name__ == "__main__":
    main()
