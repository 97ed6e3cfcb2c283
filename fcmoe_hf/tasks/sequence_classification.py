"""Text classification with a classification head (`AutoModelForSequenceClassification`) on an encoder or a decoder.

The head is new (randomly initialised) on a pretrained base. With `MoELoraConfig(task_type="SEQ_CLS")` peft trains and
saves it in full (`modules_to_save`), so it is part of the federated state: averaged like any tensor shared by all
experts, while the MoE-LoRA experts inside the transformer layers are merged expert by expert.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional

import numpy as np
import torch
from datasets import Dataset
from transformers import AutoModelForSequenceClassification, DataCollatorWithPadding, PreTrainedTokenizerBase

from ..data.corpora import LABEL_COLUMN, TEXT_COLUMN
from .base import Task, register_task
from .common import (
    check_text_column,
    collated_batches,
    compute_classification_metrics,
    eval_mode,
    label_names_of,
    model_device,
    require_pad_token,
)


def tokenize_for_sequence_classification(
    dataset: Dataset,
    tokenizer: PreTrainedTokenizerBase,
    text_column: str = TEXT_COLUMN,
    label_column: str = LABEL_COLUMN,
    max_length: int = 256,
    batch_size: int = 1000,
    keep_columns: Sequence[str] = (),
) -> Dataset:
    """Tokenize texts for a classification head: the tokenizer's own format (special tokens, `token_type_ids`),
    truncated to `max_length` tokens, and `labels` = the class id.

    Args:
        dataset (`datasets.Dataset`): examples with `text_column` and `label_column` (integer class ids).
        tokenizer (`PreTrainedTokenizerBase`): the model's tokenizer.
        text_column (`str`), label_column (`str`): the text and class-id columns.
        max_length (`int`): texts are truncated to this many tokens (special tokens included).
        batch_size (`int`): `Dataset.map` batch size.
        keep_columns (`Sequence[str]`): original columns to keep next to the token columns.

    Returns:
        `datasets.Dataset` with `input_ids`, `attention_mask` (and `token_type_ids` for BERT-style tokenizers),
        `labels` (and `keep_columns`).
    """
    check_text_column(dataset, text_column)
    if label_column not in dataset.column_names:
        raise ValueError(f"label_column {label_column!r} not found; available columns: {dataset.column_names}")

    def encode(batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
        encoded = dict(tokenizer(batch[text_column], truncation=True, max_length=max_length))
        encoded["labels"] = [int(label) for label in batch[label_column]]
        return encoded

    remove = [c for c in dataset.column_names if c not in set(keep_columns)]
    return dataset.map(encode, batched=True, batch_size=batch_size, remove_columns=remove, desc="classification task")


def predict_classes(
    model: torch.nn.Module, dataset: Dataset, collator: Any, batch_size: int = 16
) -> tuple[np.ndarray, np.ndarray]:
    """`(predictions, references)`: the argmax of `model`'s logits and the `labels` of a tokenized `dataset`."""
    device = model_device(model)
    predictions, references = [], []
    with eval_mode(model):
        for batch in collated_batches(dataset, collator, batch_size, device):
            references.append(batch.pop("labels").cpu())
            predictions.append(model(**batch).logits.argmax(-1).cpu())
    if not predictions:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    return torch.cat(predictions).numpy().astype(np.int64), torch.cat(references).numpy().astype(np.int64)


@register_task
class SequenceClassificationTask(Task):
    """Text classification with `AutoModelForSequenceClassification`: cross-entropy on the head's logits.

    Works with encoders (BERT, MiniLM: the head reads the pooled `[CLS]` state) and decoders (a `score` head on the last
    non-padding token, which needs `model.config.pad_token_id`; [`load_model`] sets it from the tokenizer). Training
    features are the tokenized texts with `labels` = class id, batched by `DataCollatorWithPadding`; [`evaluate`]
    predicts the argmax of the logits in batches and returns accuracy and macro precision/recall/F1 over all classes.

    Args:
        tokenizer, text_column, label_column, label_names, max_length: see [`~fcmoe_hf.tasks.Task`]. [`load_model`]
            needs `label_names` (the head's size); elsewhere they default to the `ClassLabel` names of the data.
    """

    name = "sequence_classification"
    task_type = "SEQ_CLS"
    auto_model_class = AutoModelForSequenceClassification
    headline_metrics = ("accuracy", "f1")

    @property
    def model_card_description(self) -> str:
        classes = f" over {len(self.label_names)} classes" if self.label_names else ""
        return f"sequence classification{classes} (classification head, trained in full)"

    def model_kwargs(self) -> dict[str, Any]:
        if not self.label_names:
            raise ValueError("the sequence_classification task needs label_names to size the classification head")
        return {
            "num_labels": len(self.label_names),
            "id2label": dict(enumerate(self.label_names)),
            "label2id": {name: i for i, name in enumerate(self.label_names)},
        }

    def tokenize(self, dataset: Dataset) -> Dataset:
        return tokenize_for_sequence_classification(
            dataset, self.tokenizer, self.text_column, self.label_column, max_length=self.max_length
        )

    def build_data_collator(self) -> DataCollatorWithPadding:
        require_pad_token(self.tokenizer)
        return DataCollatorWithPadding(self.tokenizer)

    def num_classes(self, dataset: Optional[Dataset] = None) -> int:
        """Number of classes: of `label_names`, else of `dataset`'s `ClassLabel` column."""
        if self.label_names is not None:
            return len(self.label_names)
        if dataset is None:
            raise ValueError("no label_names: pass a dataset with a ClassLabel label column")
        return len(label_names_of(dataset, self.label_column, None))

    def evaluate(self, model: torch.nn.Module, dataset: Dataset, batch_size: int = 16) -> dict[str, float]:
        num_classes = self.num_classes(dataset)
        predictions, references = predict_classes(model, self.tokenized(dataset), self.data_collator, batch_size)
        return compute_classification_metrics(predictions, references, num_classes)
