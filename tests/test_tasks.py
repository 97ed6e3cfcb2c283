"""`fcmoe_hf.tasks`: the registry and the category / causal-LM tasks, trained and evaluated on tiny models."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from datasets import ClassLabel, Dataset
from peft import get_peft_model

from fcmoe_hf import MoELoraConfig
from fcmoe_hf.tasks import (
    CategoryPredictionTask,
    CausalLMTask,
    SequenceClassificationTask,
    Task,
    available_tasks,
    build_task,
    evaluate_category_prediction,
    get_task_class,
    register_task,
)
from fcmoe_hf.tasks import base as task_base
from fcmoe_hf.trainer import FederatedMoETrainer, FederatedMoETrainingArguments

from .conftest import build_model, tiny_llama_config, tiny_tokenizer

LABELS = ["w1", "w2", "w3"]


def keyword_dataset(num_rows: int = 12, seed: int = 0) -> Dataset:
    """Texts of random words `w10..w59` with the class's keyword (`w4`, `w5`, `w6`) in them."""
    rng = np.random.default_rng(seed)
    texts, labels = [], []
    for i in range(num_rows):
        label = i % len(LABELS)
        words = [f"w{w}" for w in rng.integers(10, 60, size=int(rng.integers(2, 7)))]
        words.insert(int(rng.integers(0, len(words) + 1)), f"w{4 + label}")
        texts.append(" ".join(words))
        labels.append(label)
    return Dataset.from_dict({"text": texts, "category": labels}).cast_column("category", ClassLabel(names=LABELS))


def training_args(tmp_path, **overrides) -> FederatedMoETrainingArguments:
    kwargs = dict(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, max_steps=2, learning_rate=1e-2,
        lr_scheduler_type="constant", save_strategy="no", report_to=[], use_cpu=True, seed=0, logging_steps=1,
        weight_decay=0.0, disable_tqdm=True,
    )
    kwargs.update(overrides)
    return FederatedMoETrainingArguments(**kwargs)


def moe_causal_lm(task: Task, seed: int = 0):
    config = MoELoraConfig(task_type=task.task_type, r=4, num_experts=4, top_k=2, init_lora_weights=False)
    return get_peft_model(build_model(tiny_llama_config(), seed=seed), config)


# ------------------------------------------------------------------------------------------------------ registry


def test_registry_builds_every_task_by_name():
    assert {"category", "causal_lm", "sequence_classification"} <= set(available_tasks())
    tokenizer = tiny_tokenizer()
    for name, cls in [
        ("category", CategoryPredictionTask),
        ("causal_lm", CausalLMTask),
        ("sequence_classification", SequenceClassificationTask),
    ]:
        task = build_task(name, tokenizer=tokenizer, label_names=LABELS, label_column="category", max_length=32)
        assert type(task) is cls and get_task_class(name) is cls and task.name == name
        assert task.headline_metrics and task.model_card_description
        assert task.tokenizer is tokenizer and task.max_length == 32
    assert build_task("sequence_classification").task_type == "SEQ_CLS"
    assert build_task("category").task_type == build_task("causal_lm").task_type == "CAUSAL_LM"
    with pytest.raises(ValueError, match=r"unknown task 'nope'; available tasks: category, causal_lm"):
        build_task("nope")
    with pytest.raises(ValueError, match="has no tokenizer yet"):
        build_task("causal_lm").tokenize(keyword_dataset())


def test_register_task_adds_a_task_and_refuses_clashes(monkeypatch):
    monkeypatch.setattr(task_base, "_REGISTRY", dict(task_base._REGISTRY))

    @register_task
    class Echo(CausalLMTask):
        name = "echo"
        headline_metrics = ("loss",)

    assert "echo" in available_tasks() and isinstance(build_task("echo", max_length=8), Echo)
    with pytest.raises(ValueError, match="'echo' is already registered"):
        register_task(type("Other", (CausalLMTask,), {"name": "echo"}))
    with pytest.raises(ValueError, match="needs a non-empty `name`"):
        register_task(type("Nameless", (CausalLMTask,), {"name": ""}))
    with pytest.raises(TypeError, match="expects a Task subclass"):
        register_task(object)


# ------------------------------------------------------------------------------------------------ category task


def test_category_task_trains_and_evaluates(tmp_path):
    data = keyword_dataset()
    task = build_task("category", tokenizer=tiny_tokenizer(), label_column="category", max_length=48)
    features = task.tokenize(data)
    assert features.column_names == ["input_ids", "attention_mask", "labels"]
    batch = task.data_collator([features[i] for i in range(3)])
    assert batch["labels"].shape == batch["input_ids"].shape
    model = moe_causal_lm(task)
    trainer = FederatedMoETrainer(
        model=model, args=training_args(tmp_path), train_dataset=features, data_collator=task.data_collator
    )
    trainer.train()
    assert math.isfinite(trainer.state.log_history[-1]["train_loss"])
    model.train()
    metrics = task.evaluate(model, data, batch_size=5)
    assert set(metrics) == {"accuracy", "precision", "recall", "f1"}
    assert set(task.headline_metrics) <= set(metrics)
    assert all(0.0 <= v <= 1.0 for v in metrics.values())
    assert model.training  # restored
    # The task is the function with the task's settings: same numbers.
    expected = evaluate_category_prediction(
        model, task.tokenizer, data, label_column="category", max_length=48, batch_size=3
    )
    assert metrics == pytest.approx(expected)


# ----------------------------------------------------------------------------------------------- causal-LM task


def _reference_lm_loss(model, features) -> float:
    """Unbatched, unpadded: summed next-token losses over all examples / number of predicted tokens."""
    total, count = 0.0, 0
    with torch.no_grad():
        for row in features:
            ids = torch.tensor([row["input_ids"]])
            logprobs = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), dim=-1)
            targets = torch.tensor(row["labels"][1:])
            total -= logprobs[torch.arange(len(targets)), targets].sum().item()
            count += len(targets)
    return total / count


def test_causal_lm_task_trains_and_evaluates_exactly_in_batches(tmp_path):
    data = keyword_dataset(10)
    task = build_task("causal_lm", tokenizer=tiny_tokenizer(), max_length=8)
    features = task.tokenize(data)
    assert features.column_names == ["input_ids", "attention_mask", "labels"]
    model = moe_causal_lm(task)
    FederatedMoETrainer(
        model=model, args=training_args(tmp_path), train_dataset=features, data_collator=task.data_collator
    ).train()
    model.eval()
    expected = _reference_lm_loss(model, features)
    moe = model.base_model
    moe.reset_routing_statistics()
    metrics = task.evaluate(model, data, batch_size=3)  # padded batches, a short last batch
    assert metrics["loss"] == pytest.approx(expected, rel=1e-5)
    assert metrics["perplexity"] == pytest.approx(math.exp(expected), rel=1e-5)
    assert tuple(metrics) == task.headline_metrics == ("loss", "perplexity")
    assert moe.routing_statistics() == {}  # evaluation is not routing activity
    assert task.evaluate(model, data, batch_size=10)["loss"] == pytest.approx(expected, rel=1e-5)
