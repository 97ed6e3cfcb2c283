"""Token-level top-k router and its auxiliary losses, as pure functions over tensors.

The router always works in fp32 (logits, softmax, top-k), whatever the dtype of the base model: bf16 logits make
near-tied experts flip between steps and the load-balancing loss noisy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F


@dataclass
class RouterOutput:
    """What one router call produces for `N` tokens and `E` experts.

    Attributes:
        logits (`torch.Tensor`): `(N, E)` fp32 router logits.
        probs (`torch.Tensor`): `(N, E)` fp32 softmax probabilities.
        expert_index (`torch.Tensor`): `(N, top_k)` indices of the selected experts.
        gates (`torch.Tensor`): `(N, E)` fp32 gate values, zero outside each token's top-k.
    """

    logits: torch.Tensor
    probs: torch.Tensor
    expert_index: torch.Tensor
    gates: torch.Tensor


def route(
    hidden: torch.Tensor,
    router_weight: torch.Tensor,
    top_k: int,
    renormalize: bool,
    jitter_noise: float = 0.0,
) -> RouterOutput:
    """Route `N` tokens (`hidden`, shape `(N, in_features)`) to `top_k` of `E` experts (`router_weight`: `(E, in)`).

    `jitter_noise > 0` multiplies the router input by `U(1 - eps, 1 + eps)` (Switch Transformer); pass 0 at eval.
    """
    hidden = hidden.float()
    if jitter_noise > 0:
        hidden = hidden * torch.empty_like(hidden).uniform_(1.0 - jitter_noise, 1.0 + jitter_noise)
    # Under autocast the GEMM would run in bf16/fp16 whatever its inputs' dtype: the router opts out.
    with torch.autocast(device_type=hidden.device.type, enabled=False):
        logits = F.linear(hidden, router_weight.float())
    return route_logits(logits, top_k, renormalize)


def route_logits(logits: torch.Tensor, top_k: int, renormalize: bool) -> RouterOutput:
    """Route `N` tokens to `top_k` experts given their `(N, E)` router logits, computed by the caller.

    The second half of [`route`]: callers that compute the logits themselves (the MoE-LoRA layer gets them from the
    same GEMM as the experts' down-projections) route with this. Logits are upcast to fp32.
    """
    logits = logits.float()
    probs = logits.softmax(dim=-1)
    top_probs, expert_index = probs.topk(top_k, dim=-1)
    if renormalize:
        top_probs = top_probs / top_probs.sum(dim=-1, keepdim=True)
    gates = torch.zeros_like(probs).scatter(1, expert_index, top_probs)
    return RouterOutput(logits=logits, probs=probs, expert_index=expert_index, gates=gates)


def load_balancing_loss(
    probs: torch.Tensor, expert_index: torch.Tensor, token_mask: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """Switch / Mixtral load-balancing loss, normalised so that perfectly balanced routing gives 1.0.

    `loss = E / k * sum_e f_e * P_e`, with `f_e` the fraction of (non-padding) tokens dispatched to expert `e`
    (summing to `k` over experts) and `P_e` the mean router probability of `e`. `token_mask` (`(N,)`, 1 for real
    tokens) keeps padding out of both averages.
    """
    num_experts = probs.shape[-1]
    top_k = expert_index.shape[-1]
    dispatch = F.one_hot(expert_index, num_experts).sum(dim=1).to(probs.dtype)  # (N, E)
    if token_mask is None:
        fraction, mean_prob = dispatch.mean(dim=0), probs.mean(dim=0)
    else:
        weight = token_mask.to(probs.dtype).unsqueeze(-1)
        denom = weight.sum().clamp_min(1.0)
        fraction, mean_prob = (dispatch * weight).sum(0) / denom, (probs * weight).sum(0) / denom
    return num_experts / top_k * (fraction * mean_prob).sum()


def router_z_loss(logits: torch.Tensor, token_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """ST-MoE router z-loss: mean over (non-padding) tokens of `logsumexp(logits)^2`."""
    z = torch.logsumexp(logits, dim=-1).square()
    if token_mask is None:
        return z.mean()
    weight = token_mask.to(z.dtype)
    return (z * weight).sum() / weight.sum().clamp_min(1.0)


@torch.no_grad()
def dispatch_statistics(
    probs: torch.Tensor, expert_index: torch.Tensor, token_mask: Optional[torch.Tensor] = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`(activation_counts (E,), probability_sum (E,), num_tokens)` of one routing call, padding tokens excluded.

    A token counts once for each of its top-k experts. Computed on device with no host sync: padding tokens go to a
    dropped bin instead of being filtered out.
    """
    num_experts = probs.shape[-1]
    if token_mask is not None:
        keep = token_mask.reshape(-1).bool().to(expert_index.device)
        expert_index = torch.where(keep.unsqueeze(-1), expert_index, num_experts)
        probs = probs * keep.unsqueeze(-1)
        num_tokens = keep.sum()
    else:
        num_tokens = torch.tensor(expert_index.shape[0], device=expert_index.device)
    counts = torch.bincount(expert_index.reshape(-1), minlength=num_experts + 1)[:num_experts]
    return counts, probs.sum(dim=0).double(), num_tokens
