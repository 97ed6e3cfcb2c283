"""Saving global and per-client adapters in PEFT format, with model cards rendered from `model_cards/` templates.

An adapter directory written here is an ordinary peft adapter (`adapter_config.json` + `adapter_model.safetensors` +
`README.md`): `PeftModel.from_pretrained(base, directory)` loads it once `fcmoe_hf` is imported.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, Optional

import torch
from huggingface_hub import ModelCard, ModelCardData
from peft import PeftConfig
from safetensors.torch import save_file

CARD_TAGS = ["fcmoe_hf", "peft", "moe-lora", "mixture-of-experts", "federated-learning"]


def model_card_template(kind: Literal["global", "client"]) -> Path:
    """Path of the `model_cards/<kind>.md` template (from a clone, or from the installed package's data files)."""
    for root in (Path(__file__).resolve().parents[2] / "model_cards", Path(sys.prefix) / "share" / "fcmoe_hf" / "model_cards"):
        path = root / f"{kind}.md"
        if path.is_file():
            return path
    raise FileNotFoundError(f"Model card template {kind}.md not found in model_cards/ (clone) or share/fcmoe_hf/model_cards.")


def render_model_card(
    kind: Literal["global", "client"], base_model: Optional[str], metrics: Mapping[str, Any], **fields: Any
) -> ModelCard:
    """A `huggingface_hub.ModelCard` from the `kind` template; `fields` fill the template's placeholders."""
    card_data = ModelCardData(
        library_name="peft", base_model=base_model, tags=CARD_TAGS + [f"fcmoe-{kind}-adapter"], pipeline_tag="text-generation"
    )
    shown = {k: (f"{v:.4f}" if isinstance(v, float) else v) for k, v in metrics.items()}
    return ModelCard.from_template(
        card_data, template_path=str(model_card_template(kind)), base_model=base_model, metrics=shown, **fields
    )


def save_adapter(
    directory: str | os.PathLike,
    state: Mapping[str, torch.Tensor],
    peft_config: PeftConfig,
    model_card: Optional[ModelCard] = None,
) -> Path:
    """Write `state` (keys as in `adapter_model.safetensors`) and `peft_config` as a peft adapter directory.

    Written without touching any model: the server never materialises a model to publish an adapter.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    save_file(tensors, str(directory / "adapter_model.safetensors"), metadata={"format": "pt"})
    peft_config.save_pretrained(str(directory))
    if model_card is not None:
        model_card.save(str(directory / "README.md"))
    return directory
