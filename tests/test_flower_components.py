"""The tiny federation the Flower tests run (also what their SuperNodes load: `components` in the run config names
`tests.test_flower_components:tiny_components`), and checks of the Flower app's configuration and wire format."""

import json
from pathlib import Path

import pytest
from peft import get_peft_model

from fcmoe_hf import MoELoraConfig
from fcmoe_hf.data import PartitionConfig, partition_dataset
from fcmoe_hf.tasks import build_task

from .conftest import build_model, tiny_llama_config, tiny_tokenizer
from .test_simulation import tiny_corpus

flower = pytest.importorskip("fcmoe_hf.flower.config")
FlowerRunConfig = flower.FlowerRunConfig
ROOT = Path(__file__).resolve().parents[1]


def tiny_components(config):
    """The in-process test federation's model, task and partition (tests/test_simulation.py `make_simulation`)."""
    splits = partition_dataset(
        tiny_corpus(), PartitionConfig(num_clients=config.num_clients, alpha=0.5, min_partition_size=4, partition_seed=0)
    )
    tokenizer = tiny_tokenizer()
    task = build_task(config.task, tokenizer, label_column=splits.label_column, label_names=splits.label_names, max_length=config.max_length)
    model = get_peft_model(build_model(tiny_llama_config(), seed=0), MoELoraConfig(r=4, num_experts=4, top_k=2))
    from fcmoe_hf.flower import FederationComponents

    return FederationComponents(model, tokenizer, task, splits)


def tiny_config(run_dir, aggregator="fcmoe", **overrides):
    """`make_simulation`'s federation as a Flower run config."""
    values = dict(
        num_server_rounds=2, aggregator=aggregator, num_clients=3, min_train_clients=3, min_available_clients=3,
        components="tests.test_flower_components:tiny_components", task="category", max_length=32, batch_size=4,
        learning_rate=5e-3, local_epochs=1.0, seed=42, training_args=json.dumps({"logging_steps": 1}), eval_batch_size=8,
        run_dir=str(run_dir), base_model_id="tiny-llama",
    )
    values.update(overrides)
    return FlowerRunConfig(**values)
