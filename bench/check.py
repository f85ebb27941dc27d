"""Benchmark `ivx check` on a 100-site spec: cold (empty cache: fake model build and the two
symbolic fake passes) and warm (cached signature), on SmolLM2's config and a Llama-3-70B-shaped
config, with each process's peak RSS. Each model runs in a fresh process with a fresh cache.

    python bench/check.py            # prints a table; targets: warm < 50 ms, cold < 2 s (SmolLM2),
                                     # cold < 10 s (70B), RSS < 1 GB (70B)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODELS = {"smollm2-135m": ("smollm2-135m", 30), "llama-3-70b": (str(ROOT / "examples/configs/llama-3-70b.json"), 80)}


def spec(model: str, layers: int) -> str:
    """100 sites: reads of layer outputs, MLP outputs and attention inputs, plus writes."""
    lines = [f'model "{model}"', "prompt p = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]", "invoke p {"]
    sites = 0
    for i in range(0, layers, max(1, layers // 30)):
        if sites >= 90:
            break
        lines.append(f"    save out{i} = model.model.layers[{i}].output[:, -1, :]")
        lines.append(f"    save mlp{i} = model.model.layers[{i}].mlp.output.mean(dim=1)")
        lines.append(f"    save attn{i} = model.model.layers[{i}].self_attn.input[:, -1, :].norm(dim=-1)")
        sites += 3
    for i in range(100 - sites):
        lines.append(f"    model.model.layers[{i % layers}].output[:, {i % 12}, :] *= 0.9")
    lines.append("}")
    return "\n".join(lines) + "\n"


def one(name: str) -> None:
    """Runs in a child process with INTERP_DSL_CACHE pointing at an empty directory."""
    import resource
    t0 = time.perf_counter()
    import transformers.models.gpt2.modeling_gpt2  # noqa: F401  the modeling code a cold check uses
    import transformers.models.llama.modeling_llama  # noqa: F401
    from torch._subclasses.fake_tensor import FakeTensorMode
    from transformers import AutoConfig, AutoModelForCausalLM  # noqa: F401

    from interp_dsl.ivx.check import check_files
    with FakeTensorMode():  # fake mode's own lazy imports (dynamo, sympy)
        import torch
        torch.ones(1) + 1
    imported = time.perf_counter() - t0
    model, layers = MODELS[name]
    path = Path(tempfile.mkdtemp()) / f"{name}.ivx"
    path.write_text(spec(model, layers))
    t0 = time.perf_counter()
    report = check_files([path])
    cold = time.perf_counter() - t0
    assert report.exit_code() == 0, [d.render() for d in report.diagnostics]
    warm = []
    for _ in range(15):
        t0 = time.perf_counter()
        check_files([path])
        warm.append(time.perf_counter() - t0)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"model": name, "imports_s": imported, "cold_s": cold,
                      "warm_ms": sorted(warm)[len(warm) // 2] * 1000, "peak_rss_mb": rss}))


def main() -> None:
    rows = []
    for name in MODELS:
        env = {**os.environ, "INTERP_DSL_CACHE": tempfile.mkdtemp(prefix="ivx-bench-")}
        out = subprocess.run([sys.executable, __file__, "--one", name], env=env, check=True,
                             capture_output=True, text=True, cwd=ROOT).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    print(f"{'model':<14} {'imports':>8} {'cold':>8} {'warm':>9} {'peak RSS':>9}")
    for r in rows:
        print(f"{r['model']:<14} {r['imports_s']:>7.2f}s {r['cold_s']:>7.2f}s {r['warm_ms']:>7.1f}ms "
              f"{r['peak_rss_mb']:>7.0f}MB")
    print("imports = torch, transformers and the modeling code, once per process; cold = empty cache: "
          "fake model build + two symbolic fake passes + the check; warm = cached signature (median of 15)")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--one"]:
        one(sys.argv[2])
    else:
        main()
