"""What a Flower run builds on every node: the model with its adapter, the tokenizer, the task and the partition.

The run config names a builder, `components = "module:function"`, called as `function(config)` with the
[`FlowerRunConfig`] and returning [`FederationComponents`]. The default, [`build_components`], is the recipe's: a
base model by alias or path, MoE-LoRA on top, the bundled fortunes corpus (or a dataset path / Hub id) partitioned
with flwr-datasets. Every node builds the same partition from the same seed and takes its own part (as Flower's
`FederatedDataset.load_partition` does); a client reads nothing but its partition, the server only the global test set.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Union

from peft import PeftModel
from transformers import PreTrainedTokenizerBase

from ..data import ClientSplits
from ..tasks import Task
from .config import FlowerRunConfig


@dataclass
class FederationComponents:
    """The pieces of a federation a node needs.

    Args:
        model (`PeftModel`): the base model with its (MoE-)LoRA adapter, initialised the same on every node.
        tokenizer (`PreTrainedTokenizerBase`): its tokenizer.
        task ([`~fcmoe_hf.tasks.Task`]): tokenization, collator and evaluation.
        splits ([`~fcmoe_hf.data.ClientSplits`]): the partition; client `i` uses `splits.clients[i]`, the server
            `splits.global_test` and `splits.config`.
    """

    model: PeftModel
    tokenizer: PreTrainedTokenizerBase
    task: Task
    splits: ClientSplits


ComponentsBuilder = Callable[[FlowerRunConfig], FederationComponents]


def resolve_builder(spec: Union[str, ComponentsBuilder]) -> ComponentsBuilder:
    """`spec` itself when callable, else the function a `"module:function"` string names."""
    if callable(spec):
        return spec
    module_name, _, attr = spec.partition(":")
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"components {spec!r} does not name an importable function: {err}") from err


def build_components(config: FlowerRunConfig) -> FederationComponents:
    """The recipe's components from the run config: `model`, `task`, `dataset`, the partition and the adapter."""
    from peft import get_peft_model
    from transformers import set_seed

    from ..data import PartitionConfig, load_bundled_fortunes, load_text_dataset, partition_dataset
    from ..tasks import build_task
    from ..tuners.moe_lora import MoELoraConfig

    if config.dataset == "fortunes":
        corpus = load_bundled_fortunes()
    else:
        corpus = load_text_dataset(config.dataset, text_column=config.text_column, label_column=config.label_column)
    partition = PartitionConfig(
        num_clients=config.num_clients, scheme=config.partition_scheme, alpha=config.alpha,
        classes_per_client=config.classes_per_client, min_partition_size=config.min_partition_size,
        local_test_fraction=config.local_test_fraction, partition_seed=config.partition_seed,
    )
    splits = partition_dataset(corpus, partition)
    task = build_task(config.task, label_column=splits.label_column, label_names=splits.label_names, max_length=config.max_length)
    # Seeded before the model is built: a new head and the adapter's initialisation are the same on every node.
    set_seed(config.seed)
    model, tokenizer = task.load_model(config.model)
    set_seed(config.seed)
    adapter = MoELoraConfig(
        task_type=task.task_type, r=config.moe_r, lora_alpha=config.moe_lora_alpha, num_experts=config.moe_num_experts,
        top_k=config.moe_top_k,
    )
    return FederationComponents(get_peft_model(model, adapter), tokenizer, task, splits)
