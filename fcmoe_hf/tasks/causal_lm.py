"""Causal-LM fine-tuning on the texts themselves, evaluated by the mean token loss and perplexity."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional

import numpy as np
import torch
import torch.nn.functional as F
from datasets import Dataset
from transformers import PreTrainedTokenizerBase

from ..data.corpora import TEXT_COLUMN
from .base import Task, register_task
from .common import (
    IGNORE_INDEX,
    check_text_column,
    collated_batches,
    eval_mode,
    get_data_collator,
    model_device,
    special_prefix,
)


def tokenize_for_causal_lm(
    dataset: Dataset,
    tokenizer: PreTrainedTokenizerBase,
    text_column: str = TEXT_COLUMN,
    max_length: int = 256,
    append_eos: bool = True,
    batch_size: int = 1000,
    keep_columns: Sequence[str] = (),
) -> Dataset:
    """Tokenize texts for causal-LM fine-tuning: `labels` equal `input_ids` (the model shifts them).

    Args:
        dataset (`datasets.Dataset`): examples with `text_column`.
        tokenizer (`PreTrainedTokenizerBase`): the model's tokenizer.
        text_column (`str`): column holding the text.
        max_length (`int`): texts are truncated to this many tokens (special tokens included).
        append_eos (`bool`): end every text with EOS so that the model learns where a text ends.
        batch_size (`int`): `Dataset.map` batch size.
        keep_columns (`Sequence[str]`): original columns to keep next to the token columns.

    Returns:
        `datasets.Dataset` with `input_ids`, `attention_mask`, `labels` (and `keep_columns`).
    """
    check_text_column(dataset, text_column)
    prefix = special_prefix(tokenizer)
    eos = [tokenizer.eos_token_id] if append_eos and tokenizer.eos_token_id is not None else []
    budget = max_length - len(prefix) - len(eos)
    if budget < 1:
        raise ValueError(f"max_length={max_length} leaves no room for text after the special tokens")

    def encode(batch: dict[str, list[Any]]) -> dict[str, list[list[int]]]:
        encoded = tokenizer(batch[text_column], add_special_tokens=False, truncation=True, max_length=budget)
        input_ids = [prefix + list(ids) + eos for ids in encoded["input_ids"]]
        return {
            "input_ids": input_ids,
            "attention_mask": [[1] * len(ids) for ids in input_ids],
            "labels": [list(ids) for ids in input_ids],
        }

    remove = [c for c in dataset.column_names if c not in set(keep_columns)]
    return dataset.map(encode, batched=True, batch_size=batch_size, remove_columns=remove, desc="causal LM task")


def causal_lm_loss(
    model: torch.nn.Module,
    dataset: Dataset,
    collator: Any,
    batch_size: int = 16,
) -> dict[str, float]:
    """Mean next-token loss (nats per predicted token) and perplexity of `model` on a tokenized `dataset`.

    Every label that is not -100 counts once, wherever it falls in a batch: the summed token losses over the whole
    dataset are divided by the number of predicted tokens (not a mean of per-batch means).

    Args:
        model (`torch.nn.Module`): a causal LM (or a peft model wrapping one) returning `logits`.
        dataset (`datasets.Dataset`): features with `input_ids`, `attention_mask` and `labels` (as
            [`tokenize_for_causal_lm`] makes them).
        collator: batches the features, padding `labels` with -100 ([`~fcmoe_hf.tasks.get_data_collator`]).
        batch_size (`int`): examples per forward pass.

    Returns:
        `dict[str, float]` with `loss` and `perplexity` (`exp(loss)`, capped at `exp(50)`).
    """
    device = model_device(model)
    total, tokens = 0.0, 0
    with eval_mode(model):
        for batch in collated_batches(dataset, collator, batch_size, device):
            labels = batch.pop("labels")
            logits = model(**batch).logits
            # Position t predicts token t + 1; ignored labels (prompt, padding) drop out of the sum.
            targets = labels[:, 1:]
            summed = F.cross_entropy(
                logits[:, :-1].flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
            )
            total += float(summed)
            tokens += int((targets != IGNORE_INDEX).sum())
    loss = total / max(tokens, 1)
    return {"loss": loss, "perplexity": float(np.exp(min(loss, 50.0)))}


@register_task
class CausalLMTask(Task):
    """Causal-LM fine-tuning on the corpus' texts: the loss is on every token; evaluated by loss and perplexity.

    [`tokenize`] is [`tokenize_for_causal_lm`] and [`evaluate`] tokenizes the raw split the same way and returns
    [`causal_lm_loss`]'s `loss` (mean over predicted tokens) and `perplexity`. Labels are not used.

    Args:
        tokenizer, text_column, max_length: see [`~fcmoe_hf.tasks.Task`] (`label_column`/`label_names` are accepted
            and ignored, so that every task builds from the same arguments).
        append_eos (`bool`): end every text with EOS.
    """

    name = "causal_lm"
    task_type = "CAUSAL_LM"
    headline_metrics = ("loss", "perplexity")

    def __init__(self, tokenizer: Optional[PreTrainedTokenizerBase] = None, *, append_eos: bool = True, **kwargs: Any):
        super().__init__(tokenizer, **kwargs)
        self.append_eos = append_eos

    @property
    def model_card_description(self) -> str:
        return "causal LM"

    def tokenize(self, dataset: Dataset) -> Dataset:
        return tokenize_for_causal_lm(
            dataset, self.tokenizer, text_column=self.text_column, max_length=self.max_length, append_eos=self.append_eos
        )

    def build_data_collator(self):
        return get_data_collator(self.tokenizer)

    def evaluate(self, model: torch.nn.Module, dataset: Dataset, batch_size: int = 16) -> dict[str, float]:
        return causal_lm_loss(model, self.tokenized(dataset), self.data_collator, batch_size=batch_size)
