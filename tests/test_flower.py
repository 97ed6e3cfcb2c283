"""fcmoe_hf on Flower: a Flower simulation (clients as Ray actors) against the in-process federation."""


import pytest
import torch

pytest.importorskip("flwr")
pytest.importorskip("ray")

from safetensors.torch import load_file  # noqa: E402

from fcmoe_hf.flower import run_flower_simulation  # noqa: E402

from .test_flower_components import tiny_components, tiny_config  # noqa: E402
from .test_simulation import make_simulation  # noqa: E402


def global_adapter(run_dir):
    return load_file(run_dir / "global_adapter" / "adapter_model.safetensors")


@pytest.mark.parametrize("aggregator", ["fcmoe", "fedavg"])
def test_flower_simulation_matches_in_process_federation(tmp_path, aggregator):
    history = run_flower_simulation(tiny_config(tmp_path / "flower", aggregator), tiny_components, ray_init_args={"num_cpus": 2})
    make_simulation(tmp_path, "in_process", aggregator=aggregator, num_rounds=2).run()

    expected, got = global_adapter(tmp_path / "in_process"), global_adapter(tmp_path / "flower")
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, rtol=1e-4, atol=1e-5, msg=key)
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
            torch.testing.assert_close(flower[key], value, rtol=1e-4, atol=1e-5, msg=f"{client_id} {key}")
