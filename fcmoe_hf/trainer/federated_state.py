"""Reading and writing the part of a model that a federation exchanges: its trainable tensors, by checkpoint key.

For a `PeftModel` the keys are the adapter checkpoint keys (`get_peft_model_state_dict` / `adapter_model.safetensors`
names, adapter name removed); for a plain model (e.g. a client fine-tuning an MoE base's own experts) they are the
parameter names. Under DeepSpeed ZeRO-3 the parameters are gathered around every read and write.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping

import torch
from peft import PeftModel
from torch import nn

from ..federated.layout import adapter_state_key


def federated_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The trainable parameters of `model` keyed by federated (checkpoint) key, in module order."""
    if isinstance(model, PeftModel):
        adapter_name = model.active_adapter
        return {adapter_state_key(n, adapter_name): p for n, p in model.named_parameters() if p.requires_grad}
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def _gathered(params, modifier_rank=None):
    if any(hasattr(p, "ds_id") for p in params):  # ZeRO-3 partitioned parameters
        import deepspeed

        return deepspeed.zero.GatheredParameters(list(params), modifier_rank=modifier_rank)
    return contextlib.nullcontext()


def get_federated_state(model: nn.Module, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """A CPU copy (in `dtype`) of every trainable tensor of `model`, keyed by federated key."""
    params = federated_parameters(model)
    with _gathered(params.values()):
        return {key: p.detach().to(device="cpu", dtype=dtype, copy=True) for key, p in params.items()}


@torch.no_grad()
def set_federated_state(model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Copy `state` into the trainable tensors of `model`; keys and shapes must match exactly.

    Raises:
        ValueError: naming the missing, unexpected or mis-shaped keys. Nothing is written then.
    """
    params = federated_parameters(model)
    missing, unexpected = sorted(set(params) - set(state)), sorted(set(state) - set(params))
    if missing or unexpected:
        raise ValueError(
            f"Federated state does not match the model's trainable tensors: missing {missing[:5]}"
            f"{' ...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}."
        )
    with _gathered(params.values(), modifier_rank=0):
        bad = [k for k, p in params.items() if tuple(state[k].shape) != tuple(p.shape)]
        if bad:
            raise ValueError(
                f"Federated state shapes differ for {bad[:5]}: e.g. {bad[0]} is {tuple(state[bad[0]].shape)}, "
                f"the model has {tuple(params[bad[0]].shape)}."
            )
        for key, p in params.items():
            p.copy_(state[key].to(device=p.device, dtype=p.dtype))
