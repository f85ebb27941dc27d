"""Benchmark generation on SmolLM2 with a steering vector added at every step: tokens/s, and the
ratio of each path's time to plain HF `generate` (no intervention) on the same prompts.

    python bench/generate.py                       # CPU, fp32, 32 prompts x 32 new tokens
    python bench/generate.py --device cuda --dtype bfloat16 --compile inductor cudagraphs

Columns: interp_dsl compiled (each --compile mode: the prompt pass eager, every decode step one
graph on a static KV cache), the reference interpreter (hooks, dynamic cache), HF `generate` with a
hand-written steering hook, plain HF `generate`, and nnsight when installed. Each column generates
greedily from one batch; its ids are checked against the reference's before its time counts.
Every path runs once untimed (capture, caches), then `--repeats` times interleaved; the best
time counts. Lower ratios are better.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.sweep import prompts  # noqa: E402
from interp_dsl import LanguageModel  # noqa: E402

STEER_LAYER = 15


def dsl(model: LanguageModel, texts: list[str], steps: int, vector: torch.Tensor, compile: str) -> torch.Tensor:
    with model.generate(texts, max_new_tokens=steps, compile=compile) as tracer:
        with tracer.all():
            model.model.layers[STEER_LAYER].output[:, -1, :] += vector
        out = model.generator.output.save()
    return out.value


def hf(model: LanguageModel, texts: list[str], steps: int, vector: torch.Tensor | None) -> torch.Tensor:
    enc = model.tokenizer(texts, return_tensors="pt", padding=True).to(model.module.device)
    handle = None
    if vector is not None:
        def steer(module: torch.nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
            out = out.clone()
            out[:, -1, :] += vector
            return out
        handle = model.module.model.layers[STEER_LAYER].register_forward_hook(steer)
    try:
        with torch.no_grad():
            return model.module.generate(**enc, max_new_tokens=steps, do_sample=False,
                                         pad_token_id=model.tokenizer.pad_token_id)
    finally:
        if handle is not None:
            handle.remove()


def nnsight_path(source: torch.nn.Module, tokenizer: object, texts: list[str], steps: int,
                 vector: torch.Tensor) -> Callable[[], torch.Tensor] | None:
    """nnsight's current spelling (0.8): a bounded step loop, then the ids as `tracer.result`."""
    try:
        from nnsight import LanguageModel as NNsightModel
    except ImportError:
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # 0.8 prefers TransformersModel; LanguageModel still works
        model = NNsightModel(source, tokenizer=tokenizer)

    def run() -> torch.Tensor:
        with model.generate(texts, max_new_tokens=steps, do_sample=False) as tracer:
            for _ in tracer.iter[:steps]:
                model.model.layers[STEER_LAYER].output[:, -1, :] += vector
            ids = tracer.result.save()
        return ids

    return run


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--compile", nargs="+", default=["graph"], help="compiled modes to time (graph, inductor, cudagraphs)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model = LanguageModel("smollm2-135m", dtype=getattr(torch, args.dtype))
    model.module.to(args.device)
    texts = prompts(args.prompts)
    vector = torch.randn(576, generator=torch.Generator().manual_seed(0))
    vector = (vector / vector.norm() * 8.0).to(args.device, model.module.dtype)

    paths: dict[str, Callable[[], torch.Tensor]] = {
        **{f"interp_dsl {mode}": (lambda mode=mode: dsl(model, texts, args.tokens, vector, mode)) for mode in args.compile},
        "interp_dsl reference": lambda: dsl(model, texts, args.tokens, vector, "off"),
        "HF generate + hook": lambda: hf(model, texts, args.tokens, vector),
        "HF generate, plain": lambda: hf(model, texts, args.tokens, None),
    }
    theirs = nnsight_path(model.module, model.tokenizer, texts, args.tokens, vector)
    if theirs is not None:
        paths["nnsight"] = theirs

    reference = paths["interp_dsl reference"]()
    first: dict[str, float] = {}
    for name, run in paths.items():  # untimed first call: capture and compile, caches
        start = time.perf_counter()
        ids = run()
        first[name] = time.perf_counter() - start
        if name != "HF generate, plain" and not torch.equal(ids.to(reference.device), reference):
            raise SystemExit(f"{name}: generated ids differ from the reference interpreter's")
    best = {name: float("inf") for name in paths}
    for _ in range(args.repeats):
        for name, run in paths.items():
            if args.device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            run()
            if args.device == "cuda":
                torch.cuda.synchronize()
            best[name] = min(best[name], time.perf_counter() - start)

    tokens = args.prompts * args.tokens
    plain = best["HF generate, plain"]
    print(f"SmolLM2-135M {args.dtype} on {args.device} ({args.threads} threads): {args.prompts} prompts x "
          f"{args.tokens} new tokens, steering at layer {STEER_LAYER} every step; best of {args.repeats}")
    print("| path | tokens/s | s per run | / plain generate | first call s |")
    print("| --- | --- | --- | --- | --- |")
    for name, seconds in best.items():
        print(f"| {name} | {tokens / seconds:.0f} | {seconds:.2f} | {seconds / plain:.2f} | {first[name]:.1f} |")
    stats = model.compile_stats()
    print(f"compiled: {stats.compilations} compilation(s), {stats.calls} compiled decode steps, "
          f"{stats.fallbacks} fallback(s)")


if __name__ == "__main__":
    main()
