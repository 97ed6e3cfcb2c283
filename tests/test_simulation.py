import json

import pytest
import torch
from datasets import ClassLabel, Dataset, DatasetDict, Features, Value
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file

from fcmoe_hf import MoELoraConfig
from fcmoe_hf.data import PartitionConfig, partition_dataset
from fcmoe_hf.simulation import FederatedSimulation, FederationArguments
from fcmoe_hf.trainer import FederatedMoETrainingArguments, get_federated_state

from .conftest import WORDS, build_model, tiny_llama_config, tiny_tokenizer

CATEGORIES = ["w0", "w1", "w2", "w3"]


def tiny_corpus(per_class=12, seed=0):
    """Category k's texts mostly use words from its own block of the vocabulary: learnable, non-IID by label."""
    g = torch.Generator().manual_seed(seed)
    features = Features({"text": Value("string"), "category": ClassLabel(names=CATEGORIES)})

    def split(n):
        rows = {"text": [], "category": []}
        for label in range(len(CATEGORIES)):
            block = WORDS[4 + 12 * label : 4 + 12 * (label + 1)]
            for _ in range(n):
                idx = torch.randint(0, len(block), (6,), generator=g)
                rows["text"].append(" ".join(block[int(i)] for i in idx))
                rows["category"].append(label)
        return Dataset.from_dict(rows, features=features)

    return DatasetDict(train=split(per_class), test=split(3))


def make_simulation(
    tmp_path, run_name="run", aggregator="fcmoe", num_rounds=2, on_round_end=None, resume=False, aggregator_config=None
):
    splits = partition_dataset(tiny_corpus(), PartitionConfig(num_clients=3, alpha=0.5, min_partition_size=4, partition_seed=0))
    model = get_peft_model(build_model(tiny_llama_config(), seed=0), MoELoraConfig(r=4, num_experts=4, top_k=2))
    args = FederationArguments(
        aggregator=aggregator, aggregator_config=aggregator_config, num_rounds=num_rounds, max_length=32, eval_batch_size=8,
        resume=resume,
        base_model_id="tiny-llama",
    )
    training_args = FederatedMoETrainingArguments(
        output_dir=str(tmp_path / run_name), per_device_train_batch_size=4, num_train_epochs=1, learning_rate=5e-3,
        use_cpu=True, report_to=["tensorboard"], logging_steps=1,
    )
    return FederatedSimulation(model, tiny_tokenizer(), splits, args, training_args, on_round_end=on_round_end)


def test_federation_end_to_end_outputs(tmp_path):
    simulation = make_simulation(tmp_path)
    history = simulation.run()
    run = tmp_path / "run"
    assert [h["round"] for h in history] == [1, 2]
    final = history[-1]
    for key in ("global_accuracy", "global_f1", "local_accuracy_mean", "train_loss_mean", "conflict_share"):
        assert key in final
    assert 0.0 <= final["global_accuracy"] <= 1.0
    assert [json.loads(line)["round"] for line in open(run / "metrics.jsonl")] == [1, 2]
    assert (run / "plots" / "metrics.png").stat().st_size > 0
    assert (run / "plots" / "conflict_heatmap.png").stat().st_size > 0
    assert any((run / "tensorboard").iterdir())

    # the global adapter is a plain peft adapter holding the final global state
    global_state = get_federated_state(simulation.model)
    # is_trainable: a model loaded for inference has no trainable tensors, and the comparison would be empty.
    loaded = PeftModel.from_pretrained(build_model(tiny_llama_config(), seed=0), run / "global_adapter", is_trainable=True)
    loaded_state = get_federated_state(loaded)
    assert loaded_state.keys() == global_state.keys()
    for key, value in loaded_state.items():
        torch.testing.assert_close(value, global_state[key], rtol=0, atol=0)
    assert "fcmoe" in (run / "global_adapter" / "README.md").read_text()
    # one personalized adapter per client, equal to global + lambda * R (not the global itself)
    for client_id in simulation.client_ids:
        adapter = run / "clients" / client_id / "adapter"
        saved = load_file(adapter / "adapter_model.safetensors")
        expected = simulation.personalized_state(global_state, client_id)
        assert all(torch.equal(saved[k], expected[k]) for k in saved)
        assert client_id in (adapter / "README.md").read_text()
    expert_key = next(k for k in saved if k.endswith("moe_lora_A"))
    assert not torch.equal(saved[expert_key], global_state[expert_key])


class Killed(Exception):
    pass


def test_killed_run_resumes_to_the_same_global_adapter(tmp_path):
    uninterrupted = make_simulation(tmp_path, "full", num_rounds=3)
    uninterrupted.run()
    expected = load_file(tmp_path / "full" / "global_adapter" / "adapter_model.safetensors")

    def kill_after_round_2(round_index, metrics):
        if round_index == 2:
            raise Killed

    with pytest.raises(Killed):
        make_simulation(tmp_path, "killed", num_rounds=3, on_round_end=kill_after_round_2).run()
    assert (tmp_path / "killed" / "latest_checkpoint").read_text() == "round_0002"
    with pytest.raises(FileExistsError, match="--resume"):
        make_simulation(tmp_path, "killed", num_rounds=3).run()

    history = make_simulation(tmp_path, "killed", num_rounds=3, resume=True).run()
    assert [h["round"] for h in history] == [1, 2, 3]  # the rounds before the resume are restored from metrics.jsonl
    resumed = load_file(tmp_path / "killed" / "global_adapter" / "adapter_model.safetensors")
    assert set(resumed) == set(expected)
    for key, value in expected.items():
        assert torch.equal(resumed[key], value), key
    assert [json.loads(line)["round"] for line in open(tmp_path / "killed" / "metrics.jsonl")] == [1, 2, 3]


@pytest.mark.parametrize("aggregator", ["fedavg", "fedadam", "fedprox"])
def test_baseline_aggregators_run_by_name(tmp_path, aggregator):
    history = make_simulation(tmp_path, aggregator, aggregator=aggregator, num_rounds=1).run()
    assert history[-1]["server_num_clients"] == 3
    # no retention outside FC-MoE: personalized adapters are the global one
    saved = load_file(tmp_path / aggregator / "clients" / "client_0" / "adapter" / "adapter_model.safetensors")
    global_saved = load_file(tmp_path / aggregator / "global_adapter" / "adapter_model.safetensors")
    assert all(torch.equal(saved[k], global_saved[k]) for k in saved)
