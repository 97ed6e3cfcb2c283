"""Arguments of a federated client's local training, as dataclasses `HfArgumentParser` understands."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from transformers import TrainingArguments


@dataclass
class FederatedClientArguments:
    """What a client needs to know about the federation, on top of the usual training arguments.

    A mixin dataclass: [`FederatedMoETrainingArguments`] combines it with `TrainingArguments`; combine it the same
    way with another trainer's config (e.g. TRL's `SFTConfig`) to use [`FederatedMoEMixin`] with that trainer.
    """

    client_id: str = field(default="client_0", metadata={"help": "Identifier of this client in the federation."})
    federated_round: int = field(default=0, metadata={"help": "Index of the current federated round."})
    proximal_mu: float = field(
        default=0.0,
        metadata={"help": "FedProx proximal coefficient mu: adds mu/2 * ||theta - theta_round_start||^2. 0 disables."},
    )
    retention_lambda: float = field(
        default=0.5,
        metadata={
            "help": "Local knowledge retention: the round starts from Theta + lambda * R (FC-MoE Eq. 6). 0 disables."
        },
    )
    retention_mode: Literal["projection", "filtered"] = field(
        default="projection",
        metadata={
            "help": "Residual R: 'projection' = previous update projected onto the new global expert (Eq. 5, as "
            "printed); 'filtered' = the part of the previous update the server's projection removed."
        },
    )
    moe_lora_aux_loss_coef: Optional[float] = field(
        default=None,
        metadata={
            "help": "Weight of the MoE-LoRA routers' load-balancing loss. None: the MoELoraConfig's router_aux_loss_coef. "
            "(Distinct from a base MoE model's own router_aux_loss_coef, which the model adds to its loss itself.)"
        },
    )
    moe_lora_z_loss_coef: Optional[float] = field(
        default=None, metadata={"help": "Weight of the MoE-LoRA router z-loss. None: take it from the MoELoraConfig."}
    )
    count_base_expert_activations: bool = field(
        default=False,
        metadata={
            "help": "Count activations of an MoE base model's own experts from its router logits "
            "(output_router_logits), for clients that fine-tune the base's experts instead of MoE-LoRA."
        },
    )

    def __post_init__(self):
        if hasattr(super(), "__post_init__"):
            super().__post_init__()
        if self.proximal_mu < 0:
            raise ValueError(f"proximal_mu must be >= 0, got proximal_mu={self.proximal_mu}.")
        if self.retention_lambda < 0:
            raise ValueError(f"retention_lambda must be >= 0, got retention_lambda={self.retention_lambda}.")
        if self.retention_mode not in ("projection", "filtered"):
            raise ValueError(f"retention_mode must be 'projection' or 'filtered', got {self.retention_mode!r}.")
        for name in ("moe_lora_aux_loss_coef", "moe_lora_z_loss_coef"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"{name} must be >= 0 or None, got {name}={value}.")


@dataclass
class FederatedMoETrainingArguments(FederatedClientArguments, TrainingArguments):
    """`TrainingArguments` plus [`FederatedClientArguments`], for [`FederatedMoETrainer`].

    Every `TrainingArguments` field keeps its meaning and default.
    """
