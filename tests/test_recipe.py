"""The recipe users run, end to end on a tiny model: one round with 2 clients under `accelerate launch` with two CPU
processes (DDP over gloo) and under the DeepSpeed ZeRO-2 config with one process, and its reproducibility for a seed."""

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

from fcmoe_hf.trainer import get_federated_state

from .conftest import build_model, tiny_llama_config, tiny_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_model")
    build_model(tiny_llama_config()).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_recipe(launch_args, model_dir, output_dir, *recipe_args):
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--main_process_port", str(_free_port()), *launch_args,
        "recipes/fcmoe_sft.py", "--config", "recipes/configs/demo.yaml",
        "--model_name_or_path", str(model_dir), "--output_dir", str(output_dir),
        "--num_rounds", "1", "--num_clients", "2", "--min_partition_size", "10", "--max_train_samples_per_client", "8",
        "--max_global_eval_samples", "8", "--max_local_eval_samples", "4", "--per_device_train_batch_size", "2",
        "--max_length", "48", "--report_to", "none", *recipe_args,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"Outputs in {os.path.abspath(output_dir)}" in proc.stdout
    with open(os.path.join(output_dir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    assert [r["round"] for r in records] == [1]
    model = PeftModel.from_pretrained(
        build_model(tiny_llama_config()), os.path.join(output_dir, "global_adapter"), is_trainable=True
    )
    assert get_federated_state(model)  # loaded for training, so the comparison below is not empty
    assert all(torch.isfinite(v).all() for v in get_federated_state(model).values())
    for client in ("client_0", "client_1"):
        assert os.path.exists(os.path.join(output_dir, "clients", client, "adapter", "adapter_model.safetensors"))
    return records[0]


def _global_adapter(output_dir) -> dict[str, torch.Tensor]:
    return load_file(os.path.join(output_dir, "global_adapter", "adapter_model.safetensors"))


def _assert_bit_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


DDP = ["--multi_gpu", "--num_processes", "2"]


@pytest.fixture(scope="module")
def ddp_run(tiny_model_dir, tmp_path_factory):
    """One two-process run, shared by the tests that need one (each launch costs tens of seconds)."""
    output_dir = tmp_path_factory.mktemp("ddp")
    return _run_recipe(DDP, tiny_model_dir, output_dir), output_dir


def test_recipe_under_accelerate_ddp_two_processes(ddp_run):
    metrics, _ = ddp_run
    assert metrics["num_processes"] == 2 and metrics["server_num_clients"] == 2
    assert "global_accuracy" in metrics and "local_accuracy_mean" in metrics


def test_recipe_under_deepspeed_zero2_one_process(tiny_model_dir, tmp_path):
    metrics = _run_recipe(
        ["--config_file", "recipes/accelerate/deepspeed_zero2.yaml", "--num_processes", "1"], tiny_model_dir,
        tmp_path / "zero2",
    )
    assert metrics["num_processes"] == 1 and metrics["server_num_clients"] == 2


def test_recipe_is_reproducible_for_a_seed(tiny_model_dir, tmp_path):
    """Same seed, same global adapter, bit for bit (adapter initialisation, partition and training are all seeded);
    another seed, another adapter."""
    single = ["--num_processes", "1"]
    runs = {}
    for name, seed in (("a", "7"), ("a_again", "7"), ("b", "8")):
        _run_recipe(single, tiny_model_dir, tmp_path / name, "--seed", seed)
        runs[name] = _global_adapter(tmp_path / name)
    _assert_bit_identical(runs["a"], runs["a_again"])
    assert any(not torch.equal(runs["a"][k], runs["b"][k]) for k in runs["a"])


def test_recipe_under_ddp_is_reproducible_for_a_seed(ddp_run, tiny_model_dir, tmp_path):
    """Every rank builds the same initial adapter and two two-process runs with the same seed agree bit for bit."""
    _, first_dir = ddp_run
    _run_recipe(DDP, tiny_model_dir, tmp_path / "again")
    _assert_bit_identical(_global_adapter(first_dir), _global_adapter(tmp_path / "again"))
    _run_recipe(DDP, tiny_model_dir, tmp_path / "other_seed", "--seed", "8")
    first, other = _global_adapter(first_dir), _global_adapter(tmp_path / "other_seed")
    assert any(not torch.equal(first[k], other[k]) for k in first)


def test_recipe_destroys_its_process_group_also_on_error(monkeypatch):
    """A process group left to interpreter exit can abort a finished gloo run: `main()` tears it down, errors too."""
    import importlib.util

    from accelerate import PartialState

    spec = importlib.util.spec_from_file_location("fcmoe_sft_recipe", os.path.join(ROOT, "recipes", "fcmoe_sft.py"))
    recipe = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, recipe)  # its dataclasses look their module up
    spec.loader.exec_module(recipe)

    def fail(*args, **kwargs):
        raise RuntimeError("failed after the process group was set up")

    monkeypatch.setattr(recipe, "parse_yaml_and_args", fail)
    state_before = bool(PartialState._shared_state)
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    try:
        with pytest.raises(RuntimeError, match="failed after"):
            recipe.main([])
        assert not torch.distributed.is_initialized()
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        if not state_before:
            PartialState._reset_state()
