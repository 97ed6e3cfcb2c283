"""fcmoe_hf on Flower: Flower simulations (clients as Ray actors) against the in-process federation, and the Hub push.

One process runs both simulations, FC-MoE then FedAvg, on one Ray instance (Flower shuts Ray down after every run;
starting it twice would double the cost of this test), with `HF_ENDPOINT` at the Hub-protocol server of
`tests/hub_server.py` (`huggingface_hub` fixes its endpoint at import, hence the separate process). The FC-MoE run
pushes: the server its global adapter with its model card, every client its own personalized adapter.
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

pytest.importorskip("flwr")
pytest.importorskip("ray")

from safetensors.torch import load_file  # noqa: E402

from .hub_server import HubServer  # noqa: E402
from .test_flower_components import in_process, tiny_config  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CLIENTS = ("client_0", "client_1")

FLOWER_RUNS = """
import sys
from pathlib import Path

import ray
import torch
from peft import PeftModel

import fcmoe_hf  # noqa: F401  (registers the MoE-LoRA tuner with peft)
from fcmoe_hf.flower import run_flower_simulation
from tests.conftest import build_model, tiny_llama_config
from tests.test_flower_components import tiny_components, tiny_config

tmp = Path(sys.argv[1])
ray.init(num_cpus=2, include_dashboard=False)
shutdown, ray.shutdown = ray.shutdown, lambda *args, **kwargs: None  # one Ray for both runs
try:
    run_flower_simulation(tiny_config(tmp / "flower_fcmoe", "fcmoe", push_to_hub=True, hub_model_id="alice/flower"), tiny_components)
    run_flower_simulation(tiny_config(tmp / "flower_fedavg", "fedavg"), tiny_components)
finally:
    shutdown()

# What was pushed loads with plain peft from the Hub, equal to what the run wrote locally.
ids = torch.tensor([[5, 9, 17, 33, 8, 40]])
def logits(source, **kwargs):
    with torch.no_grad():
        return PeftModel.from_pretrained(build_model(tiny_llama_config(), seed=0), source, **kwargs)(input_ids=ids).logits
run = tmp / "flower_fcmoe"
assert torch.equal(logits("alice/flower"), logits(str(run / "global_adapter")))
for client_id in ("client_0", "client_1"):
    local = logits(str(run / "clients" / client_id / "adapter"))
    assert torch.equal(logits("alice/flower-clients", subfolder=client_id), local), client_id
print("hub ok")
"""


def global_adapter(run_dir):
    return load_file(run_dir / "global_adapter" / "adapter_model.safetensors")


def assert_same_adapters(got_dir, expected_dir):
    expected, got = global_adapter(expected_dir), global_adapter(got_dir)
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, rtol=1e-4, atol=1e-5, msg=key)
    # The personalized adapters, written by the clients themselves.
    for client_id in CLIENTS:
        flower = load_file(got_dir / "clients" / client_id / "adapter" / "adapter_model.safetensors")
        in_process = load_file(expected_dir / "clients" / client_id / "adapter" / "adapter_model.safetensors")
        for key, value in in_process.items():
            torch.testing.assert_close(flower[key], value, rtol=1e-4, atol=1e-5, msg=f"{client_id} {key}")


@pytest.fixture
def hub(tmp_path):
    server = HubServer(tmp_path / "hub", {"tok-alice": "alice"}).start()
    yield server
    server.stop()


def test_flower_simulations_match_in_process_federations_and_push_to_the_hub(tmp_path, hub):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING"))}
    env.update(HF_ENDPOINT=hub.url, HF_HUB_OFFLINE="0", HF_HUB_DISABLE_TELEMETRY="1", HF_TOKEN="tok-alice",
               HF_HOME=str(tmp_path / "hf_home"), PYTHONPATH=str(ROOT), TOKENIZERS_PARALLELISM="false")
    flower = subprocess.Popen([sys.executable, "-c", textwrap.dedent(FLOWER_RUNS), str(tmp_path)], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:  # the in-process references meanwhile (Flower's serial phases leave a core idle)
        for aggregator in ("fcmoe", "fedavg"):
            in_process(tiny_config(tmp_path / f"in_process_{aggregator}", aggregator)).run()
        stdout, stderr = flower.communicate(timeout=900)
    finally:
        flower.kill()
    assert flower.returncode == 0 and "hub ok" in stdout, stdout[-3000:] + stderr[-6000:]

    for aggregator in ("fcmoe", "fedavg"):
        assert_same_adapters(tmp_path / f"flower_{aggregator}", tmp_path / f"in_process_{aggregator}")
        # The same outputs as the in-process run: metrics per round (with bytes on the wire), plots.
        history = [json.loads(line) for line in (tmp_path / f"flower_{aggregator}" / "metrics.jsonl").read_text().splitlines()]
        assert [h["round"] for h in history] == [1, 2]
        final = history[-1]
        assert final["server_num_clients"] == 2 and final["failed_clients"] == [] and final["rejected"] == []
        assert final["bytes_uploaded_per_client_mean"] > 0 and final["bytes_downloaded_per_client"] > 0
        for key in ("global_accuracy", "local_accuracy_mean", "client_0/local_accuracy", "train_loss_mean"):
            assert key in final, key
        assert (tmp_path / f"flower_{aggregator}" / "plots" / "metrics.png").stat().st_size > 0

    # The server pushed the global adapter with its model card (public); each client its own adapter (private).
    assert not hub.repos["alice/flower"]["private"] and hub.repos["alice/flower-clients"]["private"]
    files = set(hub.tree("alice/flower", "main"))
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md"} <= files
    card = hub.blob(hub.tree("alice/flower", "main")["README.md"]).decode()
    assert "fcmoe" in card and "Communicated:" in card
    client_files = set(hub.tree("alice/flower-clients", "main"))
    assert {f"{c}/adapter_model.safetensors" for c in CLIENTS} <= client_files
    assert not any(part in f for f in files | client_files for part in ("checkpoint", "flower_state", "updates"))
