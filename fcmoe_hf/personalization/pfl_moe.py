"""PFL-MoE's client side (Guo et al. 2021, "PFL-MoE: Personalized Federated Learning Based on Mixture of Experts",
arXiv:2012.15589): a personal adapter next to the frozen global one, mixed by a gate.

A PFL-MoE client trains its copy of the global adapter and sends the update, as in FedAvg. Besides, it keeps a personal
copy of the adapter and a gate `g(x) = sigmoid(w . h(x) + b)`. Every round, with the round's global adapter frozen, it
trains the personal adapter for one epoch on 3/4 of its local training data, then the gate for one epoch on the other
1/4 (both adapters frozen). Its local model mixes the two on the logits: `g * f_global(x) + (1 - g) * f_personal(x)`.
The personal adapter and the gate never leave the client.

Both adapters live on one `PeftModel`: the federated adapter (the active one, `"default"`) and a personal adapter added
with `add_adapter` next to it; [`PFLMoEModel`] switches between them with `set_adapter`, so the base model is never
copied. `h(x)` is the mean of the input embeddings (`get_input_embeddings()`) over the non-padding tokens, detached;
for a causal LM (logits `(B, T, V)`) it is the mean over the tokens up to each position, so the mixture is itself a
causal LM and scores a candidate continuation from its prefix only.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch
import torch.nn.functional as F
from datasets import Dataset
from peft import PeftModel
from torch import nn
from transformers import Trainer, TrainingArguments
from transformers.trainer_callback import PrinterCallback
from transformers.utils import ModelOutput

from ..trainer.federated_state import get_federated_state, set_federated_state
from ..tuners.moe_lora import MoELoraModel

#: Name of the personal adapter next to the federated one.
PERSONAL_ADAPTER = "personal"
#: Share of a client's local training data the gate is trained on (the personal adapter gets the rest).
GATE_FRACTION = 0.25


@dataclass
class PersonalState:
    """What a PFL-MoE client keeps for itself: its personal adapter and its gate.

    Args:
        adapter (`dict[str, torch.Tensor]`): the personal adapter, keyed like the federated adapter's checkpoint
            (`adapter_model.safetensors` keys), so it loads into any adapter of the same config.
        gate (`dict[str, torch.Tensor]`): the [`PFLMoEGate`]'s state dict (`proj.weight` `(1, H)`, `proj.bias` `(1,)`).
    """

    adapter: dict[str, torch.Tensor]
    gate: dict[str, torch.Tensor]


def split_local_data(dataset: Dataset, seed: int = 0, gate_fraction: float = GATE_FRACTION) -> tuple[Dataset, Dataset]:
    """A client's training data split into `(personal, gate)` parts: `floor(gate_fraction * N)` examples train the gate
    and the others the personal adapter. The split depends on `seed` only: keep the seed fixed across rounds, so the
    gate is always fitted on data the personal adapter never saw."""
    num_rows = len(dataset)
    order = np.random.default_rng(seed).permutation(num_rows)
    num_gate = int(gate_fraction * num_rows)
    return dataset.select(sorted(order[num_gate:].tolist())), dataset.select(sorted(order[:num_gate].tolist()))


class PFLMoEGate(nn.Module):
    """The gate `g(x) = sigmoid(w . h(x) + b)`, in fp32, initialised to `w = 0, b = 0` (an even mixture).

    Args:
        hidden_size (`int`): the size of `h(x)` (the input embeddings').
    """

    def __init__(self, hidden_size: int):
        super().__init__()
        self.proj = nn.Linear(hidden_size, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        """`pooled` `(..., H)` -> gate values `(...)` in (0, 1)."""
        return torch.sigmoid(self.proj(pooled.float())).squeeze(-1)


@dataclass
class PFLMoEOutput(ModelOutput):
    """Output of [`PFLMoEModel`]: `logits` are the mixed ones (or the personal adapter's while it trains).

    Args:
        loss (`torch.FloatTensor`, *optional*): the task loss of `logits`, when `labels` were given.
        logits (`torch.FloatTensor`): `(B, C)` for a classifier, `(B, T, V)` for a causal LM.
        gate (`torch.FloatTensor`, *optional*): the gate values, `(B,)` or `(B, T)` (per position of a causal LM).
    """

    loss: Optional[torch.FloatTensor] = None
    logits: Optional[torch.FloatTensor] = None
    gate: Optional[torch.FloatTensor] = None


def logits_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The task loss of `logits`: next-token cross-entropy for `(B, T, V)` logits (labels `-100` ignored),
    cross-entropy for `(B, C)` logits and class ids, squared error for `(B, 1)` logits and float labels."""
    if logits.dim() == 3:
        shifted, targets = logits[:, :-1].float(), labels[:, 1:].to(logits.device)
        total = F.cross_entropy(shifted.reshape(-1, shifted.shape[-1]), targets.reshape(-1), reduction="sum")
        return total / (targets != -100).sum().clamp_min(1)
    labels = labels.to(logits.device)
    if logits.shape[-1] == 1 and labels.is_floating_point():
        return F.mse_loss(logits.squeeze(-1).float(), labels.float())
    return F.cross_entropy(logits.float(), labels.long())


class PFLMoEModel(nn.Module):
    """A client's PFL-MoE model on one `PeftModel`: its federated adapter (frozen), a personal adapter and a gate.

    Creating it adds the personal adapter to `peft_model` (`add_adapter`, without touching the global RNG) and loads
    `personal` into it and into a new [`PFLMoEGate`]; without `personal` the adapter starts as a copy of the federated
    adapter's current weights and the gate at 0.5. [`detach`] (or leaving a `with` block) deletes the personal adapter
    and makes the federated adapter active again, as trainable and in the train/eval mode it was; the federated adapter
    is never written. The mixture starts in the model's train/eval mode.

    `stage` says what `forward` computes:

    - `"mixture"` (default): `g * logits_global + (1 - g) * logits_personal`, both adapters frozen and in eval mode,
      only the gate trainable. Without a KV cache (a cache of the mixture would need both adapters' caches):
      `use_cache` is turned off, so the `category` task scores candidates with full passes.
    - `"personal"`: the personal adapter alone, trainable (its logits, for training it).

    Args:
        peft_model (`PeftModel`): the model; its active adapter is the federated one.
        personal ([`PersonalState`], *optional*): the client's personal adapter and gate.
        adapter_name (`str`): the name of the personal adapter.
    """

    accepts_loss_kwargs = False  # the loss is a per-batch mean: the Trainer scales it for gradient accumulation

    def __init__(self, peft_model: PeftModel, personal: Optional[PersonalState] = None, adapter_name: str = PERSONAL_ADAPTER):
        super().__init__()
        if not isinstance(peft_model, PeftModel):
            raise TypeError(f"PFL-MoE needs a PeftModel (its adapter is what is personalized), got {type(peft_model).__name__}.")
        if adapter_name in peft_model.peft_config:
            raise ValueError(f"The model already has an adapter named {adapter_name!r}.")
        self.peft_model = peft_model
        self.global_adapter = peft_model.active_adapter
        self.personal_adapter = adapter_name
        self._was_training = peft_model.training
        self._was_trainable = any(p.requires_grad for p in peft_model.parameters())
        peft_model.set_adapter(self.global_adapter)
        with torch.random.fork_rng(devices=[]):  # the new adapter's initialisation is overwritten right away
            peft_model.add_adapter(adapter_name, copy.deepcopy(peft_model.peft_config[self.global_adapter]))
        tuner = peft_model.base_model
        self._routing_context = tuner.routing_context if isinstance(tuner, MoELoraModel) else None
        self._tracking = self._routing_context.track_statistics if self._routing_context is not None else None
        try:
            adapter = personal.adapter if personal is not None else get_federated_state(peft_model)
            peft_model.set_adapter(adapter_name)
            set_federated_state(peft_model, adapter)
            embeddings = peft_model.get_input_embeddings()
            self.gate = PFLMoEGate(embeddings.weight.shape[-1]).to(embeddings.weight.device)
            if personal is not None:
                self.gate.load_state_dict(personal.gate)
        except Exception:
            self.detach()
            raise
        if self._routing_context is not None:  # PFL-MoE's passes are no local routing activity of the federated adapter
            self._routing_context.track_statistics = False
        self.training = self._was_training  # in the model's mode (the Trainer and the tasks switch it)
        self.set_stage("mixture")

    # -- lifecycle --------------------------------------------------------------------------------------------------

    def __enter__(self) -> PFLMoEModel:
        return self

    def __exit__(self, *exc_info) -> None:
        self.detach()

    def detach(self) -> None:
        """Delete the personal adapter; the federated adapter is active (and trainable, if it was). Idempotent."""
        model = self.peft_model
        if self.personal_adapter not in model.peft_config:
            return
        model.set_adapter(self.global_adapter, inference_mode=not self._was_trainable)
        model.delete_adapter(self.personal_adapter)
        model.train(self._was_training)
        if self._routing_context is not None:
            self._routing_context.track_statistics = self._tracking
            for layer in model.base_model.moe_layers().values():
                layer.router_losses.pop(self.personal_adapter, None)
                layer.routing_statistics.pop(self.personal_adapter, None)

    def set_stage(self, stage: str) -> None:
        """`"personal"`: only the personal adapter is trainable; `"mixture"`: only the gate is."""
        if stage == "personal":
            self.peft_model.set_adapter(self.personal_adapter)
        elif stage == "mixture":
            self.peft_model.set_adapter(self.global_adapter, inference_mode=True)
        else:
            raise ValueError(f"stage must be 'personal' or 'mixture', got {stage!r}.")
        self.gate.requires_grad_(stage == "mixture")
        self.stage = stage
        self.train(self.training)

    def train(self, mode: bool = True) -> PFLMoEModel:
        super().train(mode)
        if getattr(self, "stage", None) == "mixture":
            self.peft_model.eval()  # frozen adapters run as at inference (no dropout, no router jitter)
        return self

    def personal_state(self) -> PersonalState:
        """A CPU copy of the personal adapter (keyed like the federated adapter's checkpoint) and of the gate."""
        self.peft_model.set_adapter(self.personal_adapter)
        try:
            adapter = get_federated_state(self.peft_model)
        finally:
            self.set_stage(self.stage)
        return PersonalState(adapter, {k: v.detach().cpu().clone() for k, v in self.gate.state_dict().items()})

    # -- what the Trainer and the tasks call ------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return self.peft_model.device

    def get_input_embeddings(self) -> nn.Module:
        return self.peft_model.get_input_embeddings()

    def activation_checkpointing_enable(self, **kwargs: Any) -> None:
        self.peft_model.activation_checkpointing_enable(**kwargs)

    def gradient_checkpointing_enable(self, **kwargs: Any) -> None:
        self.peft_model.gradient_checkpointing_enable(**kwargs)

    def router_losses(self) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
        """The personal MoE-LoRA adapter's `(load_balancing, z)` losses of the last training forward, if any."""
        tuner = self.peft_model.base_model
        return tuner.router_losses(self.personal_adapter) if isinstance(tuner, MoELoraModel) else None

    def _pooled_input(self, input_ids, inputs_embeds, attention_mask, per_position: bool) -> torch.Tensor:
        embeds = inputs_embeds if inputs_embeds is not None else self.peft_model.get_input_embeddings()(input_ids)
        embeds = embeds.detach().float()
        mask = attention_mask if attention_mask is not None and attention_mask.dim() == 2 else None
        mask = torch.ones(embeds.shape[:2], device=embeds.device) if mask is None else mask.to(embeds.device).float()
        weighted, mask = embeds * mask[..., None], mask[..., None]
        if per_position:  # mean over the (non-padding) tokens up to each position
            return weighted.cumsum(1) / mask.cumsum(1).clamp_min(1)
        return weighted.sum(1) / mask.sum(1).clamp_min(1)

    def _adapter_logits(self, adapter_name: str, inputs: Mapping[str, Any]) -> torch.Tensor:
        self.peft_model.set_adapter(adapter_name, inference_mode=True)
        return self.peft_model(**inputs).logits

    def forward(
        self,
        input_ids: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        labels: Optional[torch.Tensor] = None,
        inputs_embeds: Optional[torch.Tensor] = None,
        **kwargs: Any,
    ) -> PFLMoEOutput:
        """The mixed logits (stage `"mixture"`) or the personal adapter's (stage `"personal"`); `loss` with `labels`.

        Takes the base model's inputs (`token_type_ids`, `position_ids`, `logits_to_keep`, ...) and passes them on.
        """
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "inputs_embeds": inputs_embeds, **kwargs}
        inputs = {k: v for k, v in inputs.items() if v is not None}
        gate = None
        if self.stage == "personal":
            logits = self.peft_model(**inputs).logits
        else:
            if any(inputs.get(k) is not None for k in ("past_key_values", "cache")):
                raise ValueError("PFLMoEModel runs without a KV cache: pass no past_key_values.")
            if "use_cache" in inputs or getattr(self.peft_model.config, "use_cache", None) is not None:
                inputs["use_cache"] = False
            with torch.no_grad():
                personal_logits = self._adapter_logits(self.personal_adapter, inputs)
                global_logits = self._adapter_logits(self.global_adapter, inputs)
                per_position = global_logits.dim() == 3
                pooled = self._pooled_input(input_ids, inputs_embeds, attention_mask, per_position)
            gate = self.gate(pooled)
            if per_position:  # with logits_to_keep, the logits cover the last positions only
                gate = gate[:, gate.shape[1] - global_logits.shape[1] :]
            weight = gate.reshape(*gate.shape, *([1] * (global_logits.dim() - gate.dim())))
            logits = weight * global_logits.float() + (1 - weight) * personal_logits.float()
        loss = logits_loss(logits, labels) if labels is not None else None
        return PFLMoEOutput(loss=loss, logits=logits, gate=gate)


class PFLMoETrainer(Trainer):
    """Trains the current stage of a [`PFLMoEModel`] with the usual `Trainer` loop.

    The loss is that of the model's output logits (personal or mixed, [`logits_loss`]); while the personal MoE-LoRA
    adapter trains, its router load-balancing and z-losses are added with the weights the federated client uses
    (`moe_lora_aux_loss_coef` / `moe_lora_z_loss_coef` of the arguments, else the adapter config's).
    """

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        outputs = model(**inputs)
        loss = outputs.loss
        mixture = self.accelerator.unwrap_model(model)
        if mixture.stage == "personal" and model.training:
            router_losses = mixture.router_losses()
            if router_losses is not None:
                config = mixture.peft_model.peft_config[mixture.personal_adapter]
                aux_coef = getattr(self.args, "moe_lora_aux_loss_coef", None)
                z_coef = getattr(self.args, "moe_lora_z_loss_coef", None)
                aux_coef = config.router_aux_loss_coef if aux_coef is None else aux_coef
                z_coef = config.router_z_loss_coef if z_coef is None else z_coef
                loss = loss + (aux_coef * router_losses[0] + z_coef * router_losses[1]).to(loss.dtype)
        return (loss, outputs) if return_outputs else loss


def _train_stage(mixture: PFLMoEModel, stage: str, dataset: Dataset, args: TrainingArguments, data_collator) -> float:
    mixture.set_stage(stage)
    trainer = PFLMoETrainer(model=mixture, args=args, train_dataset=dataset, data_collator=data_collator)
    trainer.remove_callback(PrinterCallback)
    try:
        return float(trainer.train().training_loss)
    finally:
        trainer.accelerator.free_memory()


def train_pfl_moe_client(
    model: PeftModel,
    train_dataset: Dataset,
    args: TrainingArguments,
    data_collator=None,
    personal: Optional[PersonalState] = None,
    split_seed: int = 0,
) -> tuple[PersonalState, dict[str, float]]:
    """One round of PFL-MoE's client side: personal adapter, then gate, with the federated adapter frozen.

    The federated adapter (the active adapter of `model`) must hold the round's global state; it is neither trained
    nor changed. The personal adapter starts from `personal` (the first time, from the global adapter) and trains for
    one epoch on the personal part of [`split_local_data`]; then the gate trains for one epoch on the gate part, on
    the loss of the mixed logits. Both use `args` (optimiser, learning rate, batch size, seed, ...), with one epoch,
    no saving and `remove_unused_columns=False` (the data are the task's features); gradient checkpointing is off for
    the gate, which needs no gradient through the model. The client's data loader, collator and processes are those
    of `args`, as for the federated training (DeepSpeed is not supported).

    Args:
        model (`PeftModel`): the client's model, its active adapter the federated one.
        train_dataset (`datasets.Dataset`): the client's tokenized training features.
        args (`TrainingArguments`): the client's training arguments.
        data_collator (*optional*): batches `train_dataset`'s features.
        personal ([`PersonalState`], *optional*): the personal adapter and gate kept from earlier rounds.
        split_seed (`int`): seed of [`split_local_data`]; keep it the same every round.

    Returns:
        `tuple[PersonalState, dict[str, float]]`: the new personal adapter and gate, and the stages' training losses
        (`personal_train_loss`, `gate_train_loss`; a stage without data is skipped and reports no loss).
    """
    if getattr(args, "deepspeed", None):
        raise NotImplementedError("PFL-MoE personalization does not support DeepSpeed; train with DDP or one process.")
    personal_data, gate_data = split_local_data(train_dataset, split_seed)
    common = {"num_train_epochs": 1, "max_steps": -1, "save_strategy": "no", "remove_unused_columns": False}
    no_checkpointing = {k: False for k in ("activation_checkpointing", "gradient_checkpointing") if hasattr(args, k)}
    metrics: dict[str, float] = {}
    tuner = model.base_model
    collect = tuner.routing_context.collect_router_losses if isinstance(tuner, MoELoraModel) else None
    with PFLMoEModel(model, personal) as mixture:
        if collect is not None:
            tuner.set_router_loss_collection(True)
        try:
            if len(personal_data):
                stage_args = dataclasses.replace(args, **common)
                metrics["personal_train_loss"] = _train_stage(mixture, "personal", personal_data, stage_args, data_collator)
            if len(gate_data):
                stage_args = dataclasses.replace(args, **common, **no_checkpointing)
                metrics["gate_train_loss"] = _train_stage(mixture, "mixture", gate_data, stage_args, data_collator)
        finally:
            if collect is not None:
                tuner.set_router_loss_collection(collect)
        mixture.set_stage("mixture")
        return mixture.personal_state(), metrics
