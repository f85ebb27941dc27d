"""Benchmark compiled execution on SmolLM2: one run, ratios between execution paths.

Workload: batch 8 x 32 tokens, fp32, 2 threads; the experiment adds a steering vector times a
coefficient at layer 15's last position and saves the last position's logits (the coefficient
and vector change every call: they are graph inputs). Per-forward times are medians.

    python bench/compile.py                  # CPU; the first-call columns start fresh processes
    python bench/compile.py --first-calls-only   # only those: cold and warm starts, graph and inductor
    python bench/compile.py --device cuda    # bf16 at batch 1, 8 and 64, with and without CUDA graphs

Targets: compiled-intervened / compiled-plain <= 1.05; on a GPU, compiled + CUDA graphs >= 3x
the reference interpreter at batch 1.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from interp_dsl import LanguageModel  # noqa: E402

LAYER, REPEATS = 15, 9


def batch(model: LanguageModel, size: int, length: int) -> torch.Tensor:
    return torch.randint(100, model.config.vocab_size, (size, length), generator=torch.Generator().manual_seed(0))


def steer(model: LanguageModel, ids: torch.Tensor, alpha: float, vector: torch.Tensor, compile: str) -> torch.Tensor:
    with model.trace(ids, compile=compile):
        model.model.layers[LAYER].output[:, -1] += alpha * vector
        logits = model.lm_head.output[:, -1].save()
    return logits.value


def timed(fns: dict[str, Any], sync: Any) -> dict[str, float]:
    """Best seconds per call (the least disturbed run on a shared machine); the variants take
    turns, so drift hits all alike."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(REPEATS):
        for name, fn in fns.items():
            sync()
            start = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - start)
    return {name: min(t) for name, t in times.items()}


def per_forward(model: LanguageModel, size: int, length: int, device: str, cudagraphs: bool) -> dict[str, float]:
    ids = batch(model, size, length).to(device)
    kwargs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "use_cache": False}
    vector = torch.randn(model.config.hidden_size, dtype=model.module.dtype, device=device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    plain_compiled = torch.compile(model.module, fullgraph=True,
                                   mode="reduce-overhead" if cudagraphs else None)
    plain_dynamic = torch.compile(lambda **kw: model.module(**kw), fullgraph=True, dynamic=True)
    alphas = itertools.count(0.0, 0.25)  # a new coefficient every call: no recompilation
    fns: dict[str, Any] = {
        "eager": torch.no_grad()(lambda: model.module(**kwargs)),
        "compiled plain": torch.no_grad()(lambda: plain_compiled(**kwargs)),
        "compiled plain, dynamic": torch.no_grad()(lambda: plain_dynamic(**kwargs)),
        "reference": lambda: steer(model, ids, next(alphas), vector, "off"),
        "compiled graph": lambda: steer(model, ids, next(alphas), vector, "graph"),
        "compiled inductor": lambda: steer(model, ids, next(alphas), vector, "inductor"),
    }
    if cudagraphs:
        fns["compiled cudagraphs"] = lambda: steer(model, ids, next(alphas), vector, "cudagraphs")
    out = timed(fns, sync)
    a = steer(model, ids, 1.0, vector, "off")
    b = steer(model, ids, 1.0, vector, "inductor")
    out["max |inductor - reference|"] = float((a.float() - b.float()).abs().max())
    return out


def first_call(mode: str) -> None:
    """In a fresh process: time to load the model and to the first compiled result."""
    start = time.perf_counter()
    model = LanguageModel("smollm2-135m")
    loaded = time.perf_counter() - start
    ids = batch(model, 8, 32)
    vector = torch.randn(model.config.hidden_size)
    start = time.perf_counter()
    first_logits = steer(model, ids, 1.0, vector, mode)
    first = time.perf_counter() - start
    start = time.perf_counter()
    steer(model, ids, 2.0, vector, mode)
    second = time.perf_counter() - start
    same = torch.equal(first_logits, steer(model, ids, 1.0, vector, "off")) if mode == "graph" else None
    stats = model.compile_stats()
    print(json.dumps({"load": loaded, "first": first, "second": second, "equal to off": same,
                      "compilations": stats.compilations, "loaded graphs": stats.loaded}))


def first_calls(mode: str) -> tuple[dict, dict]:
    """A cold and a warm fresh process (the second finds the first's inductor and graph caches)."""
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache, "IVX_GRAPH_CACHE": f"{cache}/graphs",
               "OMP_NUM_THREADS": "2"}
        runs = []
        for _ in range(2):
            start = time.perf_counter()
            done = subprocess.run([sys.executable, __file__, "--first-call", mode], env=env,
                                  capture_output=True, text=True, check=True)
            runs.append({**json.loads(done.stdout.strip().splitlines()[-1]), "wall": time.perf_counter() - start})
    return runs[0], runs[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--first-call", metavar="MODE", help=argparse.SUPPRESS)
    parser.add_argument("--first-calls-only", action="store_true",
                        help="only the fresh-process columns (cold and warm starts)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    if args.first_call:
        first_call(args.first_call)
        return
    if args.first_calls_only:
        report_first_calls()
        return
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    model = LanguageModel("smollm2-135m", dtype=dtype)
    model.module.to(args.device)
    sizes = (1, 8, 64) if args.device == "cuda" else (8,)
    print(f"# SmolLM2-135M, {args.device}, {str(dtype).removeprefix('torch.')}, {torch.get_num_threads()} "
          f"threads, torch {torch.__version__}; steering at layer {LAYER} + last logits; best of {REPEATS}")
    for size in sizes:
        for cudagraphs in ((False, True) if args.device == "cuda" else (False,)):
            t = per_forward(model, size, 32, args.device, cudagraphs)
            print(f"\n## batch {size} x 32{' (CUDA graphs)' if cudagraphs else ''}")
            for name, value in t.items():
                if name.startswith("max"):
                    print(f"{name:28s} {value:.1e}")
                else:
                    print(f"{name:28s} {value * 1000:8.1f} ms")
            best = min(v for k, v in t.items() if k.startswith("compiled ") and "plain" not in k)
            print(f"{'compiled-intervened / compiled-plain':40s} {t['compiled inductor'] / t['compiled plain']:.3f}")
            print(f"{'compiled-intervened / compiled-plain, dynamic':40s} "
                  f"{t['compiled inductor'] / t['compiled plain, dynamic']:.3f}")
            print(f"{'reference / compiled-intervened (best)':40s} {t['reference'] / best:.2f}x")
            print(f"{'compiled-intervened / eager plain':40s} {t['compiled inductor'] / t['eager']:.3f}")
    if args.device == "cpu":
        report_first_calls()


def report_first_calls() -> None:
    print("\n## first compiled call, fresh process (batch 8 x 32; wall = the whole process)")
    for mode in ("graph", "inductor"):
        cold, warm = first_calls(mode)
        for name, run in (("cold", cold), ("warm", warm)):
            print(f"{mode:8s} {name}: first call {run['first']:5.1f} s, next {run['second'] * 1000:4.0f} ms, "
                  f"model load {run['load']:4.1f} s, process {run['wall']:5.1f} s; "
                  f"{run['compilations']} capture(s), {run['loaded graphs']} graph(s) loaded"
                  + ("" if run["equal to off"] is None else f", equal to off: {run['equal to off']}"))


if __name__ == "__main__":
    main()
