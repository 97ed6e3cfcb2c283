"""Batched log-likelihood of candidate continuations after prompts, with a causal LM (left-padded batches)."""

from __future__ import annotations

import inspect
from typing import Any, Optional

import torch
from transformers.modeling_outputs import CausalLMOutputWithPast


def left_pad(sequences: list[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    length = max(map(len, sequences))
    ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, length - len(seq) :] = torch.tensor(seq, dtype=torch.long)
        mask[row, length - len(seq) :] = 1
    return ids.to(device), mask.to(device)


def positions_of(mask: torch.Tensor) -> torch.Tensor:
    # Explicit positions make left padding exact for absolute-position models too (RoPE alone would not need it).
    return (mask.cumsum(-1) - 1).clamp(min=0)


def right_pad(sequences: list[list[int]], pad_id: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[row, : len(seq)] = 1
    return ids, mask


def _cache_kwarg(model: torch.nn.Module) -> str:
    """Name of the forward argument that takes a KV cache: `cache` since transformers 5.2x, `past_key_values` before."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft wrappers take **kwargs
    parameters = inspect.signature(base.forward).parameters
    if "cache" in parameters:
        return "cache"
    if "past_key_values" in parameters:
        return "past_key_values"
    return "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


def _output_cache(out: Any) -> Any:
    # Read the field directly: the `past_key_values` alias of new transformers versions logs a deprecation warning.
    fields = vars(out)
    return fields.get("cache", fields.get("past_key_values"))


def score_with_cache(
    model: torch.nn.Module, prompts: list[list[int]], answers: list[list[int]], pad_id: int, device: torch.device
) -> Optional[torch.Tensor]:
    """Summed answer log-probabilities `(B, C)`: the prompt runs once, its KV cache is repeated per candidate."""
    num_rows, num_candidates = len(prompts), len(answers)
    ids, mask = left_pad(prompts, pad_id, device)
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions_of(mask), use_cache=True, logits_to_keep=1)
    first = torch.log_softmax(out.logits[:, -1].float(), dim=-1)
    scores = first[:, [answer[0] for answer in answers]]
    longest = max(map(len, answers))
    if longest == 1:
        return scores
    cache = _output_cache(out)
    if cache is None or not hasattr(cache, "batch_repeat_interleave"):
        return None
    cache.batch_repeat_interleave(num_candidates)  # row b * C + c continues prompt b with candidate c
    inputs, input_mask = right_pad([a[:-1] for a in answers], pad_id, longest - 1)
    targets, target_mask = right_pad([a[1:] for a in answers], 0, longest - 1)
    inputs, input_mask = inputs.repeat(num_rows, 1).to(device), input_mask.repeat(num_rows, 1).to(device)
    targets, target_mask = targets.repeat(num_rows, 1).to(device), target_mask.repeat(num_rows, 1).to(device)
    full_mask = torch.cat([mask.repeat_interleave(num_candidates, dim=0), input_mask], dim=1)
    start = mask.sum(-1).repeat_interleave(num_candidates)[:, None]
    positions = start + torch.arange(longest - 1, device=device)[None, :]
    out = model(
        input_ids=inputs,
        attention_mask=full_mask,
        position_ids=positions,
        use_cache=True,
        **{_cache_kwarg(model): cache},
    )
    logprobs = torch.log_softmax(out.logits.float(), dim=-1)
    token_scores = logprobs.gather(-1, targets[..., None]).squeeze(-1) * target_mask
    return scores + token_scores.sum(-1).view(num_rows, num_candidates)


def score_full(
    model: torch.nn.Module, prompts: list[list[int]], answers: list[list[int]], pad_id: int, device: torch.device
) -> torch.Tensor:
    """Summed answer log-probabilities `(B, C)` from one pass over every prompt + candidate sequence."""
    num_rows, num_candidates = len(prompts), len(answers)
    longest = max(map(len, answers))
    sequences = [prompt + answer for prompt in prompts for answer in answers]
    ids, mask = left_pad(sequences, pad_id, device)
    # Left padding puts every answer at the end: the last `longest + 1` logits cover all answer tokens.
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions_of(mask), logits_to_keep=longest + 1)
    logprobs = torch.log_softmax(out.logits[:, :longest].float(), dim=-1)
    targets = ids[:, -longest:]
    token_scores = logprobs.gather(-1, targets[..., None]).squeeze(-1)
    lengths = torch.tensor([len(a) for a in answers], device=device).repeat(num_rows)
    valid = torch.arange(longest, device=device)[None, :] >= (longest - lengths)[:, None]
    return (token_scores * valid).sum(-1).view(num_rows, num_candidates)
