"""`ivx run` for an experiment with a `generate` line: one generation per sweep point, written as
`point<i>.safetensors` (the ids and every save; a save in a steps block stacked over its steps,
or as `name@step` when the steps' shapes differ),
`generations.jsonl` (the decoded text per point and prompt) and `manifest.json`."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from interp_dsl.experiment import Experiment, lower
from interp_dsl.models import Model
from runtime.results import atomic_write

MANIFEST = "manifest.json"
TEXTS = "generations.jsonl"


@dataclass
class Generated:
    """One sweep point's generation: the prompts' ids followed by the new ids, and the saves."""

    point: dict[str, Any]
    ids: torch.Tensor | None
    saves: dict[str, torch.Tensor]
    prompts: list[str]
    texts: list[str]


def run_generation(exp: Experiment, model: Model, out: Path, compile: str | None = None) -> list[Generated]:
    """Generate at every sweep point of `exp`; each point's results are written as soon as it ends."""
    tokenizer = getattr(model, "tokenizer", None)
    done: list[Generated] = []
    points = exp.points()
    for i, point in enumerate(points):
        tracer = lower(exp, model, point, compile=compile)
        ids = tracer.result.output  # None when a `stop` ended the generation
        length = int(tracer.batch().kwargs["input_ids"].shape[1])
        rows = [] if ids is None else list(ids)
        saves = stack_steps({name: value for name, value in tracer.result.saves.items()
                             if isinstance(value, torch.Tensor)})
        generated = Generated(point, ids, saves, [_decode(tokenizer, row[:length]) for row in rows],
                              [_decode(tokenizer, row[length:]) for row in rows])
        _write_point(out, i, generated)
        done.append(generated)
        _write_manifest(out, exp, tracer.engine.name, done, complete=i + 1 == len(points))  # a failure keeps what ran
    return done


def stack_steps(saves: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Saves of a steps block (`name@step`) stacked into `name` [steps, ...] when every step's value
    has one shape (a `[:, -1]` read, a token); otherwise (the prompt pass is longer) left per step."""
    groups: dict[str, list[str]] = {}
    for key in saves:
        groups.setdefault(key.rpartition("@")[0] or key, []).append(key)
    out: dict[str, torch.Tensor] = {}
    for name, keys in groups.items():
        values = [saves[k] for k in keys]
        if keys != [name] and len({v.shape for v in values}) == 1:
            out[name] = torch.stack(values)
        else:
            out.update((k, saves[k]) for k in keys)
    return out


def _decode(tokenizer: Any, ids: torch.Tensor) -> str:
    if tokenizer is None:
        return " ".join(map(str, ids.tolist()))
    return tokenizer.decode(ids, skip_special_tokens=True)


def _write_point(out: Path, index: int, generated: Generated) -> None:
    from safetensors.torch import save_file
    tensors = {k: v.contiguous() for k, v in generated.saves.items()}
    if generated.ids is not None:
        tensors["ids"] = generated.ids
    atomic_write(out / f"point{index}.safetensors", lambda tmp: save_file(tensors, tmp))
    lines = (out / TEXTS).read_text().splitlines() if index and (out / TEXTS).exists() else []
    lines.append(json.dumps({"point": generated.point, "prompts": generated.prompts, "texts": generated.texts},
                            ensure_ascii=False))
    atomic_write(out / TEXTS, lambda tmp: Path(tmp).write_text("\n".join(lines) + "\n"))


def _write_manifest(out: Path, exp: Experiment, model: str, done: list[Generated], complete: bool) -> None:
    manifest = {"kind": "generation", "complete": complete, "experiment": str(exp.path), "text": exp.text,
                "model": model, "generate": exp.generate,
                "points": [g.point for g in done], "saves": sorted(done[0].saves) if done else []}
    atomic_write(out / MANIFEST, lambda tmp: Path(tmp).write_text(json.dumps(manifest, indent=1)))


def summarise_generations(done: list[Generated]) -> str:
    """The generated text per sweep point and prompt, then the saves."""
    lines = []
    for g in done:
        lines.extend(_line(g.point, prompt, text) for prompt, text in zip(g.prompts, g.texts, strict=True))
    if done and done[0].saves:
        lines.append("saves: " + ", ".join(f"{k} {list(v.shape)}" for k, v in done[0].saves.items()))
    return "\n".join(lines)


def is_generation_dir(out: Path) -> bool:
    return (out / MANIFEST).is_file() and json.loads((out / MANIFEST).read_text()).get("kind") == "generation"


def describe_generation_dir(out: Path) -> str:
    """`ivx show` for a generation run."""
    manifest = json.loads((out / MANIFEST).read_text())
    args = ", ".join(f"{k}={v}" for k, v in manifest["generate"].items())
    state = "" if manifest["complete"] else f"; incomplete: {len(manifest['points'])} point(s) ran"
    lines = [f"{out}: {manifest['experiment']} on {manifest['model']} (generation: {args}{state})"]
    for line in (out / TEXTS).read_text().splitlines():
        record = json.loads(line)
        lines.extend(_line(record["point"], p, t) for p, t in zip(record["prompts"], record["texts"], strict=True))
    if manifest["saves"]:
        lines.append("saves: " + ", ".join(manifest["saves"]))
    return "\n".join(lines)


def _line(point: dict[str, Any], prompt: str, text: str) -> str:
    where = f"[{', '.join(f'{k}={v}' for k, v in point.items())}] " if point else ""
    return f"{where}{prompt!r} -> {text!r}"
