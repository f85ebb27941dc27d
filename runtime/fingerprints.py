"""What determines a run's numbers, as short hashes: parameter values, prompt rows, a model's
weights, and its architecture (parameter names, shapes and dtypes)."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import torch


def value_digest(value: Any) -> str:
    """A content hash of a parameter value: a tensor's dtype, shape and bytes; a number's repr."""
    h = hashlib.sha256()
    if isinstance(value, torch.Tensor):
        t = value.detach().cpu().contiguous()
        h.update(f"tensor {t.dtype} {tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    else:
        h.update(f"{type(value).__name__} {value!r}".encode())
    return h.hexdigest()[:16]


def rows_digest(rows: list[dict[str, str]]) -> str:
    """A digest of the prompt rows one shard is computed from."""
    return hashlib.sha256(json.dumps(rows, ensure_ascii=False, sort_keys=True).encode()).hexdigest()[:16]


def weights_fingerprint(module: torch.nn.Module) -> str:
    """A hash of the weights that reads each tensor once: names, shapes and dtypes, two integer
    sums over each tensor's bit patterns, and 64 values spread over it (a fine-tuned or edited
    model differs in these; hashing every byte would cost seconds on a large model). Integer sums
    wrap the same way in any order, so the hash does not depend on thread count or device."""
    h = hashlib.sha256()
    seen: dict[tuple[Any, ...], bytes] = {}  # tied weights appear under each name: read them once
    for name, tensor in module.state_dict().items():
        h.update(f"{name}{tuple(tensor.shape)}{tensor.dtype}".encode())
        if tensor.device.type != "meta" and tensor.numel():
            where = (tensor.device, tensor.data_ptr(), tensor.shape, tensor.stride(), tensor.dtype)
            if where not in seen:
                flat = tensor.detach().reshape(-1)
                spread = torch.arange(64, device=flat.device) * (flat.numel() - 1) // 63  # exact in int64
                seen[where] = repr([*flat[spread].double().tolist(), *_bit_sums(flat)]).encode()
            h.update(seen[where])
    return h.hexdigest()[:16]


_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}  # element size -> integer view
_CHUNK = 1 << 16  # elements widened to int64 at a time: 512 KiB, which stays in a core's cache


def _bit_sums(flat: torch.Tensor) -> tuple[int, int]:
    """The sum of a tensor's bit patterns and of their squares, modulo 2**64."""
    bits = flat.view(_BITS[flat.element_size()]) if flat.is_floating_point() or flat.is_complex() else flat
    total = squares = 0
    for start in range(0, bits.numel(), _CHUNK):
        part = bits[start:start + _CHUNK].to(torch.int64, copy=True)  # a copy: squared in place below
        total += int(part.sum())
        squares += int(part.mul_(part).sum())
    return total % 2**64, squares % 2**64


def architecture_fingerprint(module: torch.nn.Module) -> str:
    """A hash of the parameters' and buffers' names, shapes and dtypes: equal for a model and its
    config-only twin, which holds some buffers as parameters (a remote client checks the server
    serves what it was checked against)."""
    tensors = {**dict(module.named_buffers(remove_duplicate=False)),
               **dict(module.named_parameters(remove_duplicate=False))}  # tied weights under each name
    text = ";".join(f"{n}{tuple(t.shape)}{t.dtype}" for n, t in sorted(tensors.items()))
    return hashlib.sha256(text.encode()).hexdigest()[:16]
