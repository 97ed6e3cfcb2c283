"""One client's round under DDP and DeepSpeed gives the same update as a single process (CPU, gloo).

Each run is a subprocess of tests/scripts/train_client.py (tiny Llama + MoE-LoRA, SGD, sequential sampler): with a
global batch of 4, one process sees samples 0-3 per step and two DDP ranks see 0,2 and 1,3, so the updates must agree.
"""

import json
import os
import socket
import subprocess
import sys

import pytest
import torch

from fcmoe_hf.federated import ClientUpdate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "tests", "scripts", "train_client.py")
pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(cmd, output_dir):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(os.path.join(output_dir, "world.json")) as f:
        world = json.load(f)
    return ClientUpdate.load(output_dir, lazy=False), world


def _accelerate(*launch_args):
    return [sys.executable, "-m", "accelerate.commands.launch", "--main_process_port", str(_free_port()), *launch_args]


@pytest.fixture(scope="module")
def single_process(tmp_path_factory):
    out = tmp_path_factory.mktemp("single")
    return _run([sys.executable, SCRIPT, str(out), "--per-device-batch", "4"], out)


def _assert_same_update(update, reference, atol):
    assert update.client_id == reference.client_id and update.num_samples == reference.num_samples
    assert set(update.deltas) == set(reference.deltas)
    for key, delta in reference.deltas.items():
        torch.testing.assert_close(update.deltas[key], delta, atol=atol, rtol=1e-3)
    for group, counts in reference.activation_counts.items():
        assert torch.equal(update.activation_counts[group], counts), group


def test_ddp_two_processes_matches_single_process(single_process, tmp_path):
    reference, world = single_process
    assert world["world_size"] == 1
    update, world = _run(
        _accelerate("--multi_gpu", "--num_processes", "2", SCRIPT, str(tmp_path), "--per-device-batch", "2"), tmp_path
    )
    # without use_cpu=True this would be two lone processes, each training on everything
    assert world == {"world_size": 2, "wrapped": "DistributedDataParallel"}
    # per-rank load-balancing losses are averaged over ranks instead of computed on the global batch: tiny difference
    _assert_same_update(update, reference, atol=1e-5)


def test_deepspeed_zero2_one_process_matches_single_process(single_process, tmp_path):
    reference, _ = single_process
    update, world = _run(
        _accelerate("--config_file", "recipes/accelerate/deepspeed_zero2.yaml", "--num_processes", "1", SCRIPT,
                    str(tmp_path), "--per-device-batch", "4"),
        tmp_path,
    )
    assert world == {"world_size": 1, "wrapped": "DeepSpeedEngine"}
    _assert_same_update(update, reference, atol=1e-6)


def test_deepspeed_zero3_two_processes_gathers_sharded_update(single_process, tmp_path):
    reference, _ = single_process
    update, world = _run(
        _accelerate("--config_file", "recipes/accelerate/deepspeed_zero3.yaml", "--num_processes", "2", SCRIPT,
                    str(tmp_path), "--per-device-batch", "2"),
        tmp_path,
    )
    assert world == {"world_size": 2, "wrapped": "DeepSpeedEngine"}
    _assert_same_update(update, reference, atol=1e-5)
