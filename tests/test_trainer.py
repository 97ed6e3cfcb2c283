import pytest
import torch
from peft import get_peft_model
from transformers import HfArgumentParser, Trainer, TrainingArguments

from fcmoe_hf import MoELoraConfig
from fcmoe_hf.federated import ClientUpdate
from fcmoe_hf.trainer import (
    FederatedMoETrainer,
    FederatedMoETrainingArguments,
    freeze_all_but_base_experts,
    get_federated_state,
)

from .conftest import build_model, pad_collator, tiny_llama_config, tiny_moe_config, token_dataset


def moe_model(seed=0, **config):
    kwargs = dict(r=4, num_experts=4, top_k=2)
    kwargs.update(config)
    return get_peft_model(build_model(tiny_llama_config(), seed=seed), MoELoraConfig(**kwargs))


def args(tmp_path, **overrides):
    kwargs = dict(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, num_train_epochs=1, learning_rate=1e-2,
        lr_scheduler_type="constant", save_strategy="no", report_to=[], use_cpu=True, seed=0, logging_steps=1,
        train_sampling_strategy="sequential", weight_decay=0.0,
    )
    kwargs.update(overrides)
    return FederatedMoETrainingArguments(**kwargs)


def router_weight(model):
    return model.base_model.model.model.layers[0].self_attn.q_proj.moe_lora_router["default"]


def test_drop_in_for_existing_trainer_code(tmp_path):
    """Code written for Trainer (plain TrainingArguments, a plain model, evaluate) runs unchanged."""
    for trainer_cls in (Trainer, FederatedMoETrainer):
        model = build_model(tiny_llama_config())
        plain_args = TrainingArguments(
            output_dir=str(tmp_path / trainer_cls.__name__), per_device_train_batch_size=4, max_steps=2,
            report_to=[], use_cpu=True, save_strategy="no",
        )
        trainer = trainer_cls(
            model=model, args=plain_args, train_dataset=token_dataset(8), eval_dataset=token_dataset(4, seed=1),
            data_collator=pad_collator,
        )
        output = trainer.train()
        metrics = trainer.evaluate()
        assert output.global_step == 2 and "eval_loss" in metrics


def test_arguments_parse_with_hf_argument_parser(tmp_path):
    (parsed,) = HfArgumentParser(FederatedMoETrainingArguments).parse_args_into_dataclasses(
        ["--output_dir", str(tmp_path), "--client_id", "hospital_3", "--proximal_mu", "0.01", "--use_cpu", "true"]
    )
    assert parsed.client_id == "hospital_3" and parsed.proximal_mu == 0.01 and parsed.retention_lambda == 0.5
    with pytest.raises(ValueError, match="proximal_mu"):
        FederatedMoETrainingArguments(output_dir=str(tmp_path), proximal_mu=-1.0)


@pytest.mark.parametrize("coef, expect_change", [(1.0, True), (0.0, False)])
def test_aux_loss_reaches_router_gradient(tmp_path, coef, expect_change):
    # B = 0 at init: the task loss does not depend on the router yet, so only the aux / z losses can move it.
    model = moe_model()
    model.set_router_loss_collection(False)  # FederatedMoETrainer turns it back on: it reads them every step
    before = router_weight(model).detach().clone()
    trainer = FederatedMoETrainer(
        model=model, args=args(tmp_path, max_steps=1, moe_lora_aux_loss_coef=coef, moe_lora_z_loss_coef=0.0),
        train_dataset=token_dataset(8), data_collator=pad_collator,
    )
    trainer.train()
    changed = not torch.equal(router_weight(model).detach(), before)
    assert changed == expect_change
    assert any("aux_loss" in entry for entry in trainer.state.log_history)


def test_client_update_is_end_minus_start_and_counts_tokens(tmp_path):
    model = moe_model(init_lora_weights=False)
    data = token_dataset(12)
    trainer = FederatedMoETrainer(
        model=model, args=args(tmp_path, client_id="c1", federated_round=3, num_train_epochs=2),
        train_dataset=data, data_collator=pad_collator,
    )
    start = get_federated_state(model)
    trainer.train()
    end = get_federated_state(model)
    update = trainer.client_update()
    assert isinstance(update, ClientUpdate)
    assert update.client_id == "c1" and update.round == 3 and update.num_samples == 12
    assert set(update.deltas) == set(start)
    for key in start:
        assert torch.equal(update.deltas[key], end[key] - start[key])
    tokens_seen = 2 * sum(len(ids) for ids in data["input_ids"])  # 2 epochs, padding excluded
    assert len(update.activation_counts) == 2 * 7
    for group, counts in update.activation_counts.items():
        assert group in update.expert_groups
        assert int(counts.sum()) == 2 * tokens_seen  # top-2
        torch.testing.assert_close(update.mean_gate[group].sum(), torch.tensor(1.0), atol=1e-5, rtol=0)
    importance = update.importance()
    norms = update.expert_norms()
    for group in importance:
        torch.testing.assert_close(importance[group], norms[group] * update.activation_counts[group].double())
    assert update.metrics["train_loss"] > 0 and "last_aux_loss" in update.metrics

    # evaluation does not add to the routing statistics
    trainer.evaluate(eval_dataset=token_dataset(4, seed=5))
    again = trainer.client_update()
    for group, counts in again.activation_counts.items():
        assert torch.equal(counts, update.activation_counts[group])


def test_client_update_serialises(tmp_path):
    model = moe_model(init_lora_weights=False)
    trainer = FederatedMoETrainer(
        model=model, args=args(tmp_path, max_steps=2), train_dataset=token_dataset(8), data_collator=pad_collator
    )
    trainer.train()
    update = trainer.client_update()
    update.save(tmp_path / "update")
    loaded = ClientUpdate.load(tmp_path / "update")
    assert loaded.client_id == update.client_id and loaded.num_samples == update.num_samples
    for key, value in update.deltas.items():
        assert torch.equal(loaded.deltas[key], value)
    for group, counts in update.activation_counts.items():
        assert torch.equal(loaded.activation_counts[group], counts)


def _train_once(tmp_path, name, batch, accum, aux_coef):
    model = moe_model(init_lora_weights=False)
    trainer = FederatedMoETrainer(
        model=model,
        args=args(tmp_path / name, per_device_train_batch_size=batch, gradient_accumulation_steps=accum, optim="sgd",
                  moe_lora_aux_loss_coef=aux_coef, moe_lora_z_loss_coef=0.0),
        train_dataset=token_dataset(8, min_len=2, max_len=12), data_collator=pad_collator,
    )
    output = trainer.train()
    return output.training_loss, trainer.client_update()


@pytest.mark.parametrize("aux_coef, atol", [(0.0, 1e-6), (0.05, 5e-4)])
def test_gradient_accumulation_matches_large_batch(tmp_path, aux_coef, atol):
    loss_big, update_big = _train_once(tmp_path, "big", batch=8, accum=1, aux_coef=aux_coef)
    loss_acc, update_acc = _train_once(tmp_path, "acc", batch=2, accum=4, aux_coef=aux_coef)
    assert loss_acc == pytest.approx(loss_big, rel=1e-4)
    for key, delta in update_big.deltas.items():
        # the load-balancing loss is a per-micro-batch statistic, so with it the match is close, not exact
        torch.testing.assert_close(update_acc.deltas[key], delta, atol=atol, rtol=1e-3)
    for group, counts in update_big.activation_counts.items():
        assert torch.equal(update_acc.activation_counts[group], counts)


def test_proximal_term_pulls_towards_round_start(tmp_path):
    norms = {}
    for mu in (0.0, 50.0):
        model = moe_model(init_lora_weights=False)
        trainer = FederatedMoETrainer(
            model=model, args=args(tmp_path / str(mu), max_steps=6, proximal_mu=mu),
            train_dataset=token_dataset(24), data_collator=pad_collator,
        )
        trainer.train()
        update = trainer.client_update()
        norms[mu] = sum(float(d.square().sum()) for d in update.deltas.values()) ** 0.5
        if mu:
            assert any("proximal_loss" in entry for entry in trainer.state.log_history)
    assert norms[50.0] < norms[0.0]


def test_base_model_experts_update_and_counts(tmp_path):
    model = build_model(tiny_moe_config("mixtral"))
    trainable = freeze_all_but_base_experts(model)
    assert trainable and all(".mlp.experts." in n for n in trainable)
    data = token_dataset(8)
    trainer = FederatedMoETrainer(
        model=model, args=args(tmp_path, count_base_expert_activations=True), train_dataset=data,
        data_collator=pad_collator,
    )
    trainer.train()
    update = trainer.client_update()
    assert set(update.expert_groups) == {"model.layers.0.mlp.experts", "model.layers.1.mlp.experts"}
    assert not update.shared_keys
    tokens = sum(len(ids) for ids in data["input_ids"])
    for counts in update.activation_counts.values():
        assert counts.shape == (4,) and int(counts.sum()) == 2 * tokens  # Mixtral top-2
    importance = update.importance()
    assert all((c >= 0).all() and c.sum() > 0 for c in importance.values())


def test_start_round_applies_retention(tmp_path):
    from fcmoe_hf.federated import retained_start

    model = moe_model(init_lora_weights=False)
    trainer = FederatedMoETrainer(
        model=model, args=args(tmp_path, max_steps=2, retention_lambda=0.5), train_dataset=token_dataset(8),
        data_collator=pad_collator,
    )
    trainer.train()
    previous = trainer.client_update()
    new_global = {k: v + 0.01 * torch.randn_like(v) for k, v in get_federated_state(model).items()}

    start = trainer.start_round(new_global, previous, federated_round=1)
    expected = retained_start(new_global, previous.deltas, lam=0.5)
    for key, value in get_federated_state(model).items():
        assert torch.equal(value, expected[key]) and torch.equal(start[key], expected[key])
    # experts moved off the global by lambda * R, shared tensors (routers) start at the global
    assert not torch.equal(start["base_model.model.model.layers.0.self_attn.q_proj.moe_lora_A"],
                           new_global["base_model.model.model.layers.0.self_attn.q_proj.moe_lora_A"])
    router_key = "base_model.model.model.layers.0.self_attn.q_proj.moe_lora_router"
    assert torch.equal(start[router_key], new_global[router_key])

    trainer.train()
    update = trainer.client_update()
    assert update.round == 1
    end = get_federated_state(model)
    for key in end:
        assert torch.equal(update.deltas[key], end[key] - expected[key])

    trainer.args.retention_lambda = 0.0
    plain = trainer.start_round(new_global, update)
    assert all(torch.equal(plain[k], new_global[k]) for k in new_global)


def test_mixin_with_trl_sft_trainer(tmp_path):
    trl = pytest.importorskip("trl")
    from dataclasses import dataclass

    from datasets import Dataset

    from fcmoe_hf.trainer import FederatedClientArguments, FederatedMoEMixin

    from .conftest import WORDS, tiny_tokenizer

    @dataclass
    class FederatedSFTConfig(FederatedClientArguments, trl.SFTConfig):
        pass

    class FederatedSFTTrainer(FederatedMoEMixin, trl.SFTTrainer):
        pass

    g = torch.Generator().manual_seed(0)
    texts = [" ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (8,), generator=g)) for _ in range(8)]
    config = FederatedSFTConfig(
        output_dir=str(tmp_path), client_id="sft_client", max_steps=2, per_device_train_batch_size=4, report_to=[],
        use_cpu=True, save_strategy="no", logging_steps=1, max_length=16, moe_lora_aux_loss_coef=0.5,
    )
    model = moe_model(init_lora_weights=False)
    trainer = FederatedSFTTrainer(
        model=model, args=config, train_dataset=Dataset.from_dict({"text": texts}), processing_class=tiny_tokenizer()
    )
    trainer.train()
    update = trainer.client_update()
    assert update.client_id == "sft_client" and update.num_samples == 8
    assert any("aux_loss" in entry for entry in trainer.state.log_history)
    assert all(int(c.sum()) > 0 for c in update.activation_counts.values())


def test_plain_training_arguments_become_federated_arguments(tmp_path):
    """A plain `TrainingArguments` is converted (as TRL's trainers convert theirs): `trainer.args` has the federated
    fields at their documented defaults and every `TrainingArguments` value unchanged, tokens included."""
    from dataclasses import fields

    from fcmoe_hf.trainer import FederatedClientArguments

    plain = TrainingArguments(
        output_dir=str(tmp_path), max_steps=1, learning_rate=3e-3, lr_scheduler_type="cosine", report_to=[],
        use_cpu=True, save_strategy="no", hub_token="secret", per_device_train_batch_size=4,
    )
    for trainer in (
        FederatedMoETrainer(model=moe_model(), args=plain, train_dataset=token_dataset(4), data_collator=pad_collator),
        FederatedMoETrainer(moe_model(), plain, pad_collator, token_dataset(4)),  # positional, as Trainer allows
    ):
        assert isinstance(trainer.args, FederatedMoETrainingArguments)
        for f in fields(FederatedClientArguments):
            assert getattr(trainer.args, f.name) == f.default
        assert trainer.args.hub_token == "secret"
        converted = trainer.args.to_dict()
        assert {k: converted[k] for k in plain.to_dict()} == plain.to_dict()
    trainer.train()
    assert trainer.client_update().client_id == "client_0"
    assert isinstance(FederatedMoETrainer(model=moe_model()).args, FederatedMoETrainingArguments)


def test_mixin_warns_once_about_missing_federated_fields(tmp_path, caplog):
    """The mixin on another trainer whose config lacks the federated fields works with the defaults and says so once,
    naming the fields and the dataclass to combine."""
    import logging

    from transformers import Seq2SeqTrainer, Seq2SeqTrainingArguments

    from fcmoe_hf.trainer import FederatedMoEMixin

    class MixedTrainer(FederatedMoEMixin, Seq2SeqTrainer):
        pass

    other = Seq2SeqTrainingArguments(
        output_dir=str(tmp_path), max_steps=1, report_to=[], use_cpu=True, save_strategy="no",
        per_device_train_batch_size=4,
    )
    with caplog.at_level(logging.WARNING, logger="fcmoe_hf.trainer.trainer"):
        for _ in range(2):
            trainer = MixedTrainer(
                model=moe_model(), args=other, train_dataset=token_dataset(4), data_collator=pad_collator
            )
        # FederatedMoETrainer cannot convert a subclass with fields of its own either: it keeps it and warns too.
        kept = FederatedMoETrainer(model=moe_model(), args=other, train_dataset=token_dataset(4))
    assert kept.args is other
    warnings = [r.getMessage() for r in caplog.records if "no federated client fields" in r.getMessage()]
    assert len(warnings) == 1, warnings
    assert "Seq2SeqTrainingArguments" in warnings[0] and "FederatedClientArguments" in warnings[0]
    assert "proximal_mu" in warnings[0] and "retention_lambda" in warnings[0]
    trainer.train()
    update = trainer.client_update()
    assert update.client_id == "client_0" and update.round == 0


def test_federation_pushes_the_final_round_by_default():
    from transformers import HfArgumentParser
    from transformers.trainer_utils import HubStrategy

    assert FederatedMoETrainingArguments(output_dir="x").hub_strategy == HubStrategy.END
    parsed = HfArgumentParser(FederatedMoETrainingArguments).parse_args_into_dataclasses(["--output_dir", "x"])[0]
    assert parsed.hub_strategy == HubStrategy.END
    assert FederatedMoETrainingArguments(output_dir="x", hub_strategy="every_save").hub_strategy == HubStrategy.EVERY_SAVE
