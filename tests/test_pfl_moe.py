"""PFL-MoE's client side (arXiv:2012.15589): the gated mixture of the global and a personal adapter on one PeftModel,
its training, and its place in a federation (kept on the client, across rounds and resume)."""

import pytest
import torch
from peft import get_peft_model
from safetensors.torch import load_file

from fcmoe_hf import MoELoraConfig
from fcmoe_hf.federated import ClientConfig, build_aggregator
from fcmoe_hf.personalization import (
    PersonalState,
    PersonalStateStore,
    PFLMoEModel,
    split_local_data,
    train_pfl_moe_client,
)
from fcmoe_hf.tasks import build_task
from fcmoe_hf.tasks.category import predict_categories
from fcmoe_hf.trainer import FederatedMoETrainingArguments, get_federated_state

from .conftest import build_model, tiny_llama_config, tiny_tokenizer
from .test_simulation import Killed, make_simulation
from .test_tasks import keyword_dataset, training_args
from .test_tasks_sequence_classification import tiny_bert_config, tiny_classifier


def _llama():
    config = MoELoraConfig(r=4, num_experts=4, top_k=2, init_lora_weights=False)
    return get_peft_model(build_model(tiny_llama_config(), seed=0), config)


def _bert():
    config = MoELoraConfig(task_type="SEQ_CLS", r=4, num_experts=4, top_k=2, init_lora_weights=False)
    return get_peft_model(tiny_classifier(tiny_bert_config()), config)


def _perturbed(state, seed=1):
    g = torch.Generator().manual_seed(seed)
    return {k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in state.items()}


def _random_gate(hidden_size, seed=2):
    g = torch.Generator().manual_seed(seed)
    return {"proj.weight": torch.randn(1, hidden_size, generator=g), "proj.bias": torch.zeros(1)}


def _batch(vocab=64):
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, vocab, (3, 7), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _force_gate(mixture, value):
    with torch.no_grad():
        mixture.gate.proj.weight.zero_()
        mixture.gate.proj.bias.fill_(200.0 if value == 1 else -200.0)


@pytest.mark.parametrize("build, logits_dim", [(_llama, 3), (_bert, 2)])
def test_mixture_gate_and_its_limits(build, logits_dim):
    model = build().eval()
    global_state = get_federated_state(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    batch = _batch()
    with torch.no_grad():
        global_logits = model(**batch).logits
    hidden = model.get_input_embeddings().weight.shape[1]
    personal = PersonalState(_perturbed(global_state), _random_gate(hidden))
    with PFLMoEModel(model, personal) as mixture, torch.no_grad():
        out = mixture(**batch)
        assert out.logits.shape == global_logits.shape and out.logits.dim() == logits_dim
        assert out.gate.shape == global_logits.shape[: logits_dim - 1]
        assert ((out.gate > 0) & (out.gate < 1)).all()
        mixture.set_stage("personal")
        personal_logits = mixture(**batch).logits
        mixture.set_stage("mixture")
        assert not torch.allclose(personal_logits, global_logits)
        _force_gate(mixture, 1)
        assert torch.equal(mixture(**batch).logits, global_logits.float())
        _force_gate(mixture, 0)
        torch.testing.assert_close(mixture(**batch).logits, personal_logits.float())
        # The personal adapter sits next to the global one and is read back as it was loaded.
        assert set(model.peft_config) == {"default", "personal"}
        assert all(torch.equal(v, personal.adapter[k]) for k, v in mixture.personal_state().adapter.items())
    # Detached: only the global adapter is left, active, trainable and unchanged.
    assert list(model.peft_config) == ["default"] and model.active_adapter == "default"
    assert {n for n, p in model.named_parameters() if p.requires_grad} == trainable
    assert all(torch.equal(v, global_state[k]) for k, v in get_federated_state(model).items())


def test_first_mixture_is_the_global_model_and_a_frozen_model_stays_frozen():
    model = _llama().eval()
    model.set_adapter("default", inference_mode=True)
    batch = _batch()
    with torch.no_grad():
        global_logits = model(**batch).logits
    with PFLMoEModel(model) as mixture, torch.no_grad():  # no personal state yet: a copy of the global adapter
        out = mixture(**batch)
        assert torch.equal(out.gate, torch.full_like(out.gate, 0.5))
        torch.testing.assert_close(out.logits, global_logits.float())
    assert not any(p.requires_grad for p in model.parameters())
    with pytest.raises(TypeError, match="PeftModel"):
        PFLMoEModel(build_model(tiny_llama_config()))


def test_causal_gate_reads_each_prefix_only():
    model = _llama().eval()
    personal = PersonalState(_perturbed(get_federated_state(model)), _random_gate(32))
    batch = _batch()
    changed = {k: v.clone() for k, v in batch.items()}
    changed["input_ids"][:, -1] = 5
    with PFLMoEModel(model, personal) as mixture, torch.no_grad():
        before, after = mixture(**batch), mixture(**changed)
        torch.testing.assert_close(before.logits[:, :-1], after.logits[:, :-1])
        assert not torch.equal(before.gate[:, -1], after.gate[:, -1])
        kept = mixture(**batch, logits_to_keep=2)
        torch.testing.assert_close(kept.logits, before.logits[:, -2:])


def test_category_task_scores_the_mixture_without_a_cache():
    task = build_task("category", tokenizer=tiny_tokenizer(), label_column="category", max_length=48)
    data = keyword_dataset(6)
    model = _llama()
    kwargs = dict(label_column="category", max_length=48, batch_size=4)
    expected = predict_categories(model, task.tokenizer, data, **kwargs).log_likelihoods
    personal = PersonalState(_perturbed(get_federated_state(model)), _random_gate(32))
    with PFLMoEModel(model, personal) as mixture:
        mixed = predict_categories(mixture, task.tokenizer, data, **kwargs).log_likelihoods
        assert not torch.allclose(torch.from_numpy(mixed), torch.from_numpy(expected))
        _force_gate(mixture, 1)
        forced = predict_categories(mixture, task.tokenizer, data, **kwargs).log_likelihoods
        torch.testing.assert_close(torch.from_numpy(forced), torch.from_numpy(expected), rtol=1e-5, atol=1e-5)
        assert set(task.evaluate(mixture, data, batch_size=4)) == {"accuracy", "precision", "recall", "f1"}


def test_split_is_three_quarters_personal_and_fixed_by_seed():
    data = keyword_dataset(13)
    personal, gate = split_local_data(data, seed=4)
    assert (len(personal), len(gate)) == (10, 3)
    assert sorted(list(personal["text"]) + list(gate["text"])) == sorted(data["text"])
    again, _ = split_local_data(data, seed=4)
    assert list(again["text"]) == list(personal["text"])


def test_client_training_leaves_the_global_adapter_alone(tmp_path):
    task = build_task("sequence_classification", tokenizer=tiny_tokenizer(), label_column="category", max_length=12)
    features = task.tokenize(keyword_dataset(16))
    model = _bert()
    global_state = get_federated_state(model)
    args = training_args(tmp_path, max_steps=50, personalization="pfl_moe")  # PFL-MoE runs one epoch per stage
    personal, losses = train_pfl_moe_client(model, features, args, task.data_collator, split_seed=0)
    assert set(losses) == {"personal_train_loss", "gate_train_loss"}
    assert all(torch.equal(v, global_state[k]) for k, v in get_federated_state(model).items())
    assert list(model.peft_config) == ["default"]
    assert set(personal.adapter) == set(global_state)
    assert any(not torch.equal(personal.adapter[k], global_state[k]) for k in global_state)
    assert personal.gate["proj.weight"].abs().sum() > 0
    # The next round starts from the kept state.
    again, _ = train_pfl_moe_client(model, features, args, task.data_collator, personal=personal, split_seed=0)
    fresh, _ = train_pfl_moe_client(model, features, args, task.data_collator, split_seed=0)
    key = next(k for k in global_state if k.endswith("moe_lora_A"))
    assert torch.equal(fresh.adapter[key], personal.adapter[key]) and not torch.equal(again.adapter[key], personal.adapter[key])


def test_the_switch_and_its_validation():
    assert build_aggregator("pfl_moe").configure_client(3) == ClientConfig(personalization="pfl_moe")
    assert build_aggregator("fedavg").configure_client(3).personalization == "none"
    args = ClientConfig(personalization="pfl_moe").apply(FederatedMoETrainingArguments(output_dir="x"))
    assert args.personalization == "pfl_moe"
    with pytest.raises(ValueError, match="personalization"):
        ClientConfig(personalization="ditto")
    with pytest.raises(ValueError, match="personalization"):
        FederatedMoETrainingArguments(output_dir="x", personalization="ditto")


def test_store_keeps_the_start_of_the_round_and_the_newest(tmp_path):
    store = PersonalStateStore(tmp_path)
    state = PersonalState({"a": torch.ones(2)}, {"proj.weight": torch.zeros(1, 2), "proj.bias": torch.zeros(1)})
    config = MoELoraConfig(r=2, num_experts=2)
    for r in (1, 2, 3):
        store.save("c", r, PersonalState({"a": torch.full((2,), float(r))}, state.gate), config)
    assert store.rounds("c") == [2, 3] and store.load("nobody") is None
    round_index, loaded = store.load("c", before_round=3)
    assert round_index == 2 and torch.equal(loaded.adapter["a"], torch.full((2,), 2.0))
    assert (store.directory("c", 3) / "adapter_config.json").exists()


def _spy(monkeypatch):
    calls = {}

    def spy(model, dataset, args, collator, personal=None, split_seed=0):
        result = train_pfl_moe_client(model, dataset, args, collator, personal=personal, split_seed=split_seed)
        calls[(args.client_id, args.federated_round)] = (personal, result[0])
        return result

    monkeypatch.setattr("fcmoe_hf.personalization.train_pfl_moe_client", spy)
    return calls


def _equal(a, b):
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_federation_keeps_personal_state_on_the_clients_and_resumes_it(tmp_path, monkeypatch):
    calls = _spy(monkeypatch)
    full = make_simulation(tmp_path, "full", aggregator="pfl_moe", num_rounds=2)
    updates = []
    train_client = full.train_client
    monkeypatch.setattr(full, "train_client", lambda *a, **k: updates.append(train_client(*a, **k)) or updates[-1])
    history = full.run()
    clients = full.client_ids
    assert set(calls) == {(cid, r) for cid in clients for r in (1, 2)}
    for cid in clients:
        assert calls[(cid, 1)][0] is None  # the first round starts from the global adapter
        assert _equal(calls[(cid, 2)][0].adapter, calls[(cid, 1)][1].adapter)  # the second from what the first kept
        assert _equal(calls[(cid, 2)][0].gate, calls[(cid, 1)][1].gate)
    # Nothing personal is ever sent: every update holds the federated adapter's keys only.
    global_keys = set(load_file(tmp_path / "full" / "global_adapter" / "adapter_model.safetensors"))
    assert len(updates) == 6 and all(set(u.deltas) == global_keys for u in updates)
    assert not any("personal" in k for u in updates for k in list(u.deltas) + list(u.activation_counts))
    # Kept on disk under the client: this round's state and the one it started from.
    store = PersonalStateStore(tmp_path / "full" / "clients")
    for cid in clients:
        assert store.rounds(cid) == [1, 2]
        assert _equal(store.load(cid)[1].adapter, calls[(cid, 2)][1].adapter)
    # The local accuracy is the mixture's, the global one the global adapter's.
    final = history[-1]
    with PFLMoEModel(full.model, store.load("client_0")[1]) as mixture:
        local = full.task.evaluate(mixture, full.splits.clients[0]["test"], batch_size=full.args.eval_batch_size)
    assert final["client_0/local_accuracy"] == local["accuracy"]
    assert final["global_accuracy"] == full.task.evaluate(full.model, full.splits.global_test, 8)["accuracy"]

    def kill_after_round_1(round_index, metrics):
        if round_index == 1:
            raise Killed

    with pytest.raises(Killed):
        make_simulation(tmp_path, "killed", aggregator="pfl_moe", num_rounds=2, on_round_end=kill_after_round_1).run()
    killed = PersonalStateStore(tmp_path / "killed" / "clients")
    start = killed.load("client_0")[1]
    # A round 2 that was interrupted after client_0's personal training: its state must not be the resumed start.
    killed.save("client_0", 2, PersonalState(_perturbed(start.adapter), start.gate), MoELoraConfig(r=4, num_experts=4))
    calls.clear()
    make_simulation(tmp_path, "killed", aggregator="pfl_moe", num_rounds=2, resume=True).run()
    assert _equal(calls[("client_0", 2)][0].adapter, start.adapter)
    for cid in clients:
        kept = killed.load(cid)[1]
        assert _equal(kept.adapter, store.load(cid)[1].adapter) and _equal(kept.gate, store.load(cid)[1].gate)


def test_other_aggregators_train_no_personal_adapter(tmp_path, monkeypatch):
    calls = _spy(monkeypatch)
    make_simulation(tmp_path, "avg", aggregator="fedavg", num_rounds=1).run()
    assert calls == {} and not list((tmp_path / "avg" / "clients").glob("*/personal"))
