"""Checkpoints a resume can trust: every file checksummed, the previous checkpoint kept and used (with a warning) when
the latest is damaged, non-finite states refused naming the file, nothing ever unpickled, checkpoint names validated.
These use `CheckpointStore` directly (no training): each test takes well under a second."""

from __future__ import annotations

import hashlib
import json
import logging
import pickle

import pytest
import torch

from fcmoe_hf.simulation.checkpoints import CheckpointError, CheckpointStore
from fcmoe_hf.simulation.export import export_checkpoint

CHECKSUMMED = {
    "global_state.safetensors", "aggregator_state.safetensors", "rng_state.json", "rng_state.safetensors",
    "adapter_config.json",
}


def _save(store, round_index, value=None):
    value = float(round_index) if value is None else value
    return store.save(
        round_index, {"w": torch.full((2, 3), value)}, {"momentum": torch.zeros(2)},
        {"last_update_round": {"client_0": round_index}, "aggregator": "fedavg"}, files={"adapter_config.json": b"{}"},
    )


def _store(tmp_path, rounds=(1, 2)):
    store = CheckpointStore(tmp_path / "run")
    for r in rounds:
        _save(store, r)
    return store


def test_every_file_is_checksummed_and_the_previous_checkpoint_is_kept(tmp_path):
    store = _store(tmp_path, rounds=(1, 2, 3))
    assert sorted(p.name for p in store.root.iterdir()) == ["round_0002", "round_0003"]
    directory = store.latest()
    state = json.loads((directory / "state.json").read_text())
    assert set(state["files"]) == CHECKSUMMED and state["format"] == 2 and state["state_sha256"]
    for name, digest in state["files"].items():
        assert hashlib.sha256((directory / name).read_bytes()).hexdigest() == digest
    loaded_state, global_state, _ = store.load()
    assert loaded_state["round"] == 3 and torch.equal(global_state["w"], torch.full((2, 3), 3.0))
    assert not store.skipped


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flip(path):
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))


def _edit_state(path):
    state = json.loads(path.read_text())
    state["last_update_round"] = {"client_0": 99}  # valid JSON, plausible, but not what was written
    path.write_text(json.dumps(state))


DAMAGES = {
    "truncated global state": ("global_state.safetensors", _truncate),
    "altered byte": ("aggregator_state.safetensors", _flip),
    "broken state.json": ("state.json", lambda p: p.write_text('{"round": 2, "files": {')),
    "edited state.json": ("state.json", _edit_state),
    "missing rng state": ("rng_state.json", lambda p: p.unlink()),
    "altered extra file": ("adapter_config.json", lambda p: p.write_bytes(b'{"r": 64}')),
}


@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_a_damaged_latest_checkpoint_falls_back_to_the_previous_with_a_warning(tmp_path, caplog, damage):
    store = _store(tmp_path)
    name, apply = DAMAGES[damage]
    apply(store.root / "round_0002" / name)
    with caplog.at_level(logging.WARNING):
        state, global_state, _ = store.load(repair=True)
    assert state["round"] == 1 and torch.equal(global_state["w"], torch.full((2, 3), 1.0))
    assert [d.name for d, _ in store.skipped] == ["round_0002"] and name in store.skipped[0][1]
    assert "round_0002" in caplog.text and name in caplog.text
    assert (store.run_dir / "latest_checkpoint").read_text() == "round_0001"  # repaired: the run now continues from 1
    _save(store, 2, value=7.0)  # the re-run round replaces the damaged one; the fallback stays as the previous
    assert sorted(p.name for p in store.root.iterdir()) == ["round_0001", "round_0002"]
    assert store.load()[0]["round"] == 2


def test_both_checkpoints_damaged_is_an_error_naming_every_file(tmp_path):
    store = _store(tmp_path)
    _truncate(store.root / "round_0002" / "global_state.safetensors")
    (store.root / "round_0001" / "state.json").write_text("{not json")
    with pytest.raises(CheckpointError) as err:
        store.load()
    message = str(err.value)
    assert "round_0002/global_state.safetensors: checksum mismatch" in message
    assert "round_0001/state.json: cannot be read as JSON" in message


def test_non_finite_global_state_is_a_clear_error_naming_the_file(tmp_path):
    store = CheckpointStore(tmp_path / "run")
    _save(store, 1, value=float("nan"))  # checksums are right: the values are what is wrong
    with pytest.raises(CheckpointError, match=r"round_0001/global_state\.safetensors: non-finite values .* 'w'"):
        store.load()
    _save(store, 2, value=float("inf"))
    _save(store, 3)
    assert store.load()[0]["round"] == 3


def test_a_legacy_checkpoint_without_checksums_still_loads(tmp_path, caplog):
    store = _store(tmp_path, rounds=(1,))
    path = store.root / "round_0001" / "state.json"
    state = json.loads(path.read_text())
    for key in ("files", "state_sha256", "format"):
        state.pop(key)
    path.write_text(json.dumps(state))
    with caplog.at_level(logging.WARNING):
        assert store.load()[0]["round"] == 1
    assert "predates checkpoint checksums" in caplog.text


class _Payload:
    """Unpickling this creates `marker`: proof that a pickle was loaded."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_a_crafted_pickle_in_a_checkpoint_runs_nothing(tmp_path):
    store = _store(tmp_path)
    marker = tmp_path / "pwned"
    payload = pickle.dumps(_Payload(marker))
    # Planted beside the files (the old rng_state.pt) and in place of the files a resume reads.
    (store.root / "round_0002" / "rng_state.pt").write_bytes(payload)
    assert store.load()[0]["round"] == 2  # an unknown file is never read
    torch.save({"payload": _Payload(marker)}, store.root / "round_0002" / "rng_state.pt")
    for name in ("global_state.safetensors", "rng_state.safetensors", "state.json"):
        (store.root / "round_0002" / name).write_bytes(payload)
    (store.root / "round_0001" / "aggregator_state.safetensors").write_bytes(payload)
    with pytest.raises(CheckpointError, match="round_0002.*round_0001"):
        store.load()
    with pytest.raises(CheckpointError):
        export_checkpoint(store.run_dir, tmp_path / "export")
    assert not marker.exists()


def test_checkpoint_names_are_validated(tmp_path):
    store = _store(tmp_path)
    outside = tmp_path / "elsewhere"
    _save(CheckpointStore(outside), 5)
    for name in ("../../elsewhere/checkpoints/round_0005", "/etc", "round_0002/../../..", "round_2"):
        (store.run_dir / "latest_checkpoint").write_text(name)
        with pytest.raises(CheckpointError, match="latest_checkpoint names .*not a checkpoint of this run"):
            store.load()
    # A checkpoint directory that is a link (to a payload outside the run) is not followed.
    (store.run_dir / "latest_checkpoint").write_text("round_0003")
    (store.root / "round_0003").symlink_to(outside / "checkpoints" / "round_0005")
    with pytest.raises(CheckpointError, match="is a link"):
        store.latest()
    assert store.load()[0]["round"] == 2  # a resume skips it for the previous complete checkpoint
    with pytest.raises(ValueError, match="plain file name"):
        _save_with_files(store, {"../escape.json": b"{}"})
    with pytest.raises(ValueError, match="plain file name"):
        _save_with_files(store, {"state.json": b"{}"})


def _save_with_files(store, files):
    store.save(9, {"w": torch.zeros(1)}, {}, {"last_update_round": {}}, files=files)


def test_pruning_removes_abandoned_and_incomplete_checkpoints(tmp_path):
    store = _store(tmp_path, rounds=(1, 2))
    (store.root / "round_0007").mkdir()  # an abandoned round's partial directory (never committed)
    (store.root / "round_0002.tmp").mkdir()  # not a checkpoint name: left alone
    _save(store, 3)
    assert sorted(p.name for p in store.root.iterdir()) == ["round_0002", "round_0002.tmp", "round_0003"]
    assert CheckpointStore(store.run_dir, keep=1).save(4, {"w": torch.zeros(1)}, {}, {"last_update_round": {}})
    assert sorted(p.name for p in store.root.iterdir()) == ["round_0002.tmp", "round_0004"]
