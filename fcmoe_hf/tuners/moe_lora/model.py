"""MoELoraModel: injects MoE-LoRA layers into a model and exposes router losses and routing statistics."""

from __future__ import annotations

from typing import Optional

import torch
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from torch import nn

from .config import TRANSFORMERS_MODELS_TO_MOE_LORA_TARGET_MODULES_MAPPING, MoELoraConfig
from .layer import Linear, MoELoraLayer, RoutingContext, RoutingStatistics


class MoELoraModel(BaseTuner):
    """Creates a Mixture-of-LoRA-Experts model from a pretrained transformers model.

    Every targeted `nn.Linear` becomes a [`~fcmoe_hf.tuners.moe_lora.layer.Linear`] holding `num_experts` LoRA experts
    and a top-k router. Use it through plain peft: `get_peft_model(model, MoELoraConfig(...))`.

    Besides the peft tuner API, the model offers what federated training needs:

    - [`router_losses`]: the load-balancing and z-losses of the last training forward, averaged over MoE-LoRA layers,
      for the trainer to add to the task loss (the base model's own MoE aux loss, if any, stays in `outputs.loss` and
      is not counted here);
    - [`routing_statistics`] / [`reset_routing_statistics`]: per layer and expert activation counts and mean gate
      probabilities, accumulated on device since the last reset.

    Args:
        model ([`~transformers.PreTrainedModel`]): the model to adapt.
        config ([`MoELoraConfig`]): the adapter configuration.
        adapter_name (`str`): the adapter name, `"default"` by default.
    """

    prefix: str = "moe_lora_"
    tuner_layer_cls = MoELoraLayer
    target_module_mapping = TRANSFORMERS_MODELS_TO_MOE_LORA_TARGET_MODULES_MAPPING

    def _pre_injection_hook(self, model: nn.Module, config: MoELoraConfig, adapter_name: str) -> None:
        if not hasattr(self, "routing_context"):
            self.routing_context = RoutingContext()
            # The padding mask reaches the layers through the shared context: kwargs of the top-level forward are the
            # only place it is visible. Trainer, generate and pipelines all pass it by keyword.
            self._mask_hook = model.register_forward_pre_hook(self._capture_attention_mask, with_kwargs=True)

    def _capture_attention_mask(self, module, args, kwargs):
        mask = kwargs.get("attention_mask")
        self.routing_context.attention_mask = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None

    def _create_and_replace(
        self,
        moe_lora_config: MoELoraConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        *,
        parameter_name: Optional[str] = None,
    ) -> None:
        if parameter_name is not None:
            raise ValueError("MoELoraConfig does not support target_parameters; target nn.Linear modules instead.")
        if isinstance(target, MoELoraLayer):
            target.update_layer(adapter_name, moe_lora_config, inference_mode=moe_lora_config.inference_mode)
            return
        base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        if not isinstance(base, nn.Linear):
            raise TypeError(
                f"MoELoraConfig.target_modules matched {current_key!r} of type {type(base).__name__}; "
                "MoE-LoRA adapts torch.nn.Linear modules only."
            )
        new_module = Linear(target, adapter_name, moe_lora_config, routing_context=self.routing_context)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    def _check_merge_allowed(self):
        raise ValueError(
            "MoE-LoRA cannot be merged into the base weights: its expert mixture depends on each token's routing. "
            "Keep the adapter attached (or use `unload()` to drop it)."
        )

    def moe_layers(self) -> dict[str, MoELoraLayer]:
        """Every MoE-LoRA layer by module name (names as in `named_modules()` of this tuner's `model`)."""
        return {name: module for name, module in self.model.named_modules() if isinstance(module, MoELoraLayer)}

    def router_losses(self, adapter_name: Optional[str] = None) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
        """`(load_balancing_loss, z_loss)` of the last training forward, averaged over layers, then cleared.

        Returns `None` when no training forward recorded any (e.g. in eval mode or with the adapter disabled).
        Unweighted: the trainer multiplies them by `router_aux_loss_coef` and `router_z_loss_coef`.
        """
        adapter_name = adapter_name or self.active_adapters[0]
        aux, z = [], []
        for layer in self.moe_layers().values():
            losses = layer.router_losses.pop(adapter_name, None)
            if losses is not None:
                aux.append(losses[0])
                z.append(losses[1])
        if not aux:
            return None
        return torch.stack(aux).mean(), torch.stack(z).mean()

    def routing_statistics(self, adapter_name: Optional[str] = None) -> dict[str, RoutingStatistics]:
        """Routing statistics per MoE-LoRA layer (module name) since the last reset; layers never run are omitted."""
        adapter_name = adapter_name or self.active_adapters[0]
        return {
            name: layer.routing_statistics[adapter_name]
            for name, layer in self.moe_layers().items()
            if adapter_name in layer.routing_statistics
        }

    def reset_routing_statistics(self) -> None:
        """Forget the routing statistics accumulated by every layer."""
        for layer in self.moe_layers().values():
            layer.reset_routing_statistics()

    def set_routing_statistics_tracking(self, enabled: bool) -> None:
        """Turn the accumulation of routing statistics on or off (e.g. off during evaluation)."""
        self.routing_context.track_statistics = enabled
