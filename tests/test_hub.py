"""Publishing to and loading from the Hub, against the Hub-protocol server of `tests/hub_server.py` on 127.0.0.1.

`huggingface_hub` fixes its endpoint (and offline mode) at import, so the code that talks to the server runs in
subprocesses started with `HF_ENDPOINT` pointing at it; the server runs in this process, so its state is inspected
directly.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from .hub_server import HubServer

ROOT = Path(__file__).resolve().parents[1]
TOKENS = {"tok-alice": "alice", "tok-bob": "bob"}


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    server = HubServer(tmp_path_factory.mktemp("hub"), TOKENS).start()
    yield server
    server.stop()


def run_py(hub: HubServer, code: str, *args: str, token: str | None = None, expect_ok: bool = True, home: Path | None = None):
    """Run `code` in a fresh Python process that talks to `hub`; returns the completed process."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING"))}
    env.update(HF_ENDPOINT=hub.url, HF_HUB_OFFLINE="0", HF_HUB_DISABLE_TELEMETRY="1", OMP_NUM_THREADS="1",
               HF_HOME=str(home or hub.root / "hf_home"), PYTHONPATH=str(ROOT), TOKENIZERS_PARALLELISM="false")
    if token is not None:
        env["HF_TOKEN"] = token
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    if expect_ok:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc


FEDERATION = """
import dataclasses, json, shutil, sys, urllib.request
from pathlib import Path
import transformers
from fcmoe_hf.trainer import FederatedMoETrainer
from tests.test_simulation import make_simulation

seen = []
init = FederatedMoETrainer.__init__
def spy(self, *args, **kwargs):
    seen.append((kwargs["args"].push_to_hub, kwargs["args"].hub_token))
    init(self, *args, **kwargs)
FederatedMoETrainer.__init__ = spy
def forbidden(self, *args, **kwargs):
    raise AssertionError("a client's Trainer touched the Hub")
transformers.Trainer.init_hf_repo = forbidden
transformers.Trainer.push_to_hub = forbidden

tmp, endpoint = Path(sys.argv[1]), sys.argv[2]
def on_round_end(round_index, metrics):
    if round_index == 1:  # keep round 1's pushed adapter to compare with its tag; round 2's push meets 5xx answers
        shutil.copytree(tmp / "run" / "global_adapter", tmp / "round1_global")
        request = urllib.request.Request(endpoint + "/_control/fail", data=json.dumps({"count": 2}).encode(), method="POST")
        urllib.request.urlopen(request).read()
simulation = make_simulation(tmp, num_rounds=2, on_round_end=on_round_end)
simulation.training_args = dataclasses.replace(
    simulation.training_args, push_to_hub=True, hub_model_id="alice/demo", hub_strategy="every_save",
    hub_token="tok-alice",
)
import fcmoe_hf.hub.push as push
push.time.sleep = lambda seconds: None  # retries without waiting
simulation.run()
assert seen and all(p is False and t is None for p, t in seen), seen
"""

LOAD = """
import sys
from pathlib import Path
import torch
from peft import PeftModel
import fcmoe_hf
from fcmoe_hf.hub import load_client_adapter, load_global_adapter
from tests.conftest import build_model, tiny_llama_config

tmp = Path(sys.argv[1])
ids = torch.tensor([[5, 9, 17, 33, 8, 40]])
def logits(model):
    with torch.no_grad():
        return model(input_ids=ids).logits
def base():
    return build_model(tiny_llama_config(), seed=0)
def local(path):
    return logits(PeftModel.from_pretrained(base(), path))

# plain peft, by repo id (main = the final round)
assert torch.equal(logits(PeftModel.from_pretrained(base(), "alice/demo")), local(tmp / "run" / "global_adapter"))
# by round tag
round1 = logits(load_global_adapter(base(), "alice/demo", revision="round-1"))
assert torch.equal(round1, local(tmp / "round1_global"))
assert not torch.equal(round1, local(tmp / "run" / "global_adapter"))
# a client's personalized adapter: plain peft with subfolder, and through the global repo id
client = tmp / "run" / "clients" / "client_1" / "adapter"
plain = PeftModel.from_pretrained(base(), "alice/demo-clients", subfolder="client_1", token="tok-alice")
assert torch.equal(logits(plain), local(client))
assert torch.equal(logits(load_client_adapter(base(), "alice/demo", "client_1", token="tok-alice")), local(client))
# the clients' repository is private: an anonymous read fails
try:
    PeftModel.from_pretrained(base(), "alice/demo-clients", subfolder="client_1")
except Exception as err:
    print("anonymous read refused:", type(err).__name__)
else:
    raise AssertionError("anonymous read of the private clients repo succeeded")

# the published cards parse, their metadata validates, and their how-to-load snippets work as written
import os, re, transformers
from huggingface_hub import HfApi, ModelCard
transformers.AutoModelForCausalLM.from_pretrained = staticmethod(lambda name, **kwargs: base())
os.environ["HF_TOKEN"] = "tok-alice"  # the clients' repository is private: the snippet needs a login
for repo_id, expected in (("alice/demo", tmp / "run" / "global_adapter"), ("alice/demo-clients", client)):
    card = ModelCard.load(repo_id) if repo_id == "alice/demo" else None
    if card is None:
        from huggingface_hub import hf_hub_download
        card = ModelCard.load(hf_hub_download(repo_id, "client_1/README.md"))
    # ModelCard.validate() asks huggingface.co whatever HF_ENDPOINT says: ask this Hub's validate-yaml, as a push does
    HfApi()._validate_yaml(card.content, repo_type="model")
    assert card.data.eval_results and card.data.eval_results[0].metric_value is not None
    data = card.data.to_dict()
    assert data["library_name"] == "peft" and data["base_model"] == "tiny-llama" and data["license"]
    assert "fcmoe_hf" in data["tags"] and data["model-index"][0]["results"]
    snippet = re.search("```python(.*?)```", card.text, re.S).group(1)
    assert "import fcmoe_hf" in snippet
    scope = {}
    exec(snippet, scope)
    assert torch.equal(logits(scope["model"]), local(expected)), repo_id
print("cards ok")
"""


def tree_hashes(directory: Path) -> dict[str, str]:
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def pushed_run(hub, tmp_path_factory):
    """A 2-round federation with `--push_to_hub --hub_strategy every_save` (round 2's push meets two 503s)."""
    tmp = tmp_path_factory.mktemp("fed")
    run_py(hub, FEDERATION, str(tmp), hub.url)
    return tmp


def test_federation_pushes_every_round_and_adapters_load_in_a_fresh_process(hub, pushed_run):
    for repo_id in ("alice/demo", "alice/demo-clients"):
        repo = hub.repos[repo_id]
        assert sorted(repo["tags"]) == ["round-1", "round-2"]
        assert repo["tags"]["round-2"] == repo["branches"]["main"]
        assert hub.commit_count(repo_id) == 3  # the repo's initial commit + one per round
    assert hub.repos["alice/demo-clients"]["private"] and not hub.repos["alice/demo"]["private"]
    files = set(hub.tree("alice/demo", "main"))
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md", "plots/metrics.png"} <= files
    client_files = set(hub.tree("alice/demo-clients", "main"))
    assert {f"client_{i}/adapter_model.safetensors" for i in range(3)} <= client_files
    # never pushed: raw updates, checkpoints, optimizer state, data
    assert not any(part in f for f in files | client_files for part in ("updates", "checkpoint", "optimizer", "rounds/"))
    proc = run_py(hub, LOAD, str(pushed_run))
    assert "anonymous read refused" in proc.stdout and "cards ok" in proc.stdout
    card = hub.blob(hub.tree("alice/demo", "main")["README.md"]).decode()
    assert "plots/metrics.png" in card and "plots/conflict_heatmap.png" in card and "round-2" in card
    assert "alice/demo-clients" in card and "Communicated:" in card and "fcmoe" in card
    index = hub.blob(hub.tree("alice/demo-clients", "main")["README.md"]).decode()
    assert "client_2/" in index and "private" in index


def test_cli_repush_of_the_same_round_makes_no_commit(hub, pushed_run):
    before = {r: hub.commit_count(r) for r in ("alice/demo", "alice/demo-clients")}
    proc = run_py(hub, "from fcmoe_hf.hub.__main__ import main; main()", "push", str(pushed_run / "run"),
                  "--repo-id", "alice/demo", token="tok-alice")
    assert "round 2" in proc.stdout
    assert {r: hub.commit_count(r) for r in before} == before


FAILING_PUSH = """
import json, sys, urllib.request
from pathlib import Path
import fcmoe_hf.hub.push as push
from fcmoe_hf.hub import HubPublisher

run, endpoint = Path(sys.argv[1]), sys.argv[2]
def control(action, **payload):
    request = urllib.request.Request(f"{endpoint}/_control/{action}", data=json.dumps(payload).encode(), method="POST")
    urllib.request.urlopen(request).read()
push.time.sleep = lambda seconds: None
publisher = HubPublisher(repo_id="alice/flaky", clients_repo_id="alice/flaky-clients", every_round=True,
                         token="tok-alice", max_retries=3)
control("fail", count=3, mode="drop")  # dropped connections, retried
assert publisher.push(run) is not None and not publisher.failures
control("fail", count=1000, mode="500")  # a Hub that stays down: logged, nothing raised
assert publisher.push(run) is None
assert publisher.failures and publisher.failures[0][0] == 2, publisher.failures
control("reset")
assert publisher.push(run).round == 2  # the command line (or the next round) repeats it
print("ok")
"""


def test_failed_pushes_are_retried_or_logged_with_nothing_lost(hub, pushed_run):
    run = pushed_run / "run"
    before = tree_hashes(run)
    proc = run_py(hub, FAILING_PUSH, str(run), hub.url)
    assert "ok" in proc.stdout and "failed" in proc.stderr
    assert tree_hashes(run) == before
    assert sorted(hub.repos["alice/flaky"]["tags"]) == ["round-2"]
    assert hub.commit_count("alice/flaky") == 2  # the failed push and the repeated one made no second commit


EARLY = """
from types import SimpleNamespace
from fcmoe_hf.hub import HubPublisher

def args(**overrides):
    fields = dict(push_to_hub=True, hub_model_id="alice/x", hub_token=None, hub_strategy="end", hub_private_repo=None,
                  hub_revision=None)
    return SimpleNamespace(**{**fields, **overrides})
for name, overrides in (("no token", {}), ("foreign", {"hub_token": "tok-bob"}), ("bad token", {"hub_token": "nope"})):
    try:
        HubPublisher.from_training_args(args(**overrides), "run")
    except ValueError as err:
        print(f"{name}: {err}")
publisher = HubPublisher.from_training_args(args(hub_token="tok-alice", hub_model_id="x"), "run")
print("resolved:", publisher.repo_id, publisher.clients_repo_id, publisher.every_round)
assert HubPublisher.from_training_args(args(push_to_hub=False), "run") is None
"""


def test_missing_token_or_foreign_repo_fail_before_training(hub):
    proc = run_py(hub, EARLY)
    assert "no token: push_to_hub needs a Hugging Face token" in proc.stdout
    assert "foreign: Cannot push to alice/x" in proc.stdout and "owned by someone else" in proc.stdout
    assert "bad token: The Hugging Face token was refused" in proc.stdout
    assert "resolved: alice/x alice/x-clients False" in proc.stdout


def test_recipe_validates_hub_settings_before_loading_anything(hub, tmp_path):
    code = "import sys; sys.path.insert(0, 'recipes'); import fcmoe_sft; fcmoe_sft.main(sys.argv[1:])"
    proc = run_py(hub, code, "--output_dir", str(tmp_path / "out"), "--push_to_hub", "true", "--hub_model_id",
                  "bob/model", "--hub_token", "tok-alice", expect_ok=False)
    assert proc.returncode != 0 and "owned by someone else" in proc.stderr
    assert not (tmp_path / "out").exists()
