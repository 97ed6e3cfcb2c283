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
