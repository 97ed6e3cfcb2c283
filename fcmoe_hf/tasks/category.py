"""Instruction-style category prediction with a causal LM, scored by likelihood (no generation).

- [`tokenize_for_category_prediction`]: `"Classify the quotation into one of: a, b, c.\\nQuotation: ...\\nCategory:"`
  followed by the answer `" <category>"` (and EOS); the prompt's labels are `-100`, so the loss is on the answer only.
- [`predict_categories`] / [`evaluate_category_prediction`]: accuracy without generation. Every candidate category's
  continuation is scored by its log-likelihood after the prompt and the argmax is the prediction, the multiple-choice
  protocol of lm-evaluation-harness. The prompt is run once per example and its KV cache is shared by all candidates.
- [`CategoryPredictionTask`]: the registered `"category"` [`~fcmoe_hf.tasks.Task`] built on them.

Training and scoring build the prompt token ids with the same function, so what the model is trained to continue is
exactly what is scored. Batch the training features with [`~fcmoe_hf.tasks.get_data_collator`].
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch
from datasets import Dataset
from transformers import PreTrainedTokenizerBase

from ..data.corpora import LABEL_COLUMN, TEXT_COLUMN
from ._likelihood import score_full, score_with_cache
from .base import Task, register_task
from .common import (
    IGNORE_INDEX,
    check_text_column,
    compute_classification_metrics,
    eval_mode,
    get_data_collator,
    label_names_of,
    model_device,
    special_prefix,
)

#: Default prompt of the category prediction task. `{choices}` becomes the comma-separated category names and
#: `{text}` the (truncated) text; the answer `" <category>"` follows the prompt.
DEFAULT_CATEGORY_TEMPLATE = "Classify the quotation into one of: {choices}.\nQuotation: {text}\nCategory:"


class CategoryPromptEncoder:
    """Tokenizes category-prediction prompts and answers; shared by training and scoring so both see the same ids.

    The prompt is `template` with `{choices}` filled in and `{text}` the example's text. The pieces around the text
    are tokenized once; the texts are tokenized in one batched call with truncation to the room left by
    `max_length` (the answer's room included), so only the text is ever cut, never the instruction or the answer.
    Whitespace just before `{text}` is moved onto the text, and answers are `" " + name`, so the token boundaries
    are those of natural text for BPE tokenizers.

    Args:
        tokenizer (`PreTrainedTokenizerBase`): the model's tokenizer.
        label_names (`Sequence[str]`): the category names, in label order.
        template (`str`): the prompt template; must contain `{text}` exactly once.
        max_length (`int`): maximum length in tokens of prompt plus answer (plus EOS).
        append_eos (`bool`): end every answer with the tokenizer's EOS token (when it has one); this teaches the
            model to stop and lets scoring tell apart categories whose names are prefixes of one another.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        label_names: Sequence[str],
        template: str = DEFAULT_CATEGORY_TEMPLATE,
        max_length: int = 256,
        append_eos: bool = True,
    ) -> None:
        if template.count("{text}") != 1:
            raise ValueError(f"template must contain '{{text}}' exactly once, got {template!r}")
        if len(label_names) < 2:
            raise ValueError(f"label_names needs at least two categories, got {list(label_names)}")
        self.tokenizer = tokenizer
        self.label_names = list(label_names)
        choices = ", ".join(self.label_names)
        head, _, tail = template.partition("{text}")
        head, tail = head.replace("{choices}", choices), tail.replace("{choices}", choices)
        stripped = head.rstrip(" ")
        self._text_prefix = head[len(stripped) :]
        self._head_ids = special_prefix(tokenizer) + self._encode(stripped)
        self._tail_ids = self._encode(tail)
        eos = [tokenizer.eos_token_id] if append_eos and tokenizer.eos_token_id is not None else []
        #: Token ids of every category's answer (`" <name>"` plus EOS), in label order.
        self.answer_ids: list[list[int]] = [self._encode(" " + name) + eos for name in self.label_names]
        if any(len(ids) == 0 for ids in self.answer_ids):
            raise ValueError("a category name tokenizes to no tokens; check label_names")
        self.max_length = max_length
        self.text_budget = max_length - len(self._head_ids) - len(self._tail_ids) - max(map(len, self.answer_ids))
        if self.text_budget < 1:
            raise ValueError(
                f"max_length={max_length} leaves no room for the text: the prompt template takes "
                f"{len(self._head_ids) + len(self._tail_ids)} tokens and the longest answer "
                f"{max(map(len, self.answer_ids))}; raise max_length or shorten the template/category names"
            )

    def _encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []

    def encode_prompts(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of the prompts for `texts` (texts truncated to fit `max_length` with any answer)."""
        texts = [self._text_prefix + text for text in texts]
        encoded = self.tokenizer(texts, add_special_tokens=False, truncation=True, max_length=self.text_budget)[
            "input_ids"
        ]
        return [self._head_ids + list(ids) + self._tail_ids for ids in encoded]


def tokenize_for_category_prediction(
    dataset: Dataset,
    tokenizer: PreTrainedTokenizerBase,
    text_column: str = TEXT_COLUMN,
    label_column: str = LABEL_COLUMN,
    label_names: Optional[Sequence[str]] = None,
    template: str = DEFAULT_CATEGORY_TEMPLATE,
    max_length: int = 256,
    append_eos: bool = True,
    batch_size: int = 1000,
    keep_columns: Sequence[str] = (),
) -> Dataset:
    """Tokenize an instruction-style category prediction task: the loss is on the answer tokens only.

    Every example becomes `prompt + " <category>" (+ EOS)`; `labels` are `-100` on the prompt and equal to
    `input_ids` on the answer. Only the text is truncated, so that the whole sequence fits `max_length`.

    Args:
        dataset (`datasets.Dataset`): examples with `text_column` and `label_column`.
        tokenizer (`PreTrainedTokenizerBase`): the model's tokenizer.
        text_column (`str`): column holding the text.
        label_column (`str`): column holding the class id (a `ClassLabel` unless `label_names` is given).
        label_names (`Sequence[str]`, *optional*): category names in label order; defaults to the `ClassLabel` names.
        template (`str`): prompt template with `{choices}` and `{text}` ([`DEFAULT_CATEGORY_TEMPLATE`]).
        max_length (`int`): maximum sequence length in tokens.
        append_eos (`bool`): end the answer with EOS (see [`CategoryPromptEncoder`]).
        batch_size (`int`): `Dataset.map` batch size.
        keep_columns (`Sequence[str]`): original columns to keep next to the token columns (e.g. the label column
            for per-class statistics); the others are removed.

    Returns:
        `datasets.Dataset` with `input_ids`, `attention_mask`, `labels` (and `keep_columns`).
    """
    check_text_column(dataset, text_column)
    names = label_names_of(dataset, label_column, label_names)
    encoder = CategoryPromptEncoder(tokenizer, names, template, max_length, append_eos)

    def encode(batch: dict[str, list[Any]]) -> dict[str, list[list[int]]]:
        prompts = encoder.encode_prompts(batch[text_column])
        answers = [encoder.answer_ids[label] for label in batch[label_column]]
        input_ids = [prompt + answer for prompt, answer in zip(prompts, answers)]
        labels = [[IGNORE_INDEX] * len(prompt) + answer for prompt, answer in zip(prompts, answers)]
        return {"input_ids": input_ids, "attention_mask": [[1] * len(ids) for ids in input_ids], "labels": labels}

    remove = [c for c in dataset.column_names if c not in set(keep_columns)]
    return dataset.map(encode, batched=True, batch_size=batch_size, remove_columns=remove, desc="category task")


@dataclass
class CategoryPredictions:
    """Output of [`predict_categories`].

    Args:
        predictions (`np.ndarray`): predicted class ids, shape `(N,)`.
        references (`np.ndarray`): the dataset's class ids, shape `(N,)`.
        log_likelihoods (`np.ndarray`): score of every candidate, shape `(N, num_classes)`: the summed (or, with
            `length_normalize`, per-token mean) log-probability of its answer tokens after the prompt.
    """

    predictions: np.ndarray
    references: np.ndarray
    log_likelihoods: np.ndarray


def predict_categories(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    dataset: Dataset,
    text_column: str = TEXT_COLUMN,
    label_column: str = LABEL_COLUMN,
    label_names: Optional[Sequence[str]] = None,
    template: str = DEFAULT_CATEGORY_TEMPLATE,
    max_length: int = 256,
    append_eos: bool = True,
    batch_size: int = 8,
    length_normalize: bool = False,
    use_cache: bool = True,
    first_token_only: bool = False,
) -> CategoryPredictions:
    """Predict categories without generation: the candidate whose answer is most likely after the prompt wins.

    For every example the prompt (exactly as [`tokenize_for_category_prediction`] builds it) is scored against every
    category's answer `" <name>"` (+ EOS): the sum of the answer tokens' log-probabilities. With `use_cache` the
    prompt runs once and its KV cache is repeated for the candidates' remaining tokens, so a batch costs one prompt
    pass plus one short pass instead of `num_classes` prompt passes; memory for the cache grows with
    `batch_size * num_classes`. The model is put in eval mode for the call and restored afterwards; MoE-LoRA routing
    statistics are not recorded.

    Args:
        model (`torch.nn.Module`): a causal LM (a `transformers` model, or a `peft` model wrapping one) whose forward
            takes `input_ids`, `attention_mask`, `position_ids`, `logits_to_keep` (and `past_key_values`).
        tokenizer (`PreTrainedTokenizerBase`): its tokenizer.
        dataset (`datasets.Dataset`): raw examples with `text_column` and `label_column`.
        text_column (`str`), label_column (`str`), label_names (`Sequence[str]`, *optional*), template (`str`),
        max_length (`int`), append_eos (`bool`): as in [`tokenize_for_category_prediction`]; use the same values as
            for training.
        batch_size (`int`): prompts per forward pass.
        length_normalize (`bool`): score by the mean instead of the sum of the answer's token log-probabilities
            (lm-evaluation-harness' `acc_norm`-like variant; it removes the bias towards short category names).
        use_cache (`bool`): share the prompt's KV cache among candidates; `False` runs every prompt + candidate
            sequence in full (slower, for models without a cache).
        first_token_only (`bool`): score only the first token of every answer: one prompt pass with last-token
            logits and no continuation pass (about a third cheaper on the bundled corpus), the usual shortcut of
            multiple-choice evaluation. Needs the categories' first tokens to differ; the default scores the whole
            answer (its EOS included), which is the exact likelihood.

    Returns:
        [`CategoryPredictions`]: predictions, references and the `(N, num_classes)` candidate scores.
    """
    check_text_column(dataset, text_column)
    names = label_names_of(dataset, label_column, label_names)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    encoder = CategoryPromptEncoder(tokenizer, names, template, max_length, append_eos)
    answers = encoder.answer_ids
    if first_token_only:
        firsts = [answer[0] for answer in answers]
        clashes = sorted({names[i] for i, t in enumerate(firsts) if firsts.count(t) > 1})
        if clashes:
            raise ValueError(f"first_token_only needs distinct first tokens, but categories {clashes} share theirs")
        answers = [[token] for token in firsts]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0  # padded positions are masked
    device = model_device(model)
    prompts = encoder.encode_prompts(dataset[text_column])
    # Batches of similar length waste little compute on padding; scores are put back in dataset order.
    order = sorted(range(len(prompts)), key=lambda i: (-len(prompts[i]), i))
    log_likelihoods = np.zeros((len(prompts), len(answers)), dtype=np.float32)
    with eval_mode(model):
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            batch = [prompts[i] for i in rows]
            batch_scores = score_with_cache(model, batch, answers, pad_id, device) if use_cache else None
            if batch_scores is None:
                batch_scores = score_full(model, batch, answers, pad_id, device)
            log_likelihoods[rows] = batch_scores.cpu().numpy()
    if length_normalize:
        log_likelihoods = log_likelihoods / np.array([len(a) for a in answers], dtype=np.float32)[None, :]
    return CategoryPredictions(
        predictions=log_likelihoods.argmax(-1).astype(np.int64),
        references=np.asarray(dataset[label_column], dtype=np.int64),
        log_likelihoods=log_likelihoods,
    )


def evaluate_category_prediction(
    model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, dataset: Dataset, **kwargs: Any
) -> dict[str, float]:
    """Score `model` on `dataset`'s category prediction task: accuracy and macro precision, recall and F1.

    Args:
        model (`torch.nn.Module`), tokenizer (`PreTrainedTokenizerBase`), dataset (`datasets.Dataset`): see
            [`predict_categories`].
        kwargs: passed to [`predict_categories`] (`label_column`, `batch_size`, `max_length`, ...).

    Returns:
        `dict[str, float]` with `accuracy`, `precision`, `recall`, `f1` (macro over all the task's categories).
    """
    out = predict_categories(model, tokenizer, dataset, **kwargs)
    num_classes = out.log_likelihoods.shape[1]
    return compute_classification_metrics(out.predictions, out.references, num_classes)


@register_task
class CategoryPredictionTask(Task):
    """Instruction-style category prediction with a causal LM: trained on the answer tokens, scored by likelihood.

    [`tokenize`] is [`tokenize_for_category_prediction`], [`evaluate`] is [`evaluate_category_prediction`] (accuracy
    and macro precision/recall/F1 over all categories), both with the task's columns, category names, template and
    `max_length`, so training and scoring see the same prompts.

    Args:
        tokenizer, text_column, label_column, label_names, max_length: see [`~fcmoe_hf.tasks.Task`].
        template (`str`): the prompt template ([`DEFAULT_CATEGORY_TEMPLATE`]).
        append_eos (`bool`): end every answer with EOS (see [`CategoryPromptEncoder`]).
        length_normalize (`bool`), use_cache (`bool`), first_token_only (`bool`): scoring options of
            [`predict_categories`].
    """

    name = "category"
    task_type = "CAUSAL_LM"
    headline_metrics = ("accuracy", "f1")

    def __init__(
        self,
        tokenizer: Optional[PreTrainedTokenizerBase] = None,
        *,
        template: str = DEFAULT_CATEGORY_TEMPLATE,
        append_eos: bool = True,
        length_normalize: bool = False,
        use_cache: bool = True,
        first_token_only: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(tokenizer, **kwargs)
        if template.count("{text}") != 1:
            raise ValueError(f"template must contain '{{text}}' exactly once, got {template!r}")
        self.template = template
        self.append_eos = append_eos
        self.scoring = {"length_normalize": length_normalize, "use_cache": use_cache, "first_token_only": first_token_only}

    @property
    def model_card_description(self) -> str:
        return "category prediction (instruction-style, scored by likelihood)"

    def _format(self) -> dict[str, Any]:
        return {
            "text_column": self.text_column,
            "label_column": self.label_column,
            "label_names": self.label_names,
            "template": self.template,
            "max_length": self.max_length,
            "append_eos": self.append_eos,
        }

    def tokenize(self, dataset: Dataset) -> Dataset:
        return tokenize_for_category_prediction(dataset, self.tokenizer, **self._format())

    def build_data_collator(self):
        return get_data_collator(self.tokenizer)

    def evaluate(self, model: torch.nn.Module, dataset: Dataset, batch_size: int = 16) -> dict[str, float]:
        return evaluate_category_prediction(
            model, self.tokenizer, dataset, batch_size=batch_size, **self._format(), **self.scoring
        )
