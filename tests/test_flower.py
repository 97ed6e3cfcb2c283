"""fcmoe_hf on Flower: a Flower simulation (clients as Ray actors) against the in-process federation.

`tiny_components` and `tiny_config` are also what the deployment tests' SuperNodes load (`components` in the run
config names `tests.test_flower:tiny_components`).
"""

import json

import pytest
import torch

pytest.importorskip("flwr")
pytest.importorskip("ray")

from peft import get_peft_model  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from fcmoe_hf import MoELoraConfig  # noqa: E402
from fcmoe_hf.data import PartitionConfig, partition_dataset  # noqa: E402
from fcmoe_hf.flower import FederationComponents, FlowerRunConfig, run_flower_simulation  # noqa: E402
from fcmoe_hf.tasks import build_task  # noqa: E402

from .conftest import build_model, tiny_llama_config, tiny_tokenizer  # noqa: E402
from .test_simulation import make_simulation, tiny_corpus  # noqa: E402


def tiny_components(config: FlowerRunConfig) -> FederationComponents:
    """The in-process test federation's model, task and partition (tests/test_simulation.py `make_simulation`)."""
    splits = partition_dataset(
        tiny_corpus(), PartitionConfig(num_clients=config.num_clients, alpha=0.5, min_partition_size=4, partition_seed=0)
    )
    tokenizer = tiny_tokenizer()
    task = build_task(config.task, tokenizer, label_column=splits.label_column, label_names=splits.label_names, max_length=config.max_length)
    model = get_peft_model(build_model(tiny_llama_config(), seed=0), MoELoraConfig(r=4, num_experts=4, top_k=2))
    return FederationComponents(model, tokenizer, task, splits)


def tiny_config(run_dir, aggregator="fcmoe", **overrides) -> FlowerRunConfig:
    """`make_simulation`'s federation as a Flower run config."""
    values = dict(
        num_server_rounds=2, aggregator=aggregator, num_clients=3, min_train_clients=3, min_available_clients=3,
        components="tests.test_flower:tiny_components", task="category", max_length=32, batch_size=4,
        learning_rate=5e-3, local_epochs=1.0, seed=42, training_args=json.dumps({"logging_steps": 1}), eval_batch_size=8,
        run_dir=str(run_dir), base_model_id="tiny-llama",
    )
    values.update(overrides)
    return FlowerRunConfig(**values)


def global_adapter(run_dir):
    return load_file(run_dir / "global_adapter" / "adapter_model.safetensors")


@pytest.mark.parametrize("aggregator", ["fcmoe", "fedavg"])
def test_flower_simulation_matches_in_process_federation(tmp_path, aggregator):
    history = run_flower_simulation(tiny_config(tmp_path / "flower", aggregator), tiny_components, ray_init_args={"num_cpus": 2})
    make_simulation(tmp_path, "in_process", aggregator=aggregator, num_rounds=2).run()

    expected, got = global_adapter(tmp_path / "in_process"), global_adapter(tmp_path / "flower")
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, rtol=1e-4, atol=1e-6, msg=key)
    # The same outputs as the in-process run: metrics per round (with bytes on the wire), plots, personalized adapters
    # written by the clients themselves.
    assert [h["round"] for h in history] == [1, 2]
    assert history[-1]["server_num_clients"] == 3 and history[-1]["failed_clients"] == []
    assert history[-1]["bytes_uploaded_per_client_mean"] > 0 and history[-1]["bytes_downloaded_per_client"] > 0
    for key in ("global_accuracy", "local_accuracy_mean", "client_0/local_accuracy", "train_loss_mean"):
        assert key in history[-1], key
    assert (tmp_path / "flower" / "plots" / "metrics.png").stat().st_size > 0
    for client_id in ("client_0", "client_1", "client_2"):
        flower = load_file(tmp_path / "flower" / "clients" / client_id / "adapter" / "adapter_model.safetensors")
        in_process = load_file(tmp_path / "in_process" / "clients" / client_id / "adapter" / "adapter_model.safetensors")
        for key, value in in_process.items():
            torch.testing.assert_close(flower[key], value, rtol=1e-4, atol=1e-6, msg=f"{client_id} {key}")
