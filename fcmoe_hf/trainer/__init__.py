from .arguments import FederatedClientArguments, FederatedMoETrainingArguments
from .base_experts import base_expert_groups, count_routed_tokens, freeze_all_but_base_experts
from .federated_state import federated_parameters, get_federated_state, set_federated_state
from .trainer import FederatedMoEMixin, FederatedMoETrainer

__all__ = [
    "FederatedClientArguments",
    "FederatedMoEMixin",
    "FederatedMoETrainer",
    "FederatedMoETrainingArguments",
    "base_expert_groups",
    "count_routed_tokens",
    "federated_parameters",
    "freeze_all_but_base_experts",
    "get_federated_state",
    "set_federated_state",
]
