"""Task formats on a text/category corpus: causal-LM fine-tuning and instruction-style category prediction.

- [`tokenize_for_causal_lm`]: the text itself, loss on every token.
- [`tokenize_for_category_prediction`]: `"Classify the quotation into one of: a, b, c.\\nQuotation: ...\\nCategory:"`
  followed by the answer `" <category>"` (and EOS); the prompt's labels are `-100`, so the loss is on the answer only.
- [`predict_categories`] / [`evaluate_category_prediction`]: accuracy without generation. Every candidate category's
  continuation is scored by its log-likelihood after the prompt and the argmax is the prediction, the multiple-choice
  protocol of lm-evaluation-harness. The prompt is run once per example and its KV cache is shared by all candidates.

Training and scoring build the prompt token ids with the same function, so what the model is trained to continue is
exactly what is scored. Both tokenizations produce `input_ids`, `attention_mask` and `labels`; batch them with
[`get_data_collator`] (transformers' `DataCollatorForSeq2Seq`, which pads `labels` with -100).
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch
from datasets import ClassLabel, Dataset
from transformers import DataCollatorForSeq2Seq, PreTrainedTokenizerBase
from transformers.modeling_outputs import CausalLMOutputWithPast

from .corpora import LABEL_COLUMN, TEXT_COLUMN
from .metrics import load_metric

#: Default prompt of the category prediction task. `{choices}` becomes the comma-separated category names and
#: `{text}` the (truncated) text; the answer `" <category>"` follows the prompt.
DEFAULT_CATEGORY_TEMPLATE = "Classify the quotation into one of: {choices}.\nQuotation: {text}\nCategory:"

IGNORE_INDEX = -100


def _label_names(dataset: Dataset, label_column: str, label_names: Optional[Sequence[str]]) -> list[str]:
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


def _check_text_column(dataset: Dataset, text_column: str) -> None:
    if text_column not in dataset.column_names:
        raise ValueError(f"text_column {text_column!r} not found; available columns: {dataset.column_names}")


def _special_prefix(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Special tokens the tokenizer puts before a text (e.g. BOS), so that pieces tokenized separately get them once."""
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    without = tokenizer("a", add_special_tokens=False)["input_ids"]
    for start in range(len(with_special) - len(without) + 1):
        if with_special[start : start + len(without)] == without:
            return list(with_special[:start])
    return []


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
        self._head_ids = _special_prefix(tokenizer) + self._encode(stripped)
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
    _check_text_column(dataset, text_column)
    names = _label_names(dataset, label_column, label_names)
    encoder = CategoryPromptEncoder(tokenizer, names, template, max_length, append_eos)

    def encode(batch: dict[str, list[Any]]) -> dict[str, list[list[int]]]:
        prompts = encoder.encode_prompts(batch[text_column])
        answers = [encoder.answer_ids[label] for label in batch[label_column]]
        input_ids = [prompt + answer for prompt, answer in zip(prompts, answers)]
        labels = [[IGNORE_INDEX] * len(prompt) + answer for prompt, answer in zip(prompts, answers)]
        return {"input_ids": input_ids, "attention_mask": [[1] * len(ids) for ids in input_ids], "labels": labels}

    remove = [c for c in dataset.column_names if c not in set(keep_columns)]
    return dataset.map(encode, batched=True, batch_size=batch_size, remove_columns=remove, desc="category task")


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
    _check_text_column(dataset, text_column)
    prefix = _special_prefix(tokenizer)
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


def get_data_collator(
    tokenizer: PreTrainedTokenizerBase, pad_to_multiple_of: Optional[int] = None
) -> DataCollatorForSeq2Seq:
    """The collator for both task formats: transformers' `DataCollatorForSeq2Seq`, padding `labels` with -100.

    It pads `input_ids`/`attention_mask` with the tokenizer (on `tokenizer.padding_side`) and `labels` with -100, so
    padding never enters the loss, even when the pad token is the EOS token that ends every answer.

    Args:
        tokenizer (`PreTrainedTokenizerBase`): the model's tokenizer; needs a pad token.
        pad_to_multiple_of (`int`, *optional*): pad lengths to a multiple of this (e.g. 8 for tensor cores).
    """
    if tokenizer.pad_token_id is None:
        raise ValueError(
            "the tokenizer has no pad token (tokenizer.pad_token is None); set one first, e.g. "
            "`tokenizer.pad_token = tokenizer.eos_token` (labels are padded with -100, so this does not mask EOS)"
        )
    return DataCollatorForSeq2Seq(
        tokenizer, padding=True, pad_to_multiple_of=pad_to_multiple_of, label_pad_token_id=IGNORE_INDEX
    )


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


def _model_device(model: torch.nn.Module) -> torch.device:
    device = getattr(model, "device", None)
    return device if isinstance(device, torch.device) else next(model.parameters()).device


def _left_pad(sequences: list[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    length = max(map(len, sequences))
    ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, length - len(seq) :] = torch.tensor(seq, dtype=torch.long)
        mask[row, length - len(seq) :] = 1
    return ids.to(device), mask.to(device)


def _positions(mask: torch.Tensor) -> torch.Tensor:
    # Explicit positions make left padding exact for absolute-position models too (RoPE alone would not need it).
    return (mask.cumsum(-1) - 1).clamp(min=0)


def _right_pad(sequences: list[list[int]], pad_id: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[row, : len(seq)] = 1
    return ids, mask


def _cache_kwarg(model: torch.nn.Module) -> str:
    """Name of the forward argument that takes a KV cache: `cache` since transformers 5.2x, `past_key_values` before."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft wrappers take **kwargs
    parameters = inspect.signature(base.forward).parameters
    if "cache" in parameters:
        return "cache"
    if "past_key_values" in parameters:
        return "past_key_values"
    return "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


def _output_cache(out: Any) -> Any:
    # Read the field directly: the `past_key_values` alias of new transformers versions logs a deprecation warning.
    fields = vars(out)
    return fields.get("cache", fields.get("past_key_values"))


def _score_with_cache(
    model: torch.nn.Module, prompts: list[list[int]], answers: list[list[int]], pad_id: int, device: torch.device
) -> Optional[torch.Tensor]:
    """Summed answer log-probabilities `(B, C)`: the prompt runs once, its KV cache is repeated per candidate."""
    num_rows, num_candidates = len(prompts), len(answers)
    ids, mask = _left_pad(prompts, pad_id, device)
    out = model(input_ids=ids, attention_mask=mask, position_ids=_positions(mask), use_cache=True, logits_to_keep=1)
    first = torch.log_softmax(out.logits[:, -1].float(), dim=-1)
    scores = first[:, [answer[0] for answer in answers]]
    longest = max(map(len, answers))
    if longest == 1:
        return scores
    cache = _output_cache(out)
    if cache is None or not hasattr(cache, "batch_repeat_interleave"):
        return None
    cache.batch_repeat_interleave(num_candidates)  # row b * C + c continues prompt b with candidate c
    inputs, input_mask = _right_pad([a[:-1] for a in answers], pad_id, longest - 1)
    targets, target_mask = _right_pad([a[1:] for a in answers], 0, longest - 1)
    inputs, input_mask = inputs.repeat(num_rows, 1).to(device), input_mask.repeat(num_rows, 1).to(device)
    targets, target_mask = targets.repeat(num_rows, 1).to(device), target_mask.repeat(num_rows, 1).to(device)
    full_mask = torch.cat([mask.repeat_interleave(num_candidates, dim=0), input_mask], dim=1)
    start = mask.sum(-1).repeat_interleave(num_candidates)[:, None]
    positions = start + torch.arange(longest - 1, device=device)[None, :]
    out = model(
        input_ids=inputs,
        attention_mask=full_mask,
        position_ids=positions,
        use_cache=True,
        **{_cache_kwarg(model): cache},
    )
    logprobs = torch.log_softmax(out.logits.float(), dim=-1)
    token_scores = logprobs.gather(-1, targets[..., None]).squeeze(-1) * target_mask
    return scores + token_scores.sum(-1).view(num_rows, num_candidates)


def _score_full(
    model: torch.nn.Module, prompts: list[list[int]], answers: list[list[int]], pad_id: int, device: torch.device
) -> torch.Tensor:
    """Summed answer log-probabilities `(B, C)` from one pass over every prompt + candidate sequence."""
    num_rows, num_candidates = len(prompts), len(answers)
    longest = max(map(len, answers))
    sequences = [prompt + answer for prompt in prompts for answer in answers]
    ids, mask = _left_pad(sequences, pad_id, device)
    # Left padding puts every answer at the end: the last `longest + 1` logits cover all answer tokens.
    out = model(input_ids=ids, attention_mask=mask, position_ids=_positions(mask), logits_to_keep=longest + 1)
    logprobs = torch.log_softmax(out.logits[:, :longest].float(), dim=-1)
    targets = ids[:, -longest:]
    token_scores = logprobs.gather(-1, targets[..., None]).squeeze(-1)
    lengths = torch.tensor([len(a) for a in answers], device=device).repeat(num_rows)
    valid = torch.arange(longest, device=device)[None, :] >= (longest - lengths)[:, None]
    return (token_scores * valid).sum(-1).view(num_rows, num_candidates)


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
    `batch_size * num_classes`. The model is put in eval mode for the call and restored afterwards.

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
    _check_text_column(dataset, text_column)
    names = _label_names(dataset, label_column, label_names)
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
    device = _model_device(model)
    was_training = model.training
    model.eval()
    prompts = encoder.encode_prompts(dataset[text_column])
    # Batches of similar length waste little compute on padding; scores are put back in dataset order.
    order = sorted(range(len(prompts)), key=lambda i: (-len(prompts[i]), i))
    log_likelihoods = np.zeros((len(prompts), len(answers)), dtype=np.float32)
    try:
        with torch.inference_mode():
            for start in range(0, len(order), batch_size):
                rows = order[start : start + batch_size]
                batch = [prompts[i] for i in rows]
                batch_scores = _score_with_cache(model, batch, answers, pad_id, device) if use_cache else None
                if batch_scores is None:
                    batch_scores = _score_full(model, batch, answers, pad_id, device)
                log_likelihoods[rows] = batch_scores.cpu().numpy()
    finally:
        model.train(was_training)
    if length_normalize:
        log_likelihoods = log_likelihoods / np.array([len(a) for a in answers], dtype=np.float32)[None, :]
    return CategoryPredictions(
        predictions=log_likelihoods.argmax(-1).astype(np.int64),
        references=np.asarray(dataset[label_column], dtype=np.int64),
        log_likelihoods=log_likelihoods,
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
