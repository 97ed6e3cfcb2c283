"""Expert activation counts for an MoE base model's own experts (the paper fine-tunes a Switch Transformer's experts).

In transformers >= 5 an MoE block fuses its experts into 3-D parameters under `<block>.experts` (expert on dimension
0) and its router returns per-layer logits when the model runs with `output_router_logits=True`.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..tuners.moe_lora.router import dispatch_statistics


def base_expert_groups(model: nn.Module) -> list[str]:
    """Names of the modules holding an MoE base's fused experts (`...mlp.experts`), in layer order."""
    return [
        name
        for name, module in model.named_modules()
        if name.endswith(".experts") and any(p.dim() == 3 for p in module.parameters(recurse=False))
    ]


def freeze_all_but_base_experts(model: nn.Module, train_router: bool = False) -> list[str]:
    """Make only the base's fused expert parameters (and optionally its routers) trainable; returns their names."""
    groups = tuple(f"{g}." for g in base_expert_groups(model))
    if not groups:
        raise ValueError(f"{type(model).__name__} has no fused MoE experts (no '<block>.experts' 3-D parameters).")
    trainable = []
    for name, p in model.named_parameters():
        is_router = train_router and name.endswith(".gate.weight") and ".mlp." in name
        p.requires_grad_(name.startswith(groups) or is_router)
        if p.requires_grad:
            trainable.append(name)
    return trainable


def count_routed_tokens(
    router_logits: torch.Tensor, top_k: int, attention_mask: Optional[torch.Tensor] = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`(counts (E,), probability_sum (E,), num_tokens)` of one layer's `(N, E)` router logits, padding excluded."""
    probs = router_logits.float().softmax(-1)
    index = probs.topk(top_k, dim=-1).indices
    if attention_mask is not None and attention_mask.numel() != router_logits.shape[0]:
        attention_mask = None  # logits not aligned with the mask (e.g. packed inputs): count every token
    return dispatch_statistics(probs, index, attention_mask)
