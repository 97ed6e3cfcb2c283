"""What the server asks of the clients reaches them, one personalization path (clipping included), checkpoints
without pickle, and per-client progress during a round."""

import json

import pytest
import torch
from peft import get_peft_model
from safetensors.torch import load_file

from fcmoe_hf import MoELoraConfig
from fcmoe_hf.federated import ClientConfig, ClientUpdate, build_aggregator, retained_start
from fcmoe_hf.simulation.progress import ClientProgress
from fcmoe_hf.trainer import FederatedMoETrainer, FederatedMoETrainingArguments, get_federated_state

from .conftest import build_model, pad_collator, tiny_llama_config, token_dataset
from .test_simulation import make_simulation


def test_aggregators_say_what_clients_need():
    assert build_aggregator("fedavg").configure_client(1) == ClientConfig()
    assert build_aggregator("fedprox", proximal_mu=0.3).configure_client(1) == ClientConfig(proximal_mu=0.3)
    assert build_aggregator("fcmoe").configure_client(1) == ClientConfig(retention_lambda=0.5)
    assert build_aggregator("fcmoe", use_retention=False).configure_client(1) == ClientConfig()
    config = build_aggregator("fcmoe", retention_mode="filtered", retention_lambda=0.2).configure_client(1)
    assert ClientConfig.from_dict(config.to_dict()) == config
    args = config.apply(FederatedMoETrainingArguments(output_dir="x", retention_lambda=0.9, proximal_mu=0.1))
    assert (args.retention_lambda, args.retention_mode, args.proximal_mu) == (0.2, "filtered", 0.0)
    with pytest.raises(ValueError, match="bogus"):
        ClientConfig.from_dict({"bogus": 1})


def test_fedprox_reaches_the_clients_and_differs_from_fedavg(tmp_path):
    fedprox = make_simulation(tmp_path, "prox", aggregator="fedprox", num_rounds=1, aggregator_config={"proximal_mu": 5.0})
    history = fedprox.run()
    assert history[-1]["proximal_loss_mean"] > 0
    update = ClientUpdate.load(fedprox._update_dir(1, "client_0"))
    assert update.metrics["last_proximal_loss"] > 0
    make_simulation(tmp_path, "avg", aggregator="fedavg", num_rounds=1).run()
    prox = load_file(tmp_path / "prox" / "global_adapter" / "adapter_model.safetensors")
    avg = load_file(tmp_path / "avg" / "global_adapter" / "adapter_model.safetensors")
    assert any(not torch.equal(prox[k], avg[k]) for k in avg)


def _tiny_peft(seed=0):
    torch.manual_seed(seed)
    return get_peft_model(build_model(tiny_llama_config()), MoELoraConfig(r=2, num_experts=3, top_k=1))


def test_one_personalization_path_agrees_with_server_clipping(tmp_path):
    model = _tiny_peft()
    global_state = get_federated_state(model)
    g = torch.Generator().manual_seed(0)
    updates = []
    for i in range(3):
        deltas = {k: torch.randn(v.shape, generator=g) * (0.5 + i) for k, v in global_state.items()}
        counts = {k.rsplit(".", 1)[0]: torch.tensor([4, 1, 2]) for k in deltas if k.endswith("moe_lora_A")}
        updates.append(ClientUpdate(f"c{i}", 8, deltas, activation_counts=counts))
    result = build_aggregator("fcmoe", clip_update_norm=1.0).aggregate(global_state, updates)
    assert all(0 < result.update_scales[f"c{i}"] < 1 for i in range(3))  # every update was clipped
    for update in updates:
        server = result.personalized_state(update.client_id)
        client = retained_start(result.global_state, update.deltas, lam=0.5, scale=result.update_scales[update.client_id])
        for key in server:
            torch.testing.assert_close(server[key], client[key], rtol=1e-6, atol=1e-7)
        # The trainer starts its next round from the same point.
        trainer = FederatedMoETrainer(
            model=model, args=FederatedMoETrainingArguments(output_dir=str(tmp_path / "t"), use_cpu=True, report_to=[]),
            train_dataset=token_dataset(4), data_collator=pad_collator,
        )
        start = trainer.start_round(result.global_state, update, residual_scale=result.update_scales[update.client_id])
        for key in server:
            torch.testing.assert_close(start[key], server[key], rtol=1e-6, atol=1e-7)
    # Without the scale the residual is the unclipped update's: the old disagreement.
    unscaled = retained_start(result.global_state, updates[2].deltas, lam=0.5)
    key = next(k for k in unscaled if k.endswith("moe_lora_A"))
    assert not torch.allclose(unscaled[key], result.personalized_state("c2")[key])


def test_simulation_records_update_scales_and_personalizes_with_them(tmp_path):
    simulation = make_simulation(tmp_path, "clip", num_rounds=1, aggregator_config={"clip_update_norm": 1e-3})
    simulation.run()
    state = json.loads((tmp_path / "clip" / "checkpoints" / "round_0001" / "state.json").read_text())
    assert set(state["update_scales"]) == set(simulation.client_ids)
    assert all(0 < s < 1 for s in state["update_scales"].values())
    global_state = load_file(tmp_path / "clip" / "global_adapter" / "adapter_model.safetensors")
    for client_id in simulation.client_ids:
        saved = load_file(tmp_path / "clip" / "clients" / client_id / "adapter" / "adapter_model.safetensors")
        previous = ClientUpdate.load(simulation._update_dir(1, client_id))
        expected = retained_start(global_state, previous.deltas, lam=0.5, scale=state["update_scales"][client_id])
        assert all(torch.equal(saved[k], expected[k]) for k in saved)


def test_checkpoints_hold_no_pickle_and_names_are_validated(tmp_path):
    simulation = make_simulation(tmp_path, "ckpt", aggregator="fedavg", num_rounds=1)
    simulation.run()
    checkpoint = tmp_path / "ckpt" / "checkpoints" / "round_0001"
    assert not list(checkpoint.glob("*.pt")) and (checkpoint / "rng_state.safetensors").exists()
    # A planted pickle is never read: resuming reads safetensors and JSON only.
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    torch.save({"payload": Payload()}, checkpoint / "rng_state.pt")
    resumed = make_simulation(tmp_path, "ckpt", aggregator="fedavg", num_rounds=1, resume=True)
    assert resumed._load_checkpoint()[0] == 1
    assert not marker.exists()
    # latest_checkpoint may not point outside the run's checkpoints.
    (tmp_path / "ckpt" / "latest_checkpoint").write_text("../../elsewhere")
    with pytest.raises(ValueError, match="latest_checkpoint"):
        make_simulation(tmp_path, "ckpt", aggregator="fedavg", num_rounds=1, resume=True)._load_checkpoint()


def test_client_progress_shows_each_clients_steps(tmp_path, capsys):
    model = _tiny_peft()
    progress = ClientProgress(round_index=2, num_clients=2)
    for client_id in ("client_0", "client_1"):
        trainer = FederatedMoETrainer(
            model=model,
            args=FederatedMoETrainingArguments(
                output_dir=str(tmp_path / client_id), use_cpu=True, report_to=[], per_device_train_batch_size=2,
                disable_tqdm=True, logging_steps=1, num_train_epochs=1,
            ),
            train_dataset=token_dataset(6), data_collator=pad_collator, callbacks=[progress.callback(client_id)],
        )
        trainer.train()
    err = capsys.readouterr().err
    assert "round 2 | client_0 (1/2)" in err and "round 2 | client_1 (2/2)" in err
    assert "/3 [" in err  # steps of three, shown as they happen
    assert progress.finished == [("client_0", 3, 3), ("client_1", 3, 3)] and progress.bar is None
