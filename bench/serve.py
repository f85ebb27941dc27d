"""Benchmark `ivx serve`: 1, 8 and 32 concurrent clients sending small traces (one prompt, read the
last position of a middle layer) to a server on 127.0.0.1, with and without cross-user batching,
against the same traces run locally in one process. Every remote value is checked against the
local one first.

    python bench/serve.py [--model smollm2-135m] [--traces 64]

Reported per concurrency: throughput (traces/s), p50 / p99 latency of one trace (client-side:
local fake-tensor check, HTTP, queue, run, result), and throughput over the local run's, for a
server that runs one job per forward (`--batch-rows 1`) and one that lets waiting jobs with the
same program share a forward (`--batch-rows 32`, the default). Jobs share a forward only when
their prompts have the same token length, so the prompts here are the landmark prompts of the most
common length (the same experiment sent by many users on like prompts). Clients are threads of
this process, each with its own config-only model, so their local checks share one interpreter
(and this machine's cores with the server).
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = [line.split('"text": "')[1].split('"')[0]
           for line in (ROOT / "examples/data/landmarks.jsonl").read_text().splitlines()]


def trace(model, prompt: str, remote) -> torch.Tensor:
    with model.trace(prompt, remote=remote, **({} if remote else {"compile": "off"})):
        h = model.model.layers[15].output[:, -1].save()
    return h.value


def start_server(model: str, keys: Path, batch_rows: int) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-m", "interp_dsl.cli", "serve", "--model", model, "--port", str(port),
                             "--keys", str(keys), "--batch-rows", str(batch_rows)], cwd=ROOT, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit("ivx serve exited before it answered")
        try:
            urllib.request.urlopen(f"{url}/v1/health", timeout=2).read()
            return proc, url
        except OSError:
            time.sleep(0.3)
    proc.kill()
    raise SystemExit("ivx serve did not start in 300 s")


def measure(server, fakes, prompts: list[str], local, clients: int) -> tuple[float, float, float]:
    """Throughput, p50 and p99 latency of `prompts` sent by `clients` threads."""
    def client(index: int) -> list[float]:
        took = []
        for prompt in prompts[index::clients]:
            start = time.perf_counter()
            trace(fakes[index], prompt, server)
            took.append(time.perf_counter() - start)
        return took
    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        latencies = sorted(t for took in pool.map(client, range(clients)) for t in took)
    rate = len(prompts) / (time.perf_counter() - t0)
    p99 = latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))]
    return rate, statistics.median(latencies), p99


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--traces", type=int, default=64, help="traces per concurrency level")
    args = parser.parse_args()
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))  # the server gets the other half

    from interp_dsl import LanguageModel, remote
    from interp_dsl.keys import digest
    keys = Path(tempfile.mkdtemp()) / "keys.txt"
    key = "bench-key"
    keys.write_text(f"bench sha256:{digest(key)} max_jobs=64\n")
    local = LanguageModel(args.model)
    lengths = Counter(len(local.tokenizer(p)["input_ids"]) for p in PROMPTS)
    length = lengths.most_common(1)[0][0]
    alike = [p for p in PROMPTS if len(local.tokenizer(p)["input_ids"]) == length]
    prompts = [alike[i % len(alike)] for i in range(args.traces)]

    t0 = time.perf_counter()
    for prompt in prompts:
        trace(local, prompt, None)
    local_rate = len(prompts) / (time.perf_counter() - t0)

    fakes = [LanguageModel(args.model, weights="fake") for _ in range(32)]  # one per client
    table: dict[int, list[tuple[float, float, float]]] = {}
    started = [start_server(args.model, keys, batch_rows) for batch_rows in (1, 32)]  # both up, measured in turn
    try:
        servers = [remote(url, key, quiet=True) for _, url in started]
        for server in servers:
            for prompt in alike[:4]:  # values first: remote equals local (and both servers warm)
                # thread counts differ between the processes, so float sums may round differently
                torch.testing.assert_close(trace(fakes[0], prompt, server), trace(local, prompt, None),
                                           atol=1e-4, rtol=1e-4)
        for clients in (1, 8, 32):
            table[clients] = [measure(server, fakes, prompts, local, clients) for server in servers]
    finally:
        for proc, _ in started:
            proc.terminate()
            proc.wait(timeout=60)

    print(f"{args.model}, {len(prompts)} traces per row, one prompt each ({len(alike)} distinct prompts of "
          f"{length} tokens); local (one process, compile='off'): {local_rate:.1f} traces/s")
    print("| clients | one job per forward: traces/s | p50 | p99 | / local "
          "| batched jobs: traces/s | p50 | p99 | / local |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for clients, runs in table.items():
        cells = " | ".join(f"{rate:.1f} | {p50 * 1000:.0f} ms | {p99 * 1000:.0f} ms | {rate / local_rate:.2f}"
                           for rate, p50, p99 in runs)
        print(f"| {clients} | {cells} |")


if __name__ == "__main__":
    main()
