"""Publishing a run's latest checkpointed round: adapters exported from a checkpoint, without a model, equal the ones
the run writes at its end, and a killed run's latest round is pushed and loads from its `round-<N>` tag."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from fcmoe_hf.simulation.export import export_checkpoint

from .test_hub import hub, run_py  # noqa: F401  (the Hub-protocol server fixture)
from .test_simulation import make_simulation


class Killed(Exception):
    pass


def assert_same_adapter(exported, written):
    got, expected = load_file(exported / "adapter_model.safetensors"), load_file(written / "adapter_model.safetensors")
    assert set(got) == set(expected)
    for key, value in expected.items():
        assert got[key].dtype == value.dtype and torch.equal(got[key], value), key
    assert json.loads((exported / "adapter_config.json").read_text()) == json.loads((written / "adapter_config.json").read_text())


def test_adapters_exported_from_the_checkpoint_are_those_written_at_the_end(tmp_path):
    make_simulation(tmp_path, num_rounds=2).run()
    run, out = tmp_path / "run", tmp_path / "exported"
    with pytest.raises(ValueError, match="holds round 2, not round 1"):
        export_checkpoint(run, out, round=1)
    record = export_checkpoint(run, out, round=2)
    assert record["round"] == 2 and record["clients"] == ["client_0", "client_1", "client_2"]
    assert_same_adapter(out / "global_adapter", run / "global_adapter")
    for client_id in record["clients"]:
        assert_same_adapter(out / "clients" / client_id / "adapter", run / "clients" / client_id / "adapter")
    # FC-MoE retention: the personalized adapters are not the global one
    client = load_file(out / "clients" / "client_0" / "adapter" / "adapter_model.safetensors")
    global_state = load_file(out / "global_adapter" / "adapter_model.safetensors")
    assert any(not torch.equal(client[k], global_state[k]) for k in client)
    # the cards carry the round's own metrics (the final round is evaluated), and the plots exist
    written = json.loads((run / "outputs.json").read_text())
    assert record["cards"]["global"]["metrics"] == written["cards"]["global"]["metrics"]
    assert "global_accuracy" in (out / "global_adapter" / "README.md").read_text()
    assert (out / "plots" / "metrics.png").stat().st_size > 0


PUSH_AND_LOAD = """
import sys
from pathlib import Path
from peft import PeftModel, get_peft_model_state_dict
from safetensors.torch import load_file
import torch
import fcmoe_hf
from fcmoe_hf.hub.__main__ import main
from tests.conftest import build_model, tiny_llama_config

run = Path(sys.argv[1])
try:
    main(["push", str(run), "--repo-id", "alice/killed", "--round", "2"])
except ValueError as err:
    print("round 2:", err)
main(["push", str(run), "--repo-id", "alice/killed", "--round", "1"])
expected = load_file(run / "checkpoints" / "round_0001" / "global_state.safetensors")
model = PeftModel.from_pretrained(build_model(tiny_llama_config(), seed=0), "alice/killed", revision="round-1")
loaded = get_peft_model_state_dict(model)
assert expected and set(loaded) == set(expected), (sorted(loaded)[:3], sorted(expected)[:3])
assert all(torch.equal(loaded[k], expected[k]) for k in expected)
client = PeftModel.from_pretrained(build_model(tiny_llama_config(), seed=0), "alice/killed-clients",
                                   subfolder="client_0", revision="round-1")
print("loaded", len(get_peft_model_state_dict(client)))
"""


def test_a_killed_run_pushes_its_latest_checkpointed_round(hub, tmp_path):  # noqa: F811
    def kill_after_round_1(round_index, metrics):
        if round_index == 1:
            raise Killed

    with pytest.raises(Killed):
        make_simulation(tmp_path, num_rounds=2, on_round_end=kill_after_round_1).run()
    run = tmp_path / "run"
    assert not (run / "outputs.json").exists() and not (run / "global_adapter").exists()
    proc = run_py(hub, PUSH_AND_LOAD, str(run), token="tok-alice")
    assert "round 2:" in proc.stdout and "latest checkpoint: 1" in proc.stdout
    assert "Pushed round 1" in proc.stdout and "loaded" in proc.stdout
    for repo_id in ("alice/killed", "alice/killed-clients"):
        assert sorted(hub.repos[repo_id]["tags"]) == ["round-1"]
    files = set(hub.tree("alice/killed", "main"))
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md"} <= files
    assert not any("checkpoint" in f or "logs/" in f for f in files)
    card = hub.blob(hub.tree("alice/killed", "main")["README.md"]).decode()
    assert "round 1" in card and "round-1" in card
    assert {f"client_{i}/adapter_model.safetensors" for i in range(3)} <= set(hub.tree("alice/killed-clients", "main"))
    assert not (run / "outputs.json").exists()  # the run directory is left as it was
