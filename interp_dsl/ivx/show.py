"""Human-readable views of sweep results: the `ivx run` summary, `ivx show`, `ivx plot`."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

from compiler.errors import InterventionError
from compiler.ir import Span
from runtime.shards import DamagedResultsWarning, Results, load_results

SHOWN_TEXTS = 20  # generated texts printed by `ivx run` and `ivx show`; the rest are in the shards


def summarise(results: Results, tokenizer: Any = None) -> str:
    """A generation's texts (the first few), then one line per save: dtype, rows x value shape,
    and a glimpse of the values."""
    lines = [*_texts(results), f"{results.n_prompts} prompts" + "".join(f" x {name}[{size}]" for name, size in results.dims)
             + f" = {len(results.index['prompt'])} rows"]
    for name, value in results.saves.items():
        line = f"{name}: {str(value.dtype).removeprefix('torch.')}[rows, {', '.join(map(str, value.shape[1:]))}]"
        line = line.replace("[rows, ]", "[rows]")
        if len(value) and tokenizer is not None and value.dim() == 2 and value.is_floating_point() \
                and value.shape[-1] >= len(tokenizer):
            top = [repr(tokenizer.decode([int(i)])) for i in value[-1].topk(3).indices]
            line += f"  top tokens (last row): {', '.join(top)}"
        elif len(value) and value.is_floating_point():
            v = value.double()
            line += f"  mean {v.mean():.4g}, min {v.min():.4g}, max {v.max():.4g}"
            if v[0].numel() == 1 and len(v) <= 8:
                line += f"  = {[round(float(x), 4) for x in v.flatten()]}"
        lines.append(line)
    return "\n".join(lines)


def describe_dir(out: Path) -> tuple[str, bool]:
    """`ivx show`: what the directory holds, how far the run got, and its saves; and whether every
    shard it lists is whole."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DamagedResultsWarning)  # said below, in the listing
        results = load_results(out)
    m = results.manifest
    total = m.get("n_prompts")
    state = "(complete)" if results.complete else f"(incomplete: {results.n_prompts} of {total} prompts readable; " \
                                                  "rerun the same command to resume)"
    lines = [f"{out}: {m.get('experiment', '<python>')} on {m['model']} {state}",
             *(f"damaged: {d['file']} (prompts {d['prompts'][0]}..{d['prompts'][1] - 1}) {d['reason']}"
               for d in results.missing),
             f"shards: {len(m['shards'])}; batch size {m['batch_size']}; passes: {', '.join(m.get('passes', [])) or 'none'}",
             "prompts: " + ", ".join(f"{n} <- {_source_text(s)}" for n, s in m["prompts"].items()),
             *([f"generation: {', '.join(f'{k}={v}' for k, v in m['generate'].items())}"] if "generate" in m else [])]
    for name, size in results.dims:
        lines.append(f"axis {name} ({size}): {_short(_tick_labels(results, name))}")
    lines.append(summarise(results))
    return "\n".join(lines), not results.missing


def _texts(results: Results) -> list[str]:
    """`[axis=value, ...] 'prompt' -> 'text'` per row of a generation."""
    texts, prompts = results.texts, results.annotations
    lines = []
    for name, rows in texts.items():
        label = f"{name}: " if len(texts) > 1 else ""
        for row, text in list(enumerate(rows))[:SHOWN_TEXTS]:
            where = ", ".join(f"{axis}={values[row].item()}" for axis, values in results.index.items()
                              if axis != "prompt")
            prompt = prompts[f"prompt:{name}"][row]
            lines.append(f"{f'[{where}] ' if where else ''}{label}{prompt!r} -> {text!r}")
        if len(rows) > SHOWN_TEXTS:
            lines.append(f"... and {len(rows) - SHOWN_TEXTS} more (Results.texts)")
    return lines


def _source_text(source: dict[str, Any]) -> str:
    if "literal" in source:
        rows = source.get("rows", len(source["literal"]))
        return repr(source["literal"][0]) if rows == 1 else f"{rows} prompts given in a list"
    return f"{source['file']} ({source['kind']}, {source['field']})"


def _short(values: list[Any]) -> str:
    text = ", ".join(map(str, values[:8]))
    return f"[{text}{', ...' if len(values) > 8 else ''}]"


def plot(out: Path, name: str, png: Path | None = None) -> Path:
    """`ivx plot`: the save `name` averaged over prompts, as a line (one axis) or heatmap (two)."""
    results = load_results(out)
    span = Span(str(out), 0)
    if name not in results.saves:
        from compiler.errors import did_you_mean
        raise InterventionError.at(span, f"no save {name!r} in {out}",
                                   did_you_mean(name, results.saves) or f"saves: {', '.join(results.saves)}")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise InterventionError.at(span, "ivx plot needs matplotlib",
                                   "pip install 'interp-dsl[plot]' (or pip install matplotlib)") from None
    grid = results.grid(name).double()
    if grid[0].numel() != _axes_size(results):
        raise InterventionError.at(span, f"save {name} holds {results.saves[name][0].numel()} numbers per row",
                                   "plot saves with one number per row (e.g. a probability)")
    mean = grid.mean(0).reshape(*(size for _, size in results.dims))
    axes = [d for d in results.dims if d[1] > 1]
    mean = mean.squeeze() if axes else mean.reshape(1)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    if len(axes) == 2:
        image = ax.imshow(mean.numpy(), aspect="auto", origin="lower", cmap="viridis")
        ax.set_ylabel(axes[0][0])
        ax.set_xlabel(axes[1][0])
        ax.set_yticks(range(axes[0][1]), _tick_labels(results, axes[0][0]))
        ax.set_xticks(range(axes[1][1]), _tick_labels(results, axes[1][0]))
        fig.colorbar(image, label=name)
    elif len(axes) <= 1:
        labels = _tick_labels(results, axes[0][0]) if axes else ["all"]
        ax.plot(range(len(labels)), mean.numpy(), marker="o")
        ax.set_xticks(range(len(labels)), labels)
        ax.set_xlabel(axes[0][0] if axes else "")
        ax.set_ylabel(name)
    else:
        raise InterventionError.at(span, f"{len(axes)} swept axes; ivx plot draws one (a line) or two (a heatmap)")
    ax.set_title(f"{name}, mean over {results.n_prompts} prompts")
    fig.tight_layout()
    png = png or out / f"{name}.png"
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return png


def _axes_size(results: Results) -> int:
    size = 1
    for _, n in results.dims:
        size *= n
    return size


def _tick_labels(results: Results, axis: str) -> list[str]:
    m = results.manifest
    if axis in m["fan_axes"]:
        values = m["fan_axes"][axis]
    elif "+" in axis:  # a zipped group: its points in order
        names = axis.split("+")
        values = list(dict.fromkeys(tuple(p[n] for n in names) for p in m["points"]))
    else:
        values = list(dict.fromkeys(p[axis] for p in m["points"]))
    return [str(v) for v in values]

