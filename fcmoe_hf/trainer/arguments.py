"""Arguments of a federated client's local training, as dataclasses `HfArgumentParser` understands."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Literal, Optional, Union

from transformers import TrainingArguments
from transformers.trainer_utils import HubStrategy


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
    personalization: Literal["none", "pfl_moe"] = field(
        default="none",
        metadata={
            "help": "Client-side personalization next to the federated adapter: 'none', or 'pfl_moe' (PFL-MoE, "
            "arXiv:2012.15589: a personal adapter and a gate that never leave the client)."
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
        if self.personalization not in ("none", "pfl_moe"):
            raise ValueError(f"personalization must be 'none' or 'pfl_moe', got {self.personalization!r}.")
        for name in ("moe_lora_aux_loss_coef", "moe_lora_z_loss_coef"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"{name} must be >= 0 or None, got {name}={value}.")


@dataclass
class FederatedMoETrainingArguments(FederatedClientArguments, TrainingArguments):
    """`TrainingArguments` plus [`FederatedClientArguments`], for [`FederatedMoETrainer`].

    Every `TrainingArguments` field keeps its meaning and default, except `hub_strategy`, whose default is `"end"`: a
    federation pushes its final round unless asked for every round (`"every_save"`). Client trainers never push.
    """

    hub_strategy: Union[HubStrategy, str] = field(
        default="end",
        metadata={
            "help": "When the federation pushes to the Hub (with push_to_hub): 'end' (default) the final round only; "
            "'every_save' (or 'checkpoint', 'all_checkpoints') every round."
        },
    )


def training_args_from_call(args: tuple, kwargs: dict):
    # Trainer.__init__(model=None, args=None, ...): the arguments may come by keyword or second position.
    return kwargs["args"] if "args" in kwargs else (args[1] if len(args) > 1 else None)


def to_federated_training_arguments(args: Optional[TrainingArguments]):
    """`args` as [`FederatedMoETrainingArguments`], the federated fields at their defaults.

    `None` gives the defaults (with `Trainer`'s default `output_dir`). A plain `TrainingArguments` is converted as
    TRL's trainers convert it into their configs (`to_dict()`, with the values `to_dict()` masks or serialises put
    back). Arguments that already have the federated fields, and `TrainingArguments` subclasses with fields of their
    own (which the conversion would drop), are returned unchanged.
    """
    if args is None:
        return FederatedMoETrainingArguments(output_dir="tmp_trainer")
    if isinstance(args, FederatedClientArguments) or not isinstance(args, TrainingArguments):
        return args
    dict_args = args.to_dict()
    known = {f.name for f in fields(FederatedMoETrainingArguments) if f.init}
    if not set(dict_args) <= known:
        return args
    for key in dict_args:
        if key.endswith("_token"):  # to_dict hides tokens (hub_token)
            dict_args[key] = getattr(args, key)
    if getattr(args, "parallelism_config", None) is not None:  # to_dict writes it as a JSON string
        dict_args["parallelism_config"] = args.parallelism_config
    return FederatedMoETrainingArguments(**dict_args)
