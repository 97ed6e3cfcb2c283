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
