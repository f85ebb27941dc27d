"""The decoding loop shared by every execution mode: prompt pass, then one token per step.

A step function runs the model on one step's inputs (the whole left-padded prompt at step 0, the
last chosen token afterwards) and returns the logits at the last position; how it keeps its KV
cache (a dynamic one in the reference interpreter, a static one in a compiled decode step) is its
own business. The loop owns everything else: positions from the attention mask (left padding does
not shift them), greedy or seeded sampling, and the end-of-sequence rule of HF `generate` (a row
that produced EOS continues with padding; the loop ends when every row has).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from compiler.ir import Generation

StepInputs = dict[str, torch.Tensor]  # input_ids, attention_mask, position_ids
StepFn = Callable[[int, StepInputs], torch.Tensor]  # (step, inputs) -> logits [batch, vocab]


@dataclass(frozen=True)
class Sampling:
    """How the next token is chosen: greedy (`do_sample=False`), or sampled from the logits
    scaled by `temperature`, cut to the `top_k` tokens and to the `top_p` probability mass, with
    a generator seeded by `seed` (same seed, same tokens)."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


@dataclass(frozen=True)
class DecodePlan:
    """One `model.generate(...)`: how many tokens, how they are chosen, and the special tokens."""

    max_new_tokens: int
    sampling: Sampling = Sampling()
    eos_token_id: int | None = None
    pad_token_id: int = 0

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")

    @classmethod
    def of(cls, settings: Generation, eos_token_id: int | None, pad_token_id: int) -> "DecodePlan":
        """The IR's generation settings with the model's end-of-sequence and padding tokens."""
        sampling = Sampling(settings.do_sample, settings.temperature, settings.top_k, settings.top_p, settings.seed)
        return cls(settings.max_new_tokens, sampling, eos_token_id, pad_token_id)


def decode(step: StepFn, input_ids: torch.Tensor, attention_mask: torch.Tensor,
           spec: DecodePlan) -> torch.Tensor:
    """Run up to `spec.max_new_tokens` steps; the prompt ids followed by the generated ids."""
    choose = _chooser(spec.sampling, input_ids.device)
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": positions_of(attention_mask)}
    unfinished = torch.ones(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    out = input_ids
    for k in range(spec.max_new_tokens):
        token = choose(step(k, inputs))
        if spec.eos_token_id is not None:
            token = torch.where(unfinished, token, torch.full_like(token, spec.pad_token_id))
            unfinished = unfinished & (token != spec.eos_token_id)
        out = torch.cat([out, token[:, None]], dim=-1)
        if k + 1 == spec.max_new_tokens or not bool(unfinished.any()):
            break
        inputs = next_inputs(inputs, token)
    return out


def positions_of(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids from a left-padded mask: padding does not shift them, so each row equals its
    own unpadded run."""
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


def next_inputs(inputs: StepInputs, token: torch.Tensor) -> StepInputs:
    """The next step's inputs after `token` [batch] was chosen: that token, one more position."""
    mask = inputs["attention_mask"]
    return {"input_ids": token[:, None], "attention_mask": torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=-1),
            "position_ids": inputs["position_ids"][:, -1:] + 1}


def _chooser(sampling: Sampling, device: torch.device) -> Callable[[torch.Tensor], torch.Tensor]:
    if not sampling.do_sample:
        return lambda logits: logits.argmax(dim=-1)
    from transformers.generation.logits_process import (
        LogitsProcessorList,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )
    warpers = LogitsProcessorList()
    if sampling.temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(sampling.temperature))
    if sampling.top_k is not None:
        warpers.append(TopKLogitsWarper(sampling.top_k))
    if sampling.top_p is not None and sampling.top_p < 1.0:
        warpers.append(TopPLogitsWarper(sampling.top_p))
    generator = torch.Generator(device=device)
    if sampling.seed is not None:
        generator.manual_seed(sampling.seed)
    else:
        generator.seed()

    def choose(logits: torch.Tensor) -> torch.Tensor:
        scores = warpers(None, logits.float())  # type: ignore[arg-type]
        probs = torch.softmax(scores, dim=-1)
        return torch.multinomial(probs, 1, generator=generator).squeeze(-1)

    return choose


def cache_argument(module: torch.nn.Module) -> str:
    """The forward's name for the KV cache: `cache` in newer transformers, `past_key_values` before."""
    return _cache_argument(type(module))


@functools.cache
def _cache_argument(cls: type) -> str:
    return "cache" if "cache" in inspect.signature(cls.forward).parameters else "past_key_values"


def step_kwargs(module: torch.nn.Module, inputs: StepInputs, cache: Any, **extra: Any) -> dict[str, Any]:
    """The keyword arguments of one step's forward: its inputs, the cache, last-position logits."""
    return {**inputs, cache_argument(module): cache, "use_cache": True, "logits_to_keep": 1, **extra}
