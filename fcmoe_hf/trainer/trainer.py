"""FederatedMoETrainer: a client's local training in a federated MoE-LoRA fine-tuning, as a `transformers.Trainer`.

The federation-specific behaviour lives in [`FederatedMoEMixin`], so any `Trainer` subclass (TRL's `SFTTrainer`, ...)
can get it: `class FederatedSFTTrainer(FederatedMoEMixin, SFTTrainer): ...`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import fields
from functools import cache
from typing import Any, Optional

import torch
from peft import PeftModel
from transformers import Trainer

from ..federated.functional.retention import retained_start
from ..federated.layout import expert_group_key
from ..federated.update import ClientUpdate
from ..tuners.moe_lora import MoELoraModel
from .arguments import FederatedClientArguments, to_federated_training_arguments, training_args_from_call
from .base_experts import base_expert_groups, count_routed_tokens
from .federated_state import federated_parameters, get_federated_state, set_federated_state

logger = logging.getLogger(__name__)

_DEFAULTS = FederatedClientArguments()
_FEDERATED_FIELDS = tuple(f.name for f in fields(FederatedClientArguments))


@cache
def _warn_missing_federated_fields(config_name: str, missing: tuple[str, ...]) -> None:
    # Once per config class: a client trainer is typically rebuilt every round.
    logger.warning(
        f"{config_name} has no federated client fields ({', '.join(missing)}): using their defaults "
        f"({', '.join(f'{name}={getattr(_DEFAULTS, name)!r}' for name in missing)}). To set them, combine "
        f"`FederatedClientArguments` with your config: `@dataclass class MyConfig(FederatedClientArguments, "
        f"{config_name}): pass`."
    )


class FederatedMoEMixin:
    """Adds to a `Trainer` what a federated MoE client needs.

    - `compute_loss` (calling `super()`) adds the MoE-LoRA router losses (`moe_lora_aux_loss_coef * aux +
      moe_lora_z_loss_coef * z`, by default the `MoELoraConfig`'s `router_aux_loss_coef` / `router_z_loss_coef`),
      scaled like the task loss under gradient accumulation and `num_items_in_batch`, and
      the optional FedProx term `proximal_mu / 2 * ||theta - theta_round_start||^2`; logs `task_loss`, `aux_loss`,
      `z_loss` and expert usage alongside the usual `loss`. Router-loss collection
      ([`MoELoraModel.set_router_loss_collection`]) is turned on when the trainer is created and when `train()`
      starts, since the trainer reads them at every training step.
    - [`start_round`] sets the round's starting point: the new global state plus the retained residual of the
      client's previous update (FC-MoE local knowledge retention).
    - [`client_update`] returns what the client sends: per-tensor deltas from the round's start, expert activation
      counts (reduced over all processes), importance, sample count and metrics.

    Federation settings are read from `self.args` ([`FederatedClientArguments`] fields); a config without them gets
    the defaults, with a warning naming the missing fields (once per config class).
    """

    def __init__(self, *args, **kwargs):
        training_args = training_args_from_call(args, kwargs)
        if training_args is not None and training_args.gradient_checkpointing and not training_args.gradient_checkpointing_kwargs:
            # Reentrant checkpointing runs the first forward under no_grad: the router losses recorded there would carry
            # no gradient. The non-reentrant variant keeps them differentiable.
            training_args.gradient_checkpointing_kwargs = {"use_reentrant": False}
        super().__init__(*args, **kwargs)
        missing = tuple(name for name in _FEDERATED_FIELDS if not hasattr(self.args, name))
        if missing:
            _warn_missing_federated_fields(type(self.args).__name__, missing)
        self._round_start: Optional[dict[str, torch.Tensor]] = None
        self._round_start_pending = False
        self._proximal_anchor: Optional[dict[str, torch.Tensor]] = None
        self._previous_global: Optional[dict[str, torch.Tensor]] = None
        self._user_optimizer = self.optimizer is not None
        self._reset_round_accumulators()
        self._collect_router_losses()

    # -- settings ---------------------------------------------------------------------------------------------------

    def _fed_arg(self, name: str):
        return getattr(self.args, name, getattr(_DEFAULTS, name))

    @property
    def moe_model(self) -> Optional[MoELoraModel]:
        """The MoE-LoRA tuner inside the trained model, or `None` when the model has no MoE-LoRA adapter."""
        model = self.model
        if isinstance(model, PeftModel) and isinstance(model.base_model, MoELoraModel):
            return model.base_model
        return None

    def _router_loss_coefs(self) -> tuple[float, float]:
        moe = self.moe_model
        config = moe.peft_config[moe.active_adapters[0]] if moe is not None else None
        aux = self._fed_arg("moe_lora_aux_loss_coef")
        z = self._fed_arg("moe_lora_z_loss_coef")
        aux = aux if aux is not None else (config.router_aux_loss_coef if config is not None else 0.0)
        z = z if z is not None else (config.router_z_loss_coef if config is not None else 0.0)
        return aux, z

    def _collect_router_losses(self) -> None:
        # compute_loss reads the router losses after every training forward: they must be recorded, whatever the
        # user set on the model for other loops.
        moe = self.moe_model
        if moe is not None:
            moe.set_router_loss_collection(True)

    # -- round lifecycle --------------------------------------------------------------------------------------------

    def _reset_round_accumulators(self) -> None:
        self._log_sums: dict[str, torch.Tensor] = {}
        self._log_steps = 0
        self._base_counts: dict[str, list[torch.Tensor]] = {}
        moe = self.moe_model
        if moe is not None:
            moe.reset_routing_statistics()

    def _snapshot_round_start(self) -> None:
        self._round_start = get_federated_state(self.model)
        mu = self._fed_arg("proximal_mu")
        if mu > 0:
            params = federated_parameters(self.model)
            if any(hasattr(p, "ds_id") for p in params.values()):
                raise NotImplementedError("proximal_mu > 0 is not supported with DeepSpeed ZeRO-3 (sharded parameters).")
            self._proximal_anchor = {k: p.detach().clone() for k, p in params.items()}
        else:
            self._proximal_anchor = None

    def start_round(
        self,
        global_state: Mapping[str, torch.Tensor],
        previous_update: Optional[ClientUpdate] = None,
        federated_round: Optional[int] = None,
        previous_global: Optional[Mapping[str, torch.Tensor]] = None,
        residual_scale: float = 1.0,
    ) -> dict[str, torch.Tensor]:
        """Load the round's starting point into the model and return it.

        The start is `Theta + retention_lambda * R` for every expert (FC-MoE, arXiv:2606.15625, Eq. 6), with `R` the retained
        residual of `previous_update` under the new global `global_state` (computed by
        [`fcmoe_hf.federated.retained_start`], the same function the server uses for personalized adapters); shared
        tensors start from the global. Without a previous update, or with `retention_lambda=0`, the round starts from
        `global_state`.

        Args:
            global_state: the new global tensors, keyed like the model's federated state.
            previous_update: this client's update of the previous round it took part in.
            federated_round: sets `args.federated_round` when given.
            previous_global: the global state `previous_update` started from, needed by `retention_mode="filtered"`;
                defaults to the `global_state` of this trainer's previous `start_round`.
            residual_scale: the factor the server scaled `previous_update` by before merging it (its norm clip,
                `AggregationResult.update_scales[client_id]`), so that the residual is that of the merged update.
        """
        if federated_round is not None and hasattr(self.args, "federated_round"):
            self.args.federated_round = federated_round
        lam = self._fed_arg("retention_lambda")
        mode = self._fed_arg("retention_mode")
        if previous_global is None:
            previous_global = self._previous_global
        start: Mapping[str, torch.Tensor] = global_state
        if previous_update is not None and lam > 0:
            start = retained_start(
                global_state,
                previous_update.deltas,
                lam=lam,
                mode=mode,
                previous_global=previous_global if mode == "filtered" else None,
                scale=residual_scale,
            )
        set_federated_state(self.model, start)
        # Only the filtered residual needs last round's global; keep the copy only then.
        self._previous_global = {k: v.detach().cpu().clone() for k, v in global_state.items()} if mode == "filtered" else None
        if not self._user_optimizer:
            # Each round is a fresh local optimisation from the new starting point (no stale Adam moments).
            self.optimizer, self.lr_scheduler = None, None
        self._snapshot_round_start()
        self._round_start_pending = True
        self._reset_round_accumulators()
        return dict(start)

    def train(self, *args, **kwargs):
        if not self._round_start_pending:
            # No start_round(): the update is measured from wherever this train() starts.
            self._snapshot_round_start()
            self._reset_round_accumulators()
        self._round_start_pending = False
        self._collect_router_losses()
        started = time.perf_counter()
        output = super().train(*args, **kwargs)
        self._last_train_output = output
        self._last_train_runtime = time.perf_counter() - started
        return output

    # -- loss -------------------------------------------------------------------------------------------------------

    def _task_loss_is_scaled_for_ga(self, num_items_in_batch) -> bool:
        # Mirrors Trainer.training_step: when this is True the Trainer does not divide the loss by the accumulation
        # steps, so terms computed as per-micro-batch means must be divided here.
        scaled = getattr(self, "loss_is_scaled_for_ga", None)
        if scaled is not None:
            return scaled
        return bool(
            (getattr(self, "model_accepts_loss_kwargs", False) and num_items_in_batch is not None)
            or getattr(self, "compute_loss_func", None) is not None
        )

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        count_base = self._fed_arg("count_base_expert_activations") and model.training
        if count_base:
            inputs = {**inputs, "output_router_logits": True}
        attention_mask = inputs.get("attention_mask")
        # Outputs only when needed: some parents (TRL's SFTTrainer) do extra work to return them.
        want_outputs = return_outputs or count_base
        result = super().compute_loss(model, inputs, return_outputs=want_outputs, num_items_in_batch=num_items_in_batch)
        loss, outputs = result if want_outputs else (result, None)
        if not model.training:
            return (loss, outputs) if return_outputs else loss

        extra = None
        logs = {"task_loss": loss.detach()}
        moe = self.moe_model
        router_losses = moe.router_losses() if moe is not None else None
        if router_losses is not None:
            aux_coef, z_coef = self._router_loss_coefs()
            aux, z = router_losses
            extra = aux_coef * aux + z_coef * z
            logs.update(aux_loss=aux.detach(), z_loss=z.detach())
        if self._proximal_anchor is not None:
            params = federated_parameters(self.model)
            proximal = sum(
                (params[k] - anchor).float().square().sum() for k, anchor in self._proximal_anchor.items()
            )
            proximal = 0.5 * self._fed_arg("proximal_mu") * proximal
            extra = proximal if extra is None else extra + proximal
            logs["proximal_loss"] = proximal.detach()
        if extra is not None:
            if self._task_loss_is_scaled_for_ga(num_items_in_batch):
                extra = extra / getattr(self, "current_gradient_accumulation_steps", self.args.gradient_accumulation_steps)
            loss = loss + extra.to(loss.dtype)
        if count_base:
            self._count_base_experts(outputs, attention_mask)
        for key, value in logs.items():
            self._log_sums[key] = self._log_sums.get(key, 0) + value.float()
        self._log_steps += 1
        return (loss, outputs) if return_outputs else loss

    def _count_base_experts(self, outputs, attention_mask) -> None:
        router_logits = getattr(outputs, "router_logits", None)
        if not router_logits:
            raise ValueError(
                "count_base_expert_activations=True but the model returned no router_logits: it is not an MoE model "
                "with output_router_logits support."
            )
        config = self.model.config
        top_k = getattr(config, "num_experts_per_tok", None) or getattr(config, "top_k", 1)
        groups = base_expert_groups(self.model)
        for group, logits in zip(groups, router_logits):
            counts, prob_sum, tokens = count_routed_tokens(logits, top_k, attention_mask)
            acc = self._base_counts.get(group)
            self._base_counts[group] = [counts, prob_sum, tokens] if acc is None else [
                acc[0] + counts, acc[1] + prob_sum, acc[2] + tokens
            ]

    # -- evaluation and logging -------------------------------------------------------------------------------------

    def evaluation_loop(self, *args, **kwargs):
        # Evaluation must not count as local routing activity: f[i,k] is measured on training data.
        moe = self.moe_model
        if moe is None:
            return super().evaluation_loop(*args, **kwargs)
        previous = moe.routing_context.track_statistics
        moe.set_routing_statistics_tracking(False)
        try:
            return super().evaluation_loop(*args, **kwargs)
        finally:
            moe.set_routing_statistics_tracking(previous)

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if "loss" in logs and self._log_steps:
            # One host sync per logging step, never per training step.
            for key, total in self._log_sums.items():
                logs[key] = round((total / self._log_steps).item(), 6)
            logs.update(self._expert_usage_logs())
            self._log_sums, self._log_steps = {}, 0
        super().log(logs, *args, **kwargs)

    def _expert_usage_logs(self) -> dict[str, float]:
        counts, _ = self._local_activation_statistics()
        if not counts:
            return {}
        shares = torch.stack([c.double() / c.sum().clamp_min(1) for c in counts.values()])  # (layers, E)
        entropy = -(shares * shares.clamp_min(1e-12).log()).sum(-1) / torch.log(torch.tensor(float(shares.shape[-1])))
        return {
            "expert_usage_entropy": round(entropy.mean().item(), 4),
            "expert_max_share": round(shares.max(-1).values.mean().item(), 4),
        }

    # -- the update -------------------------------------------------------------------------------------------------

    def _local_activation_statistics(self) -> tuple[dict[str, torch.Tensor], dict[str, tuple[torch.Tensor, torch.Tensor]]]:
        counts, gates = {}, {}
        moe = self.moe_model
        if moe is not None:
            adapter = moe.active_adapters[0]
            for name, layer in moe.moe_layers().items():
                group = expert_group_key(name)
                stats = layer.routing_statistics.get(adapter)
                if stats is None:
                    device = layer.moe_lora_A[adapter].device
                    num_experts = layer.num_experts[adapter]
                    counts[group] = torch.zeros(num_experts, dtype=torch.long, device=device)
                    gates[group] = (torch.zeros(num_experts, dtype=torch.float64, device=device), torch.zeros((), dtype=torch.long, device=device))
                else:
                    counts[group] = stats.activation_counts
                    gates[group] = (stats.probability_sum, stats.num_tokens)
        for group, (c, prob_sum, tokens) in self._base_counts.items():
            counts[group] = c
            gates[group] = (prob_sum, tokens)
        return counts, gates

    def activation_statistics(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """`(activation_counts, mean_gate)` per expert group, summed over all processes. Call on every process."""
        counts, gates = self._local_activation_statistics()
        reduced_counts, mean_gate = {}, {}
        for group in counts:
            prob_sum, tokens = gates[group]
            packed = torch.cat([counts[group].double(), prob_sum.double(), tokens.double().reshape(1)])
            if self.accelerator.num_processes > 1:
                packed = self.accelerator.reduce(packed, reduction="sum")
            num_experts = counts[group].shape[0]
            reduced_counts[group] = packed[:num_experts].round().long().cpu()
            mean_gate[group] = (packed[num_experts:-1] / packed[-1].clamp_min(1)).float().cpu()
        return reduced_counts, mean_gate

    def client_update(self) -> Optional[ClientUpdate]:
        """What this client sends to the server after `train()`: a [`ClientUpdate`], on the main process only.

        Must be called on every process (it gathers sharded parameters and reduces statistics); the other processes
        get `None`. Deltas are `theta_end - theta_round_start` in fp32 for every trainable tensor.
        """
        if self._round_start is None:
            raise RuntimeError("client_update() needs a finished train() (or start_round() + train()) first.")
        end = get_federated_state(self.model)
        counts, mean_gate = self.activation_statistics()
        if not self.is_world_process_zero():
            return None
        deltas = {key: end[key] - self._round_start[key] for key in end}
        metrics: dict[str, Any] = {}
        output = getattr(self, "_last_train_output", None)
        if output is not None:
            metrics["train_loss"] = float(output.training_loss)
            metrics["train_runtime"] = round(self._last_train_runtime, 3)
            metrics["global_steps"] = int(output.global_step)
        for entry in reversed(self.state.log_history):
            for key in ("aux_loss", "z_loss", "task_loss", "proximal_loss", "expert_usage_entropy", "expert_max_share"):
                if key in entry:
                    metrics.setdefault(f"last_{key}", entry[key])
        return ClientUpdate(
            client_id=str(self._fed_arg("client_id")),
            num_samples=len(self.train_dataset) if self.train_dataset is not None else 0,
            deltas=deltas,
            activation_counts=counts,
            mean_gate=mean_gate,
            round=self._fed_arg("federated_round"),
            metrics=metrics,
        )


class FederatedMoETrainer(FederatedMoEMixin, Trainer):
    """A drop-in `transformers.Trainer` for one federated client's local training of MoE-LoRA experts.

    Same constructor and `train()` as `Trainer`; use [`FederatedMoETrainingArguments`] for the federation fields. A
    plain `TrainingArguments` (or none) is converted into [`FederatedMoETrainingArguments`] with the federation fields
    at their defaults, so `trainer.args` always has them. See [`FederatedMoEMixin`] for what it adds.

    Example:

    ```python
    >>> trainer = FederatedMoETrainer(model=peft_model, args=args, train_dataset=client_data)
    >>> trainer.start_round(global_state, previous_update)  # optional: retention
    >>> trainer.train()
    >>> update = trainer.client_update()  # ClientUpdate on the main process, None elsewhere
    ```
    """

    def __init__(self, *args, **kwargs):
        if "args" in kwargs or len(args) < 2:
            kwargs["args"] = to_federated_training_arguments(kwargs.get("args"))
        else:
            args = (args[0], to_federated_training_arguments(args[1]), *args[2:])
        super().__init__(*args, **kwargs)
