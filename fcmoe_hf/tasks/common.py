"""Helpers shared by the tasks: label/column checks, the seq2seq-style collator, batched evaluation and metrics."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Optional

import torch
from datasets import ClassLabel, Dataset
from transformers import DataCollatorForSeq2Seq, PreTrainedTokenizerBase

from ..data.metrics import load_metric
from ..tuners.moe_lora import MoELoraModel

#: Label value that the loss ignores (`torch.nn.CrossEntropyLoss`' default `ignore_index`).
IGNORE_INDEX = -100


def label_names_of(dataset: Dataset, label_column: str, label_names: Optional[Sequence[str]]) -> list[str]:
    """`label_names` if given, else the names of `dataset`'s `ClassLabel` column `label_column`."""
    if label_column not in dataset.column_names:
        raise ValueError(f"label_column {label_column!r} not found; available columns: {dataset.column_names}")
    if label_names is not None:
        return list(label_names)
    feature = dataset.features[label_column]
    if not isinstance(feature, ClassLabel):
        raise ValueError(
            f"label_column {label_column!r} is not a ClassLabel ({feature}); pass label_names explicitly or load the "
            "corpus with load_text_dataset"
        )
    return list(feature.names)


def check_text_column(dataset: Dataset, text_column: str) -> None:
    if text_column not in dataset.column_names:
        raise ValueError(f"text_column {text_column!r} not found; available columns: {dataset.column_names}")


def special_prefix(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Special tokens the tokenizer puts before a text (e.g. BOS), so that pieces tokenized separately get them once."""
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    without = tokenizer("a", add_special_tokens=False)["input_ids"]
    for start in range(len(with_special) - len(without) + 1):
        if with_special[start : start + len(without)] == without:
            return list(with_special[:start])
    return []


def require_pad_token(tokenizer: PreTrainedTokenizerBase) -> None:
    if tokenizer.pad_token_id is None:
        raise ValueError(
            "the tokenizer has no pad token (tokenizer.pad_token is None); set one first, e.g. "
            "`tokenizer.pad_token = tokenizer.eos_token` (labels are padded with -100, so this does not mask EOS)"
        )


def get_data_collator(
    tokenizer: PreTrainedTokenizerBase, pad_to_multiple_of: Optional[int] = None
) -> DataCollatorForSeq2Seq:
    """The collator of the causal-LM formats: transformers' `DataCollatorForSeq2Seq`, padding `labels` with -100.

    It pads `input_ids`/`attention_mask` with the tokenizer (on `tokenizer.padding_side`) and `labels` with -100, so
    padding never enters the loss, even when the pad token is the EOS token that ends every answer.

    Args:
        tokenizer (`PreTrainedTokenizerBase`): the model's tokenizer; needs a pad token.
        pad_to_multiple_of (`int`, *optional*): pad lengths to a multiple of this (e.g. 8 for tensor cores).
    """
    require_pad_token(tokenizer)
    return DataCollatorForSeq2Seq(
        tokenizer, padding=True, pad_to_multiple_of=pad_to_multiple_of, label_pad_token_id=IGNORE_INDEX
    )


def compute_classification_metrics(
    predictions: Sequence[int], references: Sequence[int], num_classes: int
) -> dict[str, float]:
    """Accuracy and macro precision/recall/F1 over all `num_classes` classes, with the shipped `evaluate` metrics.

    Classes absent from both predictions and references still count in the macro averages (as zero), so that a
    client's local test set and the global test set are scored over the same class set.
    """
    labels = list(range(num_classes))
    results = dict(load_metric("accuracy").compute(predictions=predictions, references=references))
    for name in ("precision", "recall", "f1"):
        results.update(load_metric(name).compute(predictions=predictions, references=references, labels=labels))
    return results


def model_device(model: torch.nn.Module) -> torch.device:
    device = getattr(model, "device", None)
    return device if isinstance(device, torch.device) else next(model.parameters()).device


@contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Eval mode, no autograd and no MoE-LoRA routing statistics for the block; all restored afterwards.

    Evaluation must not count as routing activity: FC-MoE's expert importance uses the counts of local training.
    `no_grad` rather than `inference_mode`: the model trains again afterwards, and a buffer a forward creates or updates
    lazily under `inference_mode` could not be updated in place outside it.
    """
    tuner = getattr(model, "base_model", None)
    context = getattr(tuner, "routing_context", None) if isinstance(tuner, MoELoraModel) else None
    tracking = context.track_statistics if context is not None else None
    was_training = model.training
    model.eval()
    if context is not None:
        context.track_statistics = False
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)
        if context is not None:
            context.track_statistics = tracking


def collated_batches(
    dataset: Dataset, collator: Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]], batch_size: int,
    device: torch.device,
) -> Iterator[dict[str, torch.Tensor]]:
    """`dataset`'s rows in order, `batch_size` at a time, collated and moved to `device`."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    for start in range(0, dataset.num_rows, batch_size):
        columns = dataset[start : start + batch_size]
        rows = [dict(zip(columns, values)) for values in zip(*columns.values())]
        yield {key: value.to(device) for key, value in collator(rows).items()}
