"""Benchmark `ivx serve`: 1, 8 and 32 concurrent clients sending small traces (one prompt, read the
last position of a middle layer) to a server on 127.0.0.1, against the same traces run locally in
one process. Every remote value is checked against the local one first.

    python bench/serve.py [--model smollm2-135m] [--traces 64]

Reported per concurrency: throughput (traces/s), p50 / p99 latency of one trace (client-side:
local fake-tensor check, HTTP, queue, run, result), and throughput over the local run's. The
server runs one job at a time, so concurrency buys overlap of the clients' checks and HTTP with
the server's forwards, not parallel forwards. Clients are threads of this process, each with its
own config-only model, so their local checks share one interpreter (and this machine's cores
with the server). Cross-user batching (one forward for jobs that share
a program) is not built yet, so there is no "with batching" column.
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


def start_server(model: str, keys: Path) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-m", "interp_dsl.cli", "serve", "--model", model, "--port", str(port),
                             "--keys", str(keys)], cwd=ROOT, stderr=subprocess.DEVNULL)
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
    proc, url = start_server(args.model, keys)
    try:
        local, fake = LanguageModel(args.model), LanguageModel(args.model, weights="fake")
        server = remote(url, key, quiet=True)
        prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.traces)]
        for prompt in prompts[:4]:  # values first: remote equals local
            # thread counts differ between the processes, so float sums may round differently
            torch.testing.assert_close(trace(fake, prompt, server), trace(local, prompt, None), atol=1e-4, rtol=1e-4)

        t0 = time.perf_counter()
        for prompt in prompts:
            trace(local, prompt, None)
        local_rate = len(prompts) / (time.perf_counter() - t0)

        rows = []
        fakes = [fake] + [LanguageModel(args.model, weights="fake") for _ in range(31)]  # one per client
        for clients in (1, 8, 32):
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
            rows.append((clients, rate, statistics.median(latencies), p99))
    finally:
        proc.terminate()
        proc.wait(timeout=60)

    print(f"{args.model}, {len(prompts)} traces per row, one prompt each; local (one process, "
          f"compile='off'): {local_rate:.1f} traces/s")
    print("| clients | traces/s | p50 latency | p99 latency | throughput / local |")
    print("| --- | --- | --- | --- | --- |")
    for clients, rate, p50, p99 in rows:
        print(f"| {clients} | {rate:.1f} | {p50 * 1000:.0f} ms | {p99 * 1000:.0f} ms | {rate / local_rate:.2f} |")


if __name__ == "__main__":
    main()
