"""Gaps of the reliability work closed one by one, each with tiny states and no training: client ids from a checkpoint
never become paths outside the run, aggregator configs are checked by name and type before anything loads, a deleted
`latest_checkpoint` is recovered from the complete checkpoints, and `--config=file.yaml` is read as `--config file`."""

from __future__ import annotations

import json

import pytest
import torch

from fcmoe_hf.simulation.checkpoints import CheckpointError, CheckpointStore, check_client_id
from fcmoe_hf.simulation.export import export_checkpoint
from fcmoe_hf.simulation.outputs import CHECKPOINT_RECORD


def _save(store, round_index, last_update_round=None, files=None):
    return store.save(
        round_index, {"w": torch.full((2,), float(round_index))}, {},
        {"last_update_round": last_update_round or {}, "aggregator": "fedavg"},
        files=files if files is not None else {"adapter_config.json": b'{"r": 2}'},
    )


# -- B: client ids read from a checkpoint are plain names -------------------------------------------------------------


@pytest.mark.parametrize("field", ["last_update_round", "update_scales", "outputs_record"])
def test_a_crafted_client_id_in_a_checkpoint_is_refused_and_nothing_is_written_outside(tmp_path, field):
    evil = "../../../escaped_by_client_id"
    store = CheckpointStore(tmp_path / "a" / "b" / "run")
    if field == "outputs_record":  # the cards' record lists the clients too
        record = {"round": 1, "clients": [evil], "cards": {"global": {}, "clients": {}}}
        _save(store, 1, files={"adapter_config.json": b"{}", CHECKPOINT_RECORD: json.dumps(record).encode()})
    elif field == "update_scales":
        store.save(1, {"w": torch.zeros(2)}, {}, {"last_update_round": {}, "update_scales": {evil: 1.0},
                                                  "aggregator": "fedavg"}, files={"adapter_config.json": b"{}"})
    else:
        _save(store, 1, last_update_round={evil: 1})
    before = sorted(p for p in tmp_path.rglob("*"))
    with pytest.raises(CheckpointError, match=r"(state|outputs_record)\.json.*invalid client id '\.\./\.\./\.\./escaped"):
        export_checkpoint(store.run_dir, tmp_path / "a" / "b" / "export")
    assert sorted(p for p in tmp_path.rglob("*")) == before  # nothing written, inside or outside
    if field != "outputs_record":
        with pytest.raises(CheckpointError, match="invalid client id"):
            store.load()


def test_client_ids_are_plain_names():
    for good in ("client_0", "c0", "node-3.a"):
        assert check_client_id(good, "f") == good
    for bad in ("..", ".", "", "a/b", "/abs", ".hidden", "-x", "a\\b", "x" * 129, 3, None):
        with pytest.raises(CheckpointError, match="f: invalid client id"):
            check_client_id(bad, "f")


# -- C: a misspelled aggregator_config field is named, with the field it is closest to, before anything loads ---------


def test_a_misspelled_aggregator_config_field_is_named_with_its_close_match(tmp_path, monkeypatch):
    from fcmoe_hf.federated import build_aggregator
    from fcmoe_hf.simulation import FederationArguments

    expected = r"aggregator_config: unknown field 'norm_bound_facter' for fcmoe \(did you mean 'norm_bound_factor'\?\)"
    with pytest.raises(ValueError, match=expected):
        build_aggregator("fcmoe", {"norm_bound_facter": 5})
    with pytest.raises(ValueError, match=r"unknown field 'retention_lamda' for fcmoe \(did you mean 'retention_lambda'"):
        build_aggregator("fcmoe", retention_lamda=0.9)
    with pytest.raises(ValueError, match=r"unknown field 'zzz' for fedavg \(its fields: min_clients, "):
        build_aggregator("fedavg", {"zzz": 1})
    with pytest.raises(ValueError, match=expected):  # when the arguments are parsed, not when the federation starts
        FederationArguments(aggregator_config='{"norm_bound_facter": 5}')
    with pytest.raises(ValueError, match="aggregator_config must be a mapping"):
        FederationArguments(aggregator_config="[5]")
    assert FederationArguments(aggregator="fedavg", aggregator_config={"norm_bound_factor": 5}).aggregator_config

    # The recipe fails on it before reading data or loading a model.
    recipe = _recipe()
    monkeypatch.setattr(recipe, "load_bundled_fortunes", lambda: pytest.fail("data loaded before the config check"))
    config = tmp_path / "config.yaml"
    config.write_text(f"output_dir: {tmp_path / 'out'}\naggregator_config:\n  norm_bound_facter: 5\n")
    with pytest.raises(ValueError, match=expected):
        recipe.main(["--config", str(config)])
    assert not (tmp_path / "out").exists()


def _recipe():
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "recipes" / "fcmoe_sft.py"
    spec = importlib.util.spec_from_file_location("fcmoe_sft_reliability_gaps", path)
    recipe = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = recipe  # its dataclasses look their module up
    spec.loader.exec_module(recipe)
    return recipe


# -- E: aggregator config fields are type-checked; YAML and the command line give real bools -------------------------


@pytest.mark.parametrize(
    ("name", "config", "message"),
    [
        ("fedavg", {"enforce_bounds": "no"}, "enforce_bounds must be a bool (true or false), got str 'no'"),
        ("fcmoe", {"use_projection": 1}, "use_projection must be a bool (true or false), got int 1"),
        ("fcmoe", {"retention_lambda": "0.5"}, "retention_lambda must be a number, got str '0.5'"),
        ("fcmoe", {"retention_lambda": True}, "retention_lambda must be a number, got bool True"),
        ("fedavg", {"max_update_norm": False}, "max_update_norm must be a number, got bool False"),
        ("fedavg", {"min_clients": 2.0}, "min_clients must be an integer, got float 2.0"),
        ("fcmoe", {"robust": 3}, "robust must be a string, got int 3"),
    ],
)
def test_aggregator_config_fields_are_type_checked(name, config, message):
    from fcmoe_hf.federated import build_aggregator

    with pytest.raises(ValueError, match=r"aggregator_config: " + message.replace("(", r"\(").replace(")", r"\)")):
        build_aggregator(name, config)


def test_yaml_and_command_line_give_real_bools(tmp_path):
    from transformers import HfArgumentParser

    from fcmoe_hf.config_parsing import parse_yaml_and_args
    from fcmoe_hf.federated import aggregator_config_class, build_aggregator
    from fcmoe_hf.simulation import FederationArguments

    config = tmp_path / "config.yaml"
    config.write_text("aggregator: fedavg\naggregator_config:\n  enforce_bounds: false\n  norm_bound_factor: 5\n")
    (federation,) = parse_yaml_and_args(HfArgumentParser(FederationArguments), ["--config", str(config)])
    assert federation.aggregator_config == {"enforce_bounds": False, "norm_bound_factor": 5}
    (federation,) = parse_yaml_and_args(
        HfArgumentParser(FederationArguments), ["--aggregator", "fedavg", "--aggregator_config", '{"enforce_bounds": false}']
    )
    assert build_aggregator("fedavg", federation.aggregator_config).config.enforce_bounds is False
    with pytest.raises(ValueError, match="enforce_bounds must be a bool"):  # a JSON string "false" is not a bool
        FederationArguments(aggregator="fedavg", aggregator_config='{"enforce_bounds": "false"}')
    (parsed,) = HfArgumentParser(aggregator_config_class("fedavg")).parse_args_into_dataclasses(
        ["--enforce_bounds", "false", "--norm_bound_factor", "5"]
    )
    assert parsed.enforce_bounds is False and parsed.norm_bound_factor == 5.0


# -- D: a deleted `latest_checkpoint` is recovered from the complete checkpoints ---------------------------------------


@pytest.mark.parametrize("pointer", [None, "", "round_00002"])  # deleted, emptied, naming no directory
def test_a_missing_latest_checkpoint_is_recovered_from_the_complete_checkpoints(tmp_path, caplog, pointer):
    store = CheckpointStore(tmp_path / "run")
    for r in (1, 2):
        _save(store, r)
    latest = store.run_dir / "latest_checkpoint"
    latest.unlink() if pointer is None else latest.write_text(pointer)
    assert store.exists()
    assert store.latest_round() == 2
    with caplog.at_level("WARNING"):
        state, global_state, _ = store.load(repair=True)
    assert state["round"] == 2 and torch.equal(global_state["w"], torch.full((2,), 2.0))
    assert "latest_checkpoint is" in caplog.text or "which does not exist" in caplog.text
    assert latest.read_text() == "round_0002"  # repaired
    # The newest complete checkpoint that passes its check: a damaged round 2 gives round 1.
    latest.unlink()
    (store.root / "round_0002" / "global_state.safetensors").write_bytes(b"damaged")
    assert store.load()[0]["round"] == 1 and store.skipped[0][0].name == "round_0002"
    assert store.latest_round() == 1
    assert export_checkpoint(store.run_dir, tmp_path / "export", clients=False)["round"] == 1
    (store.root / "round_0001" / "global_state.safetensors").write_bytes(b"damaged")
    with pytest.raises(CheckpointError, match="No usable checkpoint.*round_0002.*round_0001"):
        store.load()
    # An incomplete directory (no state.json: killed before its commit) is not a checkpoint.
    empty = CheckpointStore(tmp_path / "fresh")
    (empty.root / "round_0001").mkdir(parents=True)
    assert not empty.exists() and empty.load() is None and empty.latest_round() is None


def test_a_plain_run_into_checkpoints_without_latest_checkpoint_is_refused(tmp_path):
    from .test_reliability import simulation

    store = CheckpointStore(tmp_path / "run")
    _save(store, 1)
    (store.run_dir / "latest_checkpoint").unlink()
    (store.run_dir / "metrics.jsonl").write_text('{"round": 1}\n')
    with pytest.raises(FileExistsError, match="already holds a run: pass --resume"):
        simulation(store.run_dir).run()
    assert (store.run_dir / "metrics.jsonl").read_text() == '{"round": 1}\n'  # nothing truncated


# -- F: `--config=file.yaml` is `--config file.yaml` -------------------------------------------------------------------


def test_config_file_given_with_an_equals_sign(tmp_path):
    from transformers import HfArgumentParser

    from fcmoe_hf.config_parsing import parse_yaml_and_args
    from fcmoe_hf.simulation import FederationArguments

    config = tmp_path / "config.yaml"
    config.write_text("num_rounds: 3\naggregator: fedavg\n")
    cases = [(["--config", str(config)], 3), ([f"--config={config}"], 3), ([f"--config={config}", "--num_rounds=4"], 4)]
    for argv, num_rounds in cases:  # the command line still overrides the file
        (parsed,) = parse_yaml_and_args(HfArgumentParser(FederationArguments), argv)
        assert parsed.aggregator == "fedavg" and parsed.num_rounds == num_rounds
    with pytest.raises(ValueError, match="--config= needs a YAML file path"):
        parse_yaml_and_args(HfArgumentParser(FederationArguments), ["--config="])
    with pytest.raises(ValueError, match=r"unknown field 'config_fle'"):  # only `--config` itself is taken
        parse_yaml_and_args(HfArgumentParser(FederationArguments), [f"--config_fle={config}"])
    # The recipe reads it too (and then stops at the missing model directory, before any data).
    with pytest.raises(FileNotFoundError, match="model_name_or_path: no such directory"):
        _recipe().main([f"--config={config}", "--model_name_or_path", str(tmp_path / "no_model"),
                        "--output_dir", str(tmp_path / "out")])
