"""Two runs cannot share a run directory, a resume refuses what it cannot continue faithfully (another configuration,
a checkpoint past `num_rounds`) and does nothing to a finished run, and configuration errors name the field."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
import yaml
from peft import get_peft_model
from transformers import HfArgumentParser

from fcmoe_hf import MoELoraConfig
from fcmoe_hf.config_parsing import parse_yaml_and_args
from fcmoe_hf.data import PartitionConfig, partition_dataset
from fcmoe_hf.modeling import check_model_name_or_path
from fcmoe_hf.simulation import FederatedSimulation, FederationArguments
from fcmoe_hf.simulation.lock import RunDirectoryLocked, RunLock
from fcmoe_hf.trainer import FederatedMoETrainingArguments

from .conftest import build_model, tiny_llama_config, tiny_tokenizer
from .test_simulation import tiny_corpus

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def simulation(run_dir, num_rounds=1, resume=False, num_clients=2, aggregator_config=None, allow_change=False, **hooks):
    splits = partition_dataset(
        tiny_corpus(per_class=8), PartitionConfig(num_clients=num_clients, alpha=1.0, min_partition_size=4, partition_seed=0)
    )
    model = get_peft_model(build_model(tiny_llama_config(), seed=0), MoELoraConfig(r=2, num_experts=2, top_k=1))
    args = FederationArguments(
        num_rounds=num_rounds, aggregator_config=aggregator_config, max_length=24, eval_batch_size=16,
        max_global_eval_samples=8, max_local_eval_samples=4, resume=resume, resume_allow_config_change=allow_change,
        base_model_id="tiny-llama",
    )
    training_args = FederatedMoETrainingArguments(
        output_dir=str(run_dir), per_device_train_batch_size=8, num_train_epochs=1, learning_rate=5e-3, use_cpu=True,
        report_to=[],
    )
    return FederatedSimulation(model, tiny_tokenizer(), splits, args, training_args, **hooks)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished one-round run, copied by the tests that change it."""
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    simulation(run_dir).run()
    return run_dir


@pytest.fixture
def run_copy(finished, tmp_path):
    shutil.copytree(finished, tmp_path / "run")
    return tmp_path / "run"


# -- the lock on the run directory -----------------------------------------------------------------------------------


def test_two_runs_on_one_directory_cannot_both_proceed(tmp_path):
    refused = []

    def second_run(round_index, metrics):
        for resume in (False, True):  # a second run, and a second --resume of the live run
            with pytest.raises(RunDirectoryLocked, match=rf"pid {os.getpid()} on host {socket.gethostname()}") as err:
                simulation(tmp_path / "run", resume=resume).run()
            refused.append(str(err.value))

    simulation(tmp_path / "run", on_round_end=second_run).run()
    assert len(refused) == 2 and all("run.lock" in message for message in refused)
    assert not (tmp_path / "run" / "run.lock").exists()  # released at the end


LOCK_HOLDER = """
import importlib.util, sys, time
spec = importlib.util.spec_from_file_location("lock", sys.argv[1])
lock = importlib.util.module_from_spec(spec)
spec.loader.exec_module(lock)
lock.RunLock(sys.argv[2]).acquire()
print("locked", flush=True)
time.sleep(120)
"""


def test_a_lock_names_its_live_holder_and_a_dead_holders_lock_is_taken_over(tmp_path, caplog):
    holder = subprocess.Popen(
        [sys.executable, "-c", LOCK_HOLDER, os.path.join(ROOT, "fcmoe_hf", "simulation", "lock.py"), str(tmp_path)],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunDirectoryLocked, match=rf"pid {holder.pid} on host {socket.gethostname()}.*run\.lock"):
            RunLock(tmp_path).acquire()
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
    assert json.loads((tmp_path / "run.lock").read_text())["pid"] == holder.pid  # left behind by the killed holder
    with RunLock(tmp_path) as lock:
        assert lock.held and json.loads((tmp_path / "run.lock").read_text())["pid"] == os.getpid()
    assert f"stale lock {tmp_path / 'run.lock'} of pid {holder.pid}" in caplog.text
    assert not (tmp_path / "run.lock").exists()


def test_a_lock_recorded_by_another_host_is_not_taken_over(tmp_path):
    record = {"pid": 1234, "host": "other-host", "started": time.time(), "command": "fcmoe_sft.py"}
    (tmp_path / "run.lock").write_text(json.dumps(record))
    with pytest.raises(RunDirectoryLocked, match=r"another host: pid 1234 on host other-host.*delete .*run\.lock"):
        RunLock(tmp_path).acquire()


# -- what a resume refuses, and what it may change -------------------------------------------------------------------


@pytest.mark.parametrize(
    "change, fields",
    [
        ({"num_clients": 3}, ["num_clients: 2 -> 3", "client_data:"]),
        ({"aggregator_config": {"retention_lambda": 0.9}}, ["aggregator_config.retention_lambda: 0.5 -> 0.9"]),
    ],
)
def test_resume_with_another_configuration_is_refused_naming_the_fields(run_copy, change, fields):
    with pytest.raises(ValueError, match="configuration differs") as err:
        simulation(run_copy, num_rounds=2, resume=True, **change).run()
    assert all(field in str(err.value) for field in fields), str(err.value)
    assert "--resume_allow_config_change true" in str(err.value)
    # Explicitly allowed: the checkpoint loads (the next checkpoint records the new configuration).
    assert simulation(run_copy, num_rounds=2, resume=True, allow_change=True, **change)._load_checkpoint()[0] == 1


def test_an_aggregator_field_added_since_the_checkpoint_is_compared_with_the_behaviour_it_ran_with():
    from fcmoe_hf.simulation.resume import config_differences

    current = {"aggregator": "fcmoe", "aggregator_config": {"retention_lambda": 0.5, "bounds_action": "cap", "new": 1}}
    older = {"aggregator": "fcmoe", "aggregator_config": {"retention_lambda": 0.5}}  # written before both fields
    # `new` is not recorded and its default is taken to keep the old behaviour; bounds_action changed what runs.
    assert config_differences(older, current) == [
        "aggregator_config.bounds_action: 'reject' (not recorded: the behaviour then) -> 'cap'"
    ]
    rejecting = {"aggregator": "fcmoe", "aggregator_config": {"retention_lambda": 0.5, "bounds_action": "reject", "new": 1}}
    assert config_differences(older, rejecting) == []  # resumed with the behaviour it ran with
    changed = {"aggregator": "fcmoe", "aggregator_config": {"retention_lambda": 0.5, "bounds_action": "reject", "new": 1}}
    assert config_differences(changed, current) == ["aggregator_config.bounds_action: 'reject' -> 'cap'"]
    dropped = {"aggregator": "fcmoe", "aggregator_config": {"retention_lambda": 0.5, "bounds_action": "cap", "old_field": 1}}
    assert config_differences(dropped, current) == ["aggregator_config.old_field: 1 -> '<absent>'"]


def test_resume_extends_num_rounds_and_refuses_a_checkpoint_past_it(run_copy):
    history = simulation(run_copy, num_rounds=2, resume=True).run()  # num_rounds may grow
    assert [h["round"] for h in history] == [1, 2]
    with pytest.raises(ValueError, match=r"holds round 2, past num_rounds=1; nothing would run"):
        simulation(run_copy, num_rounds=1, resume=True).run()


def test_resuming_a_finished_run_does_nothing_and_keeps_its_cards(finished, run_copy):
    card = (run_copy / "global_adapter" / "README.md").read_bytes()
    outputs = (run_copy / "outputs.json").read_bytes()
    resumed = simulation(run_copy, resume=True)
    assert resumed.run() == []
    assert "already finished at round 1 of num_rounds 1; nothing to do" in resumed.nothing_to_do
    assert (run_copy / "global_adapter" / "README.md").read_bytes() == card
    assert (run_copy / "outputs.json").read_bytes() == outputs
    # Killed while writing its outputs (outputs.json is written last): the resume writes them, for round 1.
    (run_copy / "outputs.json").unlink()
    (run_copy / "global_adapter" / "README.md").write_text("half a card")
    assert [h["round"] for h in simulation(run_copy, resume=True).run()] == [1]
    # The same outputs as the run wrote (its copy's paths aside), and a card with round 1's results.
    moved = str(finished).encode(), str(run_copy).encode()
    assert (run_copy / "outputs.json").read_bytes() == outputs.replace(*moved)
    assert (run_copy / "global_adapter" / "README.md").read_bytes() == card.replace(*moved)
    assert "round 0" not in card.decode() and "## Results (round 1)" in card.decode()


# -- configuration errors name the field ------------------------------------------------------------------------------


def _recipe():
    spec = importlib.util.spec_from_file_location("fcmoe_sft_reliability", os.path.join(ROOT, "recipes", "fcmoe_sft.py"))
    recipe = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = recipe  # its dataclasses look their module up
    spec.loader.exec_module(recipe)
    return recipe


def _parser(recipe):
    return HfArgumentParser((recipe.ModelArguments, recipe.MoEAdapterArguments, recipe.DataArguments, PartitionConfig,
                             FederationArguments, FederatedMoETrainingArguments))


def test_unknown_and_misspelled_keys_are_rejected_never_prefix_matched(tmp_path):
    recipe = _recipe()
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"output_dir": str(tmp_path / "out"), "num_round": 3}))
    with pytest.raises(ValueError, match=r"config\.yaml: unknown field 'num_round' \(did you mean 'num_rounds'\?\)"):
        parse_yaml_and_args(_parser(recipe), ["--config", str(config)])
    with pytest.raises(ValueError, match=r"command line: unknown field 'num_round' \(did you mean 'num_rounds'\?\)"):
        parse_yaml_and_args(_parser(recipe), ["--output_dir", str(tmp_path), "--num_round", "3"])
    with pytest.raises(ValueError, match=r"unknown field 'lerning_rate' \(did you mean 'learning_rate'\?\)"):
        parse_yaml_and_args(_parser(recipe), ["--output_dir", str(tmp_path), "--lerning_rate=0.1"])
    parsed = parse_yaml_and_args(_parser(recipe), ["--output_dir", str(tmp_path), "--num_rounds", "3"])
    assert parsed[4].num_rounds == 3


def test_a_model_path_that_does_not_exist_is_said_as_such(tmp_path):
    missing = str(tmp_path / "no_such_model")
    with pytest.raises(FileNotFoundError, match=r"model_name_or_path: no such directory .*no_such_model"):
        check_model_name_or_path(missing)
    for name in ("smollm2-135m-instruct", "HuggingFaceTB/SmolLM2-135M-Instruct", str(tmp_path)):
        check_model_name_or_path(name)  # an alias, a Hub id and an existing directory pass
    # The recipe says it before reading any data.
    with pytest.raises(FileNotFoundError, match="model_name_or_path: no such directory"):
        _recipe().main(["--model_name_or_path", missing, "--output_dir", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_too_many_clients_for_the_data_is_said_in_terms_of_num_clients():
    corpus = tiny_corpus(per_class=8)  # 32 train rows
    cases = [
        (PartitionConfig(num_clients=40, scheme="iid"), "fewer train rows than clients"),
        (PartitionConfig(num_clients=10, min_partition_size=4), "10 x 4 rows do not fit"),
        (PartitionConfig(num_clients=7, alpha=0.05, min_partition_size=4), "10 Dirichlet draws"),
    ]
    for config, why in cases:
        with pytest.raises(ValueError, match=rf"num_clients={config.num_clients} is too many for tiny \(32 train rows") as err:
            partition_dataset(corpus, config, dataset_name="tiny")
        assert why in str(err.value)
