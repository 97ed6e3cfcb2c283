"""Saving, publishing and loading federated MoE-LoRA adapters.

- [`save_adapter`], [`render_model_card`]: adapter directories in PEFT format with model cards from `model_cards/`;
- [`push_federated_adapters`]: a run's global adapter (tagged `round-<N>`) and its clients' personalized adapters
  (in a private `<repo_id>-clients` repository) to the Hugging Face Hub; `python -m fcmoe_hf.hub push RUN_DIR
  --repo-id user/name` from the command line;
- [`load_global_adapter`], [`load_client_adapter`]: published adapters back as `PeftModel`s.
"""

from .cards import CARD_TAGS, model_card_template, render_model_card, save_adapter
from .load import load_client_adapter, load_global_adapter
from .push import (
    HubPublisher,
    PushResult,
    check_hub_access,
    clients_repo_for,
    push_federated_adapters,
    round_tag,
)

__all__ = [
    "CARD_TAGS",
    "HubPublisher",
    "PushResult",
    "check_hub_access",
    "clients_repo_for",
    "load_client_adapter",
    "load_global_adapter",
    "model_card_template",
    "push_federated_adapters",
    "render_model_card",
    "round_tag",
    "save_adapter",
]
