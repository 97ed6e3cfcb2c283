"""Saving global and per-client adapters in PEFT format, with model cards rendered from `model_cards/` templates.

An adapter directory written here is an ordinary peft adapter (`adapter_config.json` + `adapter_model.safetensors` +
`README.md`): `PeftModel.from_pretrained(base, directory)` loads it once `fcmoe_hf` is imported.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, Optional

import torch
from huggingface_hub import EvalResult, ModelCard, ModelCardData
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


#: The adapters' license in their cards unless told otherwise (the library's own).
DEFAULT_LICENSE = "apache-2.0"
_PIPELINES = {"CAUSAL_LM": "text-generation", "SEQ_CLS": "text-classification"}


def render_model_card(
    kind: Literal["global", "client"],
    base_model: Optional[str],
    metrics: Mapping[str, Any],
    *,
    task_type: Optional[str] = "CAUSAL_LM",
    dataset: Optional[str] = None,
    license: Optional[str] = DEFAULT_LICENSE,
    **fields: Any,
) -> ModelCard:
    """A `huggingface_hub.ModelCard` from the `kind` template; `fields` fill the template's placeholders.

    The metadata is what the Hub reads: `library_name: peft`, `base_model`, tags, `datasets`, `license`, the pipeline,
    and a `model-index` with `metrics` (finite numbers) as the evaluation results of `fields["final_round"]`.
    """
    pipeline = _PIPELINES.get(task_type or "CAUSAL_LM", "text-generation")
    model_name = fields.get("model_name")
    results = [
        EvalResult(
            task_type=pipeline, dataset_type=dataset or "federated-clients", dataset_name=dataset or "federated clients",
            dataset_split="client local tests" if kind == "client" else "global test", metric_type=name,
            metric_name=name, metric_value=float(value),
        )
        for name, value in metrics.items()
        if isinstance(value, (int, float)) and math.isfinite(value)
    ]
    card_data = ModelCardData(
        library_name="peft", base_model=base_model, tags=CARD_TAGS + [f"fcmoe-{kind}-adapter"], pipeline_tag=pipeline,
        datasets=[dataset] if dataset else None, license=license, model_name=model_name if results else None,
        eval_results=results or None,
    )
    shown = {k: (f"{v:.4f}" if isinstance(v, float) else v) for k, v in metrics.items()}
    return ModelCard.from_template(
        card_data, template_path=str(model_card_template(kind)), base_model=base_model, metrics=shown, **fields
    )


def hub_cards(record: Mapping[str, Any], repo_id: str, clients_repo_id: Optional[str], endpoint: str) -> dict[str, bytes]:
    """The model cards of an `outputs.json` record as published (path in repo -> bytes): how-to-load snippets with the
    repo ids (and client subfolders), links between the global card and the clients', the round's tag, the plots."""
    tag = f"round-{record['round']}"
    cards = {"README.md": render_card(
        record, "global", repo_id=repo_id, clients_repo_id=clients_repo_id, round_tag=tag, plots=True,
        clients_url=f"{endpoint}/{clients_repo_id}" if clients_repo_id else None,
    )}
    for client_id in record["cards"].get("clients", {}) if clients_repo_id else ():
        cards[f"{client_id}/README.md"] = render_card(
            record, client_id, repo_id=clients_repo_id, subfolder=client_id, global_repo_id=repo_id,
            global_url=f"{endpoint}/{repo_id}", round_tag=tag,
        )
    if clients_repo_id and record["cards"].get("clients"):
        cards["clients:README.md"] = clients_index_card(record, repo_id, clients_repo_id, endpoint)
    return {path: str(card).encode() for path, card in cards.items()}


def clients_index_card(record: Mapping[str, Any], repo_id: str, clients_repo_id: str, endpoint: str) -> ModelCard:
    """The card at the root of the clients' repository: what it holds, and how to load one client's adapter."""
    card_data = ModelCardData(library_name="peft", base_model=record["base_model"], license=DEFAULT_LICENSE,
                              tags=CARD_TAGS + ["fcmoe-client-adapters"])
    clients = record["cards"]["clients"]
    example = next(iter(clients))
    lines = [
        "---", card_data.to_yaml(), "---", "",
        f"# Personalized client adapters of [{repo_id}]({endpoint}/{repo_id})", "",
        f"Round {record['round']} (tag `round-{record['round']}`): one subfolder per client, each the global adapter plus "
        "that client's retained residual. A personalized adapter carries information about its client's data: keep "
        "this repository private.", "",
        *[f"- `{client_id}/`: {fields['num_train_samples']} training examples" for client_id, fields in clients.items()],
        "", "```python", "import fcmoe_hf  # registers the MoE-LoRA method with peft", "from peft import PeftModel",
        "from transformers import AutoModelForCausalLM", "",
        f'base = AutoModelForCausalLM.from_pretrained("{record["base_model"]}")',
        f'model = PeftModel.from_pretrained(base, "{clients_repo_id}", subfolder="{example}")', "```", "",
    ]
    return ModelCard("\n".join(lines))


def render_card(record: Mapping[str, Any], card: str, **overrides: Any) -> ModelCard:
    """The model card `card` (`"global"` or a client id) of an `outputs.json` record, with `overrides` (repo ids)."""
    fields = dict(record["cards"]["global"] if card == "global" else record["cards"]["clients"][card])
    fields.update(overrides)
    metrics = fields.pop("metrics")
    return render_model_card(
        "global" if card == "global" else "client", record["base_model"], metrics, task_type=record.get("task_type"),
        dataset=record.get("dataset"), **fields,
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
