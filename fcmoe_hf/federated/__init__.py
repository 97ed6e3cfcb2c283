"""Server-side federated math: pure functions over tensors, no Trainer, no I/O inside the math."""

from .updates import ClientUpdate, ExpertKey, LazySafetensors, expert_group_of, expert_norms, group_keys, parse_expert_key

__all__ = ["ClientUpdate", "ExpertKey", "LazySafetensors", "expert_group_of", "expert_norms", "group_keys", "parse_expert_key"]
