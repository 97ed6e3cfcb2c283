"""A real Flower deployment on 127.0.0.1: a SuperLink and two SuperNodes started here (insecure, no runtime dependency
installation) and `flwr run recipes/flower` against them, twice: a ServerApp that stops after round 1, resumed to the
same round-2 global state as the in-process run; its round 3 survives a SuperNode killed in the middle of it. A third
run (SuperNode 1 restarted, then killed in the middle of round 4, with `min_clients=2`) fails clearly, naming the node,
and loses nothing: round 3's checkpoint and outputs stay, and no ServerApp process or run-directory lock is left.

What needs no deployment is tested at unit level (tests/test_flower_strategy.py): spoofed replies; the run-directory
lock; the resume check; the failure message's details.
"""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

pytest.importorskip("flwr")
from safetensors.torch import load_file  # noqa: E402

from .test_flower_components import in_process, tiny_config  # noqa: E402

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
            self.start_node(i)

    def start_node(self, i: int, log_name=None):
        """Start (or restart) SuperNode `i` (`partition-id=i`), logging to `<log_name or supernode<i>>.log`."""
        self.nodes[i] = self._start(log_name or f"supernode{i}", [
            BIN / "flower-supernode", "--insecure", "--superlink", f"127.0.0.1:{self.port}", "--port", str(_free_port()),
            "--node-config", f"partition-id={i}",
        ])

    def serverapps(self) -> list[int]:
        """The pids of the ServerApp processes this SuperLink started that still run."""
        pids = []
        for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
            try:
                args = cmdline.read_bytes().split(b"\0")
            except OSError:
                continue
            if any(a.endswith(b"flwr-serverapp") for a in args) and f"127.0.0.1:{self.port}".encode() in args:
                pids.append(int(cmdline.parent.name))
        return pids

    def _start(self, name, command):
        log = open(self.home / f"{name}.log", "w")
        return subprocess.Popen([str(c) for c in command], env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    @staticmethod
    def kill(process):
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=30)

    def run(self, run_dir: Path, timeout=400, **overrides) -> subprocess.CompletedProcess:
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


def _rounds(run_dir):
    return [json.loads(line)["round"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _run_killing(federation, run_dir, node, arrived, **overrides):
    """Start the run, kill SuperNode `node` as soon as `arrived()` (its training message arrived), wait for the run."""
    result = {}
    thread = threading.Thread(target=lambda: result.update(done=federation.run(run_dir, **overrides)))
    thread.start()
    deadline = time.monotonic() + 400
    while time.monotonic() < deadline and thread.is_alive():
        if arrived():
            federation.kill(federation.nodes[node])
            break
        time.sleep(0.02)
    thread.join(timeout=400)
    return result["done"]


def _memory(run_dir, client_id="client_1"):
    # Written by the client's ClientApp when a training message arrives (it settles its previous update first).
    return run_dir / "clients" / client_id / "flower_state" / "memory.json"


def _last_round(path):
    try:
        return json.loads(path.read_text() or "{}").get("last-round")
    except (OSError, ValueError):
        return None


def test_deployment_resumes_a_stopped_server_and_survives_a_killed_node(tmp_path):
    federation = Federation(tmp_path / "flwr_home", num_nodes=2)
    try:
        _resume_then_kill(federation, tmp_path)
    finally:
        federation.close()


def _resume_then_kill(federation, tmp_path):
    run_dir = tmp_path / "run"
    # The uninterrupted run, in process (equal to a Flower one: tests/test_flower.py), while the first run starts.
    pool = ThreadPoolExecutor(1)
    reference = pool.submit(lambda: in_process(tiny_config(tmp_path / "reference", "fcmoe")).run())
    pool.shutdown(wait=False)
    common = {"eval-every": 10, "round-timeout": 120.0}
    first = federation.run(run_dir, **common, **{"num-server-rounds": 1})
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert (run_dir / "latest_checkpoint").read_text() == "round_0001"
    # A round with a dead node waits for round-timeout: long enough for the live node (round 3 trains one node; round 1
    # trained and evaluated two), short enough for a test, scaled to this machine's speed.
    round_1 = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[0])["round_wall_seconds"]
    common["round-timeout"] = float(min(40.0, max(15.0, 0.75 * round_1)))

    # Resumed: round 2 continues from round 1's checkpoint and the clients' state on their nodes; in round 3
    # SuperNode 1 is killed: the round completes with the other client (min_clients=1), the failure logged.
    # Rounds 2 and 3 are not evaluated: client 1 settles its round-2 update (last-round 2) only when round 3's training
    # message arrives.
    done = _run_killing(federation, run_dir, 1, lambda: _last_round(_memory(run_dir)) == 2,
                        **common, **{"num-server-rounds": 3, "resume": True, "min-available-clients": 1})
    assert done.returncode == 0 and "Round 3 failed" not in done.stdout + done.stderr, done.stdout[-3000:] + done.stderr[-3000:]
    assert _rounds(run_dir) == [1, 2, 3]
    history = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert history[1]["server_num_clients"] == 2 and history[1]["failed_clients"] == []
    final = history[-1]
    assert final["server_num_clients"] == 1 and len(final["failed_clients"]) == 1
    assert "no reply within the round timeout" in final["failed_clients"][0]["reason"]
    assert final["bytes_uploaded_per_client_mean"] > 0 and "client_0/local_accuracy" in final and "global_accuracy" in final
    assert "client_1/local_accuracy" not in final  # a node that failed the round is not asked to evaluate
    assert (run_dir / "latest_checkpoint").read_text() == "round_0003"
    assert (run_dir / "plots" / "metrics.png").is_file() and (run_dir / "outputs.json").is_file()
    assert (run_dir / "global_adapter" / "adapter_model.safetensors").is_file()
    for client_id in ("client_0", "client_1"):  # written by each SuperNode's ClientApp, not by the server
        assert (run_dir / "clients" / client_id / "adapter" / "adapter_model.safetensors").is_file()

    # Round 2 of the stopped-and-resumed run is round 2 of the uninterrupted one.
    reference.result()
    expected = load_file(tmp_path / "reference" / "checkpoints" / "round_0002" / "global_state.safetensors")
    got = load_file(run_dir / "checkpoints" / "round_0002" / "global_state.safetensors")
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, rtol=1e-4, atol=1e-5, msg=key)

    # Resumed for round 4 with min_clients=2: SuperNode 1 restarted (its client state is on disk), then killed when its
    # round-4 training message arrives: one update for min_clients=2, so the round fails, naming the node, and nothing
    # of round 3 is lost.
    kept = {name: (run_dir / name).read_bytes() for name in ("metrics.jsonl", "outputs.json", "latest_checkpoint")}
    memory = _memory(run_dir)
    written = memory.stat().st_mtime_ns
    federation.start_node(1, "supernode1_restarted")
    restarted_log, deadline = federation.home / "supernode1_restarted.log", time.monotonic() + 90
    while not re.search(r"SuperNode ID: (\d+)", restarted_log.read_text()):  # registered: round 4 samples it
        assert time.monotonic() < deadline and federation.nodes[1].poll() is None, restarted_log.read_text()[-2000:]
        time.sleep(0.2)
    node_id = re.search(r"SuperNode ID: (\d+)", restarted_log.read_text()).group(1)
    failed = _run_killing(
        federation, run_dir, 1, lambda: memory.stat().st_mtime_ns != written,
        **common, **{"num-server-rounds": 4, "resume": True, "aggregator-config": json.dumps({"min_clients": 2}),
                     "resume-allow-config-change": True},
    )
    log = failed.stdout + failed.stderr  # `flwr run --stream` exits 0 when the ServerApp fails: its log says so
    assert re.search(rf"Round 4 failed: 1 client update\(s\) arrived, .*node {node_id}: no reply within the round timeout"
                     r".*min_clients=2", log), log[-3000:]
    assert {name: (run_dir / name).read_bytes() for name in kept} == kept  # no half round 4, round 3 still the latest
    assert not (run_dir / "checkpoints" / "round_0004").exists()
    assert (run_dir / "checkpoints" / "round_0003" / "global_state.safetensors").is_file()
    assert not (run_dir / "run.lock").exists()  # released by the failed ServerApp
    deadline = time.monotonic() + 30
    while federation.serverapps() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert federation.serverapps() == []
