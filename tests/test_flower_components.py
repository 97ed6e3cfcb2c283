"""The tiny federation the Flower tests run (also what their SuperNodes load: `components` in the run config names
`tests.test_flower_components:tiny_components`), and checks of the Flower app's configuration and wire format."""

import json
from pathlib import Path

import pytest
import torch
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
    """`make_simulation`'s federation (with two clients: one Ray actor or SuperNode per core) as a Flower run config."""
    values = dict(
        num_server_rounds=2, aggregator=aggregator, num_clients=2, min_train_clients=2, min_available_clients=2,
        components="tests.test_flower_components:tiny_components", task="category", max_length=32, batch_size=4,
        learning_rate=5e-3, local_epochs=1.0, seed=42, training_args=json.dumps({"logging_steps": 1}), eval_batch_size=8,
        run_dir=str(run_dir), base_model_id="tiny-llama",
    )
    values.update(overrides)
    return FlowerRunConfig(**values)


def in_process(config):
    """The in-process `FederatedSimulation` of the Flower run `config` (its components, `make_simulation`'s arguments),
    writing to `config.run_dir`."""
    from fcmoe_hf import FederatedMoETrainingArguments
    from fcmoe_hf.simulation import FederatedSimulation, FederationArguments

    components = tiny_components(config)
    args = FederationArguments(
        aggregator=config.aggregator, num_rounds=config.num_server_rounds, max_length=config.max_length,
        eval_batch_size=config.eval_batch_size, base_model_id=config.base_model_id,
    )
    training_args = FederatedMoETrainingArguments(
        output_dir=config.run_dir, per_device_train_batch_size=config.batch_size, num_train_epochs=config.local_epochs,
        learning_rate=config.learning_rate, use_cpu=True, report_to=[], logging_steps=1,
    )
    return FederatedSimulation(components.model, components.tokenizer, components.splits, args, training_args)


def test_app_run_config_is_the_dataclass():
    import tomllib

    pyproject = tomllib.loads((ROOT / "recipes" / "flower" / "pyproject.toml").read_text())
    run_config = pyproject["tool"]["flwr"]["app"]["config"]
    assert set(run_config) == set(FlowerRunConfig().to_run_config())
    parsed = FlowerRunConfig.from_run_config(run_config)
    assert parsed.to_run_config() == run_config
    assert FlowerRunConfig.from_run_config({"aggregator": "flwr:fedadam"}).is_flower_strategy


@pytest.mark.parametrize(
    "run_config,message",
    [
        ({"num-rounds": 3}, "Unknown run config key.*num-rounds"),
        ({"num-server-rounds": "3"}, "'num-server-rounds' must be a int"),
        ({"aggregator": "flwr:krum"}, "flwr:fedavg"),
        ({"aggregator-config": "{bad"}, "aggregator-config is not valid JSON"),
        ({"transport-dtype": "float16"}, "transport-dtype"),
    ],
)
def test_run_config_errors_name_the_key(run_config, message):
    with pytest.raises(ValueError, match=message):
        FlowerRunConfig.from_run_config(run_config)


def test_bfloat16_transport_halves_the_upload_and_round_trips():
    pytest.importorskip("flwr")
    from fcmoe_hf.federated import ClientUpdate
    from fcmoe_hf.flower.records import content_to_update, record_nbytes, update_to_content

    g = torch.Generator().manual_seed(0)
    deltas = {"a.moe_lora_A": torch.randn(4, 16, 64, generator=g), "b.weight": torch.randn(32, 64, generator=g)}
    update = ClientUpdate("client_1", 7, deltas, activation_counts={"a": torch.tensor([3, 0, 5, 1])}, round=2,
                          metrics={"train_loss": 0.5})
    full, half = update_to_content(update, "float32"), update_to_content(update, "bfloat16")
    assert record_nbytes(half) < 0.6 * record_nbytes(full)
    back = content_to_update(half)
    assert (back.client_id, back.num_samples, back.round, back.metrics) == ("client_1", 7, 2, {"train_loss": 0.5})
    assert torch.equal(back.activation_counts["a"], torch.tensor([3, 0, 5, 1]))
    for key, value in deltas.items():
        assert back.deltas[key].dtype == torch.float32
        assert torch.equal(back.deltas[key], value.to(torch.bfloat16).float())
    assert all(torch.equal(content_to_update(full).deltas[k], v) for k, v in deltas.items())
