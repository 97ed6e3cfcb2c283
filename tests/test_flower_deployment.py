"""A real Flower deployment on 127.0.0.1: a SuperLink and two SuperNodes started here (insecure, no runtime dependency
installation), `flwr run recipes/flower` against them; a SuperNode killed in the middle of round 2; a stopped ServerApp
resumed."""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("flwr")
from safetensors.torch import load_file  # noqa: E402

from .test_simulation import make_simulation  # noqa: E402

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Federation:
    """A SuperLink and SuperNodes, each in its own process group (so a kill takes its app processes along)."""

    def __init__(self, home: Path, num_nodes: int):
        self.home, self.port, self.nodes = home, _free_port(), {}
        self.env = {**os.environ, "FLWR_HOME": str(home), "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
        home.mkdir(parents=True, exist_ok=True)
        (home / "config.toml").write_text(
            f'[superlink]\ndefault = "test"\n[superlink.test]\naddress = "127.0.0.1:{self.port}"\ninsecure = true\n'
        )
        self.link = self._start("superlink", [BIN / "flower-superlink", "--insecure", "--disable-runtime-dependency-installation",
                                              "--port", str(self.port)])
        deadline = time.monotonic() + 90
        while True:  # the SuperLink serves its Control, Fleet and Runtime APIs on one port
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or self.link.poll() is not None:
                    self.close()
                    raise RuntimeError(f"The SuperLink did not start: {(home / 'superlink.log').read_text()[-2000:]}") from None
                time.sleep(0.2)
        for i in range(num_nodes):
            self.nodes[i] = self._start(f"supernode{i}", [
                BIN / "flower-supernode", "--insecure", "--superlink", f"127.0.0.1:{self.port}", "--port", str(_free_port()),
                "--node-config", f"partition-id={i}",
            ])

    def _start(self, name, command):
        log = open(self.home / f"{name}.log", "w")
        return subprocess.Popen([str(c) for c in command], env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    @staticmethod
    def kill(process):
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=30)

    def run(self, run_dir: Path, timeout=300, **overrides) -> subprocess.CompletedProcess:
        config = {
            "num-server-rounds": 2, "num-clients": 2, "min-train-clients": 2, "min-available-clients": 2,
            "components": "tests.test_flower_components:tiny_components", "max-length": 32, "batch-size": 4,
            "learning-rate": 0.005, "seed": 42, "eval-batch-size": 8, "training-args": json.dumps({"logging_steps": 1}),
            "run-dir": str(run_dir), "base-model-id": "tiny-llama", **overrides,
        }
        path = run_dir.parent / f"{run_dir.name}.toml"
        path.write_text("".join(f"{k} = {json.dumps(v)}\n" for k, v in config.items()))
        return subprocess.run(
            [str(BIN / "flwr"), "run", str(ROOT / "recipes" / "flower"), "test", "--run-config", str(path), "--stream"],
            env=self.env, capture_output=True, text=True, timeout=timeout,
        )

    def close(self):
        for process in [*self.nodes.values(), *([self.link] if hasattr(self, "link") else [])]:
            self.kill(process)


@pytest.fixture
def federation(tmp_path):
    federation = Federation(tmp_path / "flwr_home", num_nodes=2)
    yield federation
    federation.close()


def _rounds(run_dir):
    return [json.loads(line)["round"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _kill_in_round_2(federation, run_dir, **overrides):
    """Start the run, kill SuperNode 1 as soon as it starts training round 2, wait for the run to end."""
    memory = run_dir / "clients" / "client_1" / "flower_state" / "memory.json"
    result = {}
    thread = threading.Thread(target=lambda: result.update(done=federation.run(run_dir, **overrides)))
    thread.start()
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        # With eval-every=2 the client settles its round-1 update (last-round 1) only when round 2's message arrives.
        if memory.is_file() and json.loads(memory.read_text() or "{}").get("last-round") == 1:
            federation.kill(federation.nodes[1])
            break
        time.sleep(0.02)
    thread.join(timeout=300)
    return result["done"]


def test_deployment_round_completes_without_a_killed_node_when_min_clients_allows(federation, tmp_path):
    run_dir = tmp_path / "run"
    done = _kill_in_round_2(federation, run_dir, **{"eval-every": 2, "round-timeout": 60.0})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert _rounds(run_dir) == [1, 2]
    final = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    assert final["server_num_clients"] == 1 and len(final["failed_clients"]) == 1  # the failure is logged
    assert (run_dir / "global_adapter" / "adapter_model.safetensors").is_file()
    assert (run_dir / "checkpoints" / "round_0002").is_dir()


def test_deployment_round_fails_clearly_when_min_clients_does_not_allow(federation, tmp_path):
    run_dir = tmp_path / "run"
    done = _kill_in_round_2(federation, run_dir, **{"eval-every": 2, "round-timeout": 60.0, "aggregator-config": '{"min_clients": 2}'})
    # `flwr run --stream` exits 0 whatever the ServerApp did: the failure is in the streamed log.
    output = done.stdout + done.stderr
    assert "Round 2 failed" in output and "min_clients=2" in output and "no reply within the round timeout" in output
    assert _rounds(run_dir) == [1]  # round 1 kept, checkpointed: a resume continues from it
    assert (run_dir / "latest_checkpoint").read_text() == "round_0001"


def test_stopped_server_resumes_to_the_same_global_adapter(tmp_path):
    """Two `flwr run`s on one deployment: round 1, then `resume=true` to round 2; outputs as the in-process run's."""
    federation = Federation(tmp_path / "flwr_home", num_nodes=3)  # make_simulation's three clients
    try:
        _stop_and_resume(federation, tmp_path)
    finally:
        federation.close()


def _stop_and_resume(federation, tmp_path):
    run_dir = tmp_path / "run"
    three = {"num-clients": 3, "min-train-clients": 3, "min-available-clients": 3}
    first = federation.run(run_dir, **three, **{"num-server-rounds": 1})
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert (run_dir / "latest_checkpoint").read_text() == "round_0001"
    resumed = federation.run(run_dir, **three, **{"resume": True})
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert _rounds(run_dir) == [1, 2]
    final = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    assert final["server_num_clients"] == 3 and final["bytes_uploaded_per_client_mean"] > 0 and final["failed_clients"] == []
    assert {"client_0/local_accuracy", "client_2/local_accuracy", "global_accuracy"} <= set(final)
    assert (run_dir / "plots" / "metrics.png").is_file() and (run_dir / "outputs.json").is_file()
    for client_id in ("client_0", "client_1", "client_2"):  # written by each SuperNode's ClientApp, not by the server
        assert (run_dir / "clients" / client_id / "adapter" / "adapter_model.safetensors").is_file()
    # An uninterrupted run of the same federation, in process (equal to a Flower one: tests/test_flower.py).
    make_simulation(tmp_path, "reference", aggregator="fcmoe", num_rounds=2).run()
    expected = load_file(tmp_path / "reference" / "global_adapter" / "adapter_model.safetensors")
    got = load_file(run_dir / "global_adapter" / "adapter_model.safetensors")
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, rtol=1e-4, atol=1e-5, msg=key)
