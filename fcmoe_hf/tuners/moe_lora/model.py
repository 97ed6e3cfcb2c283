"""MoELoraModel: injects MoE-LoRA layers into a model and exposes router losses and routing statistics."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from typing import Optional

import torch
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from peft.utils import AuxiliaryTrainingWrapper
from torch import nn

from .config import TRANSFORMERS_MODELS_TO_MOE_LORA_TARGET_MODULES_MAPPING, MoELoraConfig
from .layer import Linear, MoELoraLayer, RoutingContext, RoutingStatistics


def _adapter_names_pre_forward_hook(module, args, kwargs, adapter_names):
    kwargs["adapter_names"] = adapter_names
    return args, kwargs


class MoELoraModel(BaseTuner):
    """Creates a Mixture-of-LoRA-Experts model from a pretrained transformers model.

    Every targeted `nn.Linear` becomes a [`~fcmoe_hf.tuners.moe_lora.layer.Linear`] holding `num_experts` LoRA experts
    and a top-k router. Use it through plain peft: `get_peft_model(model, MoELoraConfig(...))`.

    Besides the peft tuner API, the model offers what federated training needs:

    - [`router_losses`]: the load-balancing and z-losses of the last training forward, averaged over MoE-LoRA layers,
      for the trainer to add to the task loss (the base model's own MoE aux loss, if any, stays in `outputs.loss` and
      is not counted here). Collected by default; the next training forward drops losses nobody read, and
      [`set_router_loss_collection`]`(False)` stops computing them, for training loops that never add them (a
      plain `transformers.Trainer`);
    - [`routing_statistics`] / [`reset_routing_statistics`]: per layer and expert activation counts and mean gate
      probabilities, accumulated on device since the last reset.

    Mixed-adapter batches work as with peft's LoRA: `peft_model(**inputs, adapter_names=[...])` (one adapter name
    per batch row, `"__base__"` for the base model) in eval mode.

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
        context = self.routing_context
        mask = kwargs.get("attention_mask")
        context.attention_mask = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
        if context.has_unread_router_losses and module.training and torch.is_grad_enabled():
            # A new training forward and nobody read the last one's losses (a loop that never calls router_losses()):
            # holding them would keep the part of its autograd graph only they use alive for as long as the model
            # lives. Eval and no-grad forwards keep them: they record none, and a trainer may run one (TRL's
            # SFTTrainer does, for its outputs) between the training forward and reading its losses.
            self._drop_router_losses()

    def _drop_router_losses(self) -> None:
        for layer in self.moe_layers().values():
            layer.router_losses.clear()
        self.routing_context.has_unread_router_losses = False

    @contextmanager
    def _enable_peft_forward_hooks(self, *args, **kwargs) -> Iterator[None]:
        """Feeds `adapter_names` (mixed-adapter batch inference) to every MoE-LoRA layer, as peft's LoRA does.

        `PeftModel.forward` / `generate` enter this context with their kwargs and remove `adapter_names` from what the
        base model gets; the pre-forward hooks registered here pass it to the layers instead.
        """
        adapter_names = kwargs.pop("adapter_names", None)
        if adapter_names is None:
            yield
            return
        if self.training:
            raise ValueError("Cannot pass `adapter_names` when the model is in training mode.")
        if isinstance(adapter_names, str) or not isinstance(adapter_names, (list, tuple)):
            raise TypeError(f"`adapter_names` must be a list of str, one per batch row, got {type(adapter_names)}.")
        # Checked here, not per layer: a layer need not have every adapter, but a typo must not pass silently.
        known = set()
        for layer in self.moe_layers().values():
            known.update(layer.moe_lora_A.keys())
        unknown = {name for name in adapter_names if name != "__base__"} - known
        if unknown:
            raise ValueError(f"Trying to infer with non-existing adapter(s): {', '.join(sorted(unknown))}")

        hooked_types = (MoELoraLayer, AuxiliaryTrainingWrapper)
        num_beams = kwargs.get("num_beams")
        expanded = list(adapter_names)
        if isinstance(num_beams, int) and num_beams > 1:
            # Beam search repeats every input num_beams times (row-major), so each name is repeated likewise.
            expanded = [name for name in adapter_names for _ in range(num_beams)]
        handles = []
        try:
            for module in self.model.modules():
                if isinstance(module, hooked_types):
                    hook = partial(_adapter_names_pre_forward_hook, adapter_names=expanded)
                    handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
            repeated = len(expanded) != len(adapter_names)
            encoder = self.model.get_encoder() if repeated and hasattr(self.model, "get_encoder") else None
            if encoder is not None and encoder is not self.model:
                # The encoder of an encoder-decoder model sees the original, unrepeated batch; hooks registered later
                # run later, so these overwrite the repeated names.
                for module in encoder.modules():
                    if isinstance(module, hooked_types):
                        hook = partial(_adapter_names_pre_forward_hook, adapter_names=list(adapter_names))
                        handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
            yield
        finally:
            for handle in handles:
                handle.remove()

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

        Call it before the next training forward, which drops unread losses (eval and no-grad forwards in between
        do not). Returns `None` when no training forward recorded any (e.g. in eval mode, with the adapter disabled,
        or with router-loss collection turned off by [`set_router_loss_collection`]). Unweighted: the trainer
        multiplies them by `router_aux_loss_coef` and `router_z_loss_coef`.
        """
        adapter_name = adapter_name or self.active_adapters[0]
        aux, z = [], []
        still_held = False
        for layer in self.moe_layers().values():
            losses = layer.router_losses.pop(adapter_name, None)
            if losses is not None:
                aux.append(losses[0])
                z.append(losses[1])
            still_held = still_held or bool(layer.router_losses)
        self.routing_context.has_unread_router_losses = still_held
        if not aux:
            return None
        return torch.stack(aux).mean(), torch.stack(z).mean()

    def set_router_loss_collection(self, enabled: bool) -> None:
        """Turn the computation and keeping of router losses for [`router_losses`] on (the default) or off.

        Turn it off when no one adds the router losses to the loss (e.g. a plain `transformers.Trainer`): training
        forwards then neither compute them nor hold on to them. [`~fcmoe_hf.trainer.FederatedMoETrainer`] turns it on.
        Turning it off drops the losses currently held. Change it between training steps, not between a forward and
        its backward (under gradient checkpointing the recomputed forward must run the same ops).
        """
        self.routing_context.collect_router_losses = enabled
        if not enabled:
            self._drop_router_losses()

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
