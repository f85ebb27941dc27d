"""Benchmark sweeps on Ray: the same sweep (a middle layer's last position and the top next token,
per prompt) over the same prompts run in this process, and on a local Ray instance with 1 and 2
workers. Every Ray result is checked against the in-process one first.

    python bench/ray.py [--model smollm2-135m] [--prompts 256] [--batch-size 16] [--shard-size 32]

Reported per executor: wall time of the sweep, the time to its first shard (recording, starting the
workers, each loading the model, and one shard), and the throughput after it (prompts of the later
shards over the time from the first shard written to the last), against the in-process run's.
Starting the local Ray instance itself is reported once, apart. On a machine with few cores two CPU workers share the cores one process
already uses, so expect overhead here, not speed-up: the gain is on nodes with a GPU per worker,
or on several machines.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

if Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    del sys.path[0]  # run as `python bench/ray.py`: this file must not stand in for the `ray` package
import ray  # noqa: E402

from interp_dsl import LanguageModel, ray_cluster  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = [json.loads(line)["text"] for line in (ROOT / "examples/data/landmarks.jsonl").read_text().splitlines()]


def sweep(model, prompts: list[str], batch_size: int, shard_size: int, executor, out: Path) -> dict:
    """Run the sweep into `out`; its wall time, its time to the first shard, its prompts/s from the
    first shard written to the last (the shards' mtimes), and its results."""
    start = time.time()
    with model.sweep(prompts, batch_size=batch_size, shard_size=shard_size, compile="off", progress=False,
                     executor=executor, out=out, restart=True) as run:
        model.model.layers[15].output[:, -1].save("h")
        model.lm_head.output[:, -1].argmax(-1).save("top")
    wall = time.time() - start
    shards = sorted(run.results.manifest["shards"], key=lambda s: (out / s["file"]).stat().st_mtime)
    written = [(out / s["file"]).stat().st_mtime for s in shards]
    later = sum(s["prompts"][1] - s["prompts"][0] for s in shards[1:])
    return {"wall": wall, "first": written[0] - start, "rate": later / max(written[-1] - written[0], 1e-9),
            "results": run.results}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--prompts", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--shard-size", type=int, default=32)
    args = parser.parse_args()

    model = LanguageModel(args.model)
    prompts = (PROMPTS * (args.prompts // len(PROMPTS) + 1))[: args.prompts]
    with tempfile.TemporaryDirectory() as tmp:
        runs = {"in-process": sweep(model, prompts, args.batch_size, args.shard_size, "local", Path(tmp) / "local")}
        begin = time.perf_counter()
        ray.init(include_dashboard=False, logging_level=logging.ERROR, log_to_driver=False)
        init_s = time.perf_counter() - begin
        for workers in (1, 2):
            name = f"ray, {workers} worker{'s' * (workers > 1)}"
            runs[name] = sweep(model, prompts, args.batch_size, args.shard_size, ray_cluster(workers=workers),
                               Path(tmp) / name.replace(", ", "-").replace(" ", "-"))
        ray.shutdown()
    local = runs["in-process"]["results"]
    print(f"{args.model}, {len(prompts)} prompts, batch {args.batch_size}, shards of {args.shard_size}; "
          f"torch {torch.__version__}, {os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads in this "
          f"process; starting the local Ray instance took {init_s:.1f} s (not counted below)")
    print("| executor | wall | first shard after | prompts/s after the first shard | vs in-process "
          "| max abs diff of h | same top token |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, run in runs.items():
        results = run["results"]
        torch.testing.assert_close(results["h"], local["h"], rtol=1e-4, atol=1e-4)  # thread counts differ
        agree = (results["top"] == local["top"]).float().mean().item()
        diff = (results["h"] - local["h"]).abs().max().item()
        print(f"| {name} | {run['wall']:.1f} s | {run['first']:.1f} s | {run['rate']:.1f} | "
              f"{run['rate'] / runs['in-process']['rate']:.2f} | {diff:.1e} | {agree:.1%} |")


if __name__ == "__main__":
    main()
