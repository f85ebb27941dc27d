"""What travels between a client and `ivx serve`: safetensors bodies with JSON in their metadata.

A job is one safetensors file: the tensors are the batch's `input_ids` and `attention_mask` and
the tensor params (`param.NAME`); the metadata holds the program as IR JSON (`program`) and the
rest of the job as JSON (`job`: invoke rows, pad id, number params). A result is one safetensors
file too: every saved tensor under `value.N`, and in the metadata how they nest into each saved
value (tuples, lists, dicts, HF model outputs, by value id) and whether the forward stopped early. Nothing in either
is code or a path: a reader only decodes data.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from typing import Any

import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from compiler.errors import Diagnostic
from compiler.ir import Span
from compiler.shape_rules import is_tensor_like

FORMAT = "ivx-job/1"
RESULT_FORMAT = "ivx-result/1"
PARAM_PREFIX = "param."


class WireError(ValueError):
    """A body that is not a well-formed job or result; the message says what is wrong."""


@dataclass(frozen=True)
class Job:
    """A decoded job: the program's JSON (validated by `compiler.ir.loads`, not here), the batch's
    token ids and mask, each invoke's rows, the pad id, and the params by name."""

    program: str
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    rows: tuple[tuple[int, int], ...]
    pad_id: int
    params: dict[str, Any]


# ------------------------------------------------------------------------------------------ jobs
def encode_job(program: str, input_ids: torch.Tensor, attention_mask: torch.Tensor,
               rows: list[slice], pad_id: int, params: dict[str, Any]) -> bytes:
    """A job's body. `params` hold tensors and numbers (bool, int, float)."""
    tensors = {"input_ids": input_ids.long(), "attention_mask": attention_mask.long()}
    numbers: dict[str, Any] = {}
    for name, value in params.items():
        if isinstance(value, torch.Tensor):
            tensors[PARAM_PREFIX + name] = value
        elif isinstance(value, (bool, int, float)):
            numbers[name] = value
        else:
            raise WireError(f"param {name!r} is a {type(value).__name__}: only tensors and numbers travel")
    job = {"rows": [[r.start, r.stop] for r in rows], "pad_id": pad_id, "params": numbers}
    return save_tensors(_contiguous(tensors), metadata={"format": FORMAT, "program": program,
                                                        "job": json.dumps(job)})


def decode_job(body: bytes) -> Job:
    """A job's parts, with their shapes and types checked; WireError says what is wrong."""
    metadata, tensors = _read(body, FORMAT)
    if "program" not in metadata or "job" not in metadata:
        raise WireError("the job's metadata needs 'program' (IR JSON) and 'job'")
    try:
        job = json.loads(metadata["job"])
    except (ValueError, RecursionError) as e:
        raise WireError(f"the job's 'job' metadata is not JSON: {e}") from None
    if not isinstance(job, dict) or set(job) != {"rows", "pad_id", "params"}:
        raise WireError("the job's 'job' metadata is an object with rows, pad_id and params")
    ids, mask = tensors.pop("input_ids", None), tensors.pop("attention_mask", None)
    if ids is None or mask is None:
        raise WireError("a job carries the tensors input_ids and attention_mask")
    params = _params(job["params"], tensors)
    return Job(metadata["program"], ids, mask, _rows(job["rows"]), _int(job["pad_id"], "pad_id"), params)


def _params(numbers: Any, tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    if not isinstance(numbers, dict):
        raise WireError("the job's params are an object of numbers")
    bad = next((k for k, v in numbers.items() if type(v) not in (bool, int, float)), None)
    if bad is not None:
        raise WireError(f"param {bad!r} is not a number")
    stray = next((k for k in tensors if not k.startswith(PARAM_PREFIX)), None)
    if stray is not None:
        raise WireError(f"a job has no tensor {stray!r}: it carries input_ids, attention_mask and param.NAME")
    params = {k.removeprefix(PARAM_PREFIX): v for k, v in tensors.items()}
    twice = next((k for k in numbers if k in params), None)
    if twice is not None:
        raise WireError(f"param {twice!r} is given twice")
    return {**params, **numbers}


def _rows(rows: Any) -> tuple[tuple[int, int], ...]:
    if not isinstance(rows, list) or not all(isinstance(r, list) and len(r) == 2 for r in rows):
        raise WireError("the job's rows are a list of [start, stop] pairs")
    return tuple((_int(a, "a row start"), _int(b, "a row stop")) for a, b in rows)


def _int(value: Any, what: str) -> int:
    if type(value) is not int:
        raise WireError(f"{what} is an integer, found {type(value).__name__}")
    return value


# --------------------------------------------------------------------------------------- results
OUTPUT = "generated"  # a generation's ids in a result body (saved values are named value.N)


def encode_result(values: dict[int, Any], stopped: bool, output: torch.Tensor | None = None) -> bytes:
    """A result's body: each saved value (by value id) as tensors and how they nest, and a
    generation's ids (`output`). UnsendableValue for a value that cannot travel (see `unsendable`)."""
    for i, value in values.items():
        problem = unsendable(value)
        if problem:
            raise UnsendableValue(i, problem)
    tensors: dict[str, torch.Tensor] = {}
    tree = {str(i): _flatten(value, tensors) for i, value in values.items()}
    if output is not None:
        tensors[OUTPUT] = output.detach().cpu()
    return save_tensors(_contiguous(tensors), metadata={
        "format": RESULT_FORMAT, "values": json.dumps(tree), "stopped": json.dumps(stopped)})


class UnsendableValue(ValueError):
    """A saved value that cannot travel in a result."""

    def __init__(self, value_id: int, problem: str):
        super().__init__(problem)
        self.value_id = value_id


def unsendable(value: Any) -> str | None:
    """Why `value` (real or fake) cannot travel in a result, or None: results hold tensors,
    numbers, strings, None, and tuples, lists, string-keyed dicts and HF model outputs of those."""
    if is_tensor_like(value) or value is None or isinstance(value, (bool, int, float, str)):
        return None
    if _model_output(type(value)) or (isinstance(value, (tuple, list)) and not hasattr(value, "_fields")):
        items = list(value.values()) if _model_output(type(value)) else list(value)
    elif type(value) is dict and all(isinstance(k, str) for k in value):
        items = list(value.values())
    else:
        return f"a {type(value).__name__} cannot be sent back from a server; save tensors, numbers or tuples of them"
    return next((p for p in map(unsendable, items) if p), None)


def decode_result(body: bytes) -> tuple[dict[int, Any], bool, torch.Tensor | None]:
    """A result body's saved values by id (nested as they were saved), whether the forward
    stopped early, and a generation's ids (None for a forward)."""
    metadata, tensors = _read(body, RESULT_FORMAT)
    try:
        tree = json.loads(metadata["values"])
        values = {int(i): _unflatten(node, tensors) for i, node in tree.items()}
        return values, bool(json.loads(metadata["stopped"])), tensors.get(OUTPUT)
    except (KeyError, ValueError, TypeError, AttributeError, RecursionError) as e:
        raise WireError(f"a malformed result: {type(e).__name__}: {str(e)[:200]}") from None


def result_bytes(values: dict[int, Any]) -> int:
    """How many bytes of tensors saved values hold (fake and abstract tensors count as real)."""
    total = 0
    for value in torch.utils._pytree.tree_leaves(values):
        if is_tensor_like(value):
            total += math.prod(value.shape) * value.dtype.itemsize
    return total


def _flatten(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, torch.Tensor):
        key = f"value.{len(tensors)}"
        tensors[key] = value.detach().cpu()
        return {"tensor": key}
    if value is None or isinstance(value, (bool, int, float, str)):
        return {"value": value}
    if _model_output(type(value)):
        return {"output": type(value).__name__, "items": {k: _flatten(v, tensors) for k, v in value.items()}}
    if isinstance(value, (tuple, list)) and not hasattr(value, "_fields"):
        kind = "tuple" if isinstance(value, tuple) else "list"
        return {kind: [_flatten(v, tensors) for v in value]}
    return {"dict": {k: _flatten(v, tensors) for k, v in value.items()}}  # checked by `unsendable`


def _unflatten(node: dict[str, Any], tensors: dict[str, torch.Tensor]) -> Any:
    if "tensor" in node:
        return tensors[node["tensor"]]
    if "value" in node:
        return node["value"]
    if "tuple" in node:
        return tuple(_unflatten(n, tensors) for n in node["tuple"])
    if "list" in node:
        return [_unflatten(n, tensors) for n in node["list"]]
    if "dict" in node:
        return {k: _unflatten(v, tensors) for k, v in node["dict"].items()}
    cls = _output_class(node["output"])
    return cls(**{k: _unflatten(v, tensors) for k, v in node["items"].items()})


def _model_output(cls: type) -> bool:
    from transformers.utils import ModelOutput
    return issubclass(cls, ModelOutput)


def _output_class(name: str) -> type:
    """A HF model output class by name, from transformers' own module of them only."""
    from transformers import modeling_outputs
    cls = getattr(modeling_outputs, name, None) if name.isidentifier() and not name.startswith("_") else None
    if not isinstance(cls, type) or not _model_output(cls):
        raise ValueError(f"{name!r} is not a transformers model output")
    return cls


# ----------------------------------------------------------------------------------- diagnostics
def diagnostics_json(diagnostics: list[Diagnostic]) -> list[dict[str, Any]]:
    """Diagnostics as records (never rendered: only the client may quote the user's source)."""
    return [{"file": d.span.file, "line": d.span.line, "col": d.span.col, "end_line": d.span.end_line,
             "end_col": d.span.end_col, "message": d.message, "hint": d.hint, "severity": d.severity}
            for d in diagnostics]


def diagnostics_of(records: Any) -> list[Diagnostic]:
    """Inverse of `diagnostics_json`; WireError for anything else."""
    try:
        return [Diagnostic(Span(str(r["file"]), int(r["line"]), int(r["col"]), int(r["end_line"]),
                                int(r["end_col"])), str(r["message"]), str(r["hint"]), str(r["severity"]))
                for r in records]
    except (KeyError, TypeError, ValueError) as e:
        raise WireError(f"malformed diagnostics: {type(e).__name__}: {e}") from None


# ---------------------------------------------------------------------------------------- shared
def _read(body: bytes, expected: str) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """A safetensors body's metadata and tensors, its format checked."""
    if len(body) < 8:
        raise WireError("the body is not a safetensors file (shorter than its 8-byte header size)")
    (size,) = struct.unpack("<Q", body[:8])
    if size > len(body) - 8:
        raise WireError(f"the body is not a safetensors file (its header claims {size} bytes)")
    try:
        header = json.loads(body[8:8 + size])
        metadata = header.get("__metadata__") or {}
        tensors = load_tensors(body)
    except Exception as e:  # safetensors raises its own error types for every malformed body
        raise WireError(f"the body is not a safetensors file: {str(e).splitlines()[0][:200]}") from None
    if not isinstance(metadata, dict) or metadata.get("format") != expected:
        raise WireError(f"the body is not an {expected} safetensors file (its metadata 'format' says "
                        f"{metadata.get('format') if isinstance(metadata, dict) else None!r})")
    return metadata, tensors


def _contiguous(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.contiguous() for k, v in tensors.items()}
