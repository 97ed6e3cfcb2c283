"""Tests of `fcmoe_hf.data`: bundled corpus, loaders, partitions, task formats, likelihood scoring and metrics.

Everything is built in code or read from the package: no downloads.
"""

from __future__ import annotations

import gzip
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from datasets import ClassLabel, Dataset, DatasetDict
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from fcmoe_hf.data import (
    PartitionConfig,
    available_metrics,
    load_bundled_fortunes,
    load_metric,
    load_text_dataset,
    partition_dataset,
)
from fcmoe_hf.tasks import (
    IGNORE_INDEX,
    CategoryPromptEncoder,
    compute_classification_metrics,
    get_data_collator,
    predict_categories,
    tokenize_for_category_prediction,
    tokenize_for_causal_lm,
)

FORTUNE_CATEGORIES = [
    "computers",
    "drugs",
    "education",
    "food",
    "law",
    "literature",
    "politics",
    "science",
    "startrek",
    "work",
]


# --------------------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def fortunes() -> DatasetDict:
    return load_bundled_fortunes()


_WORDS = (
    "[PAD] [UNK] [EOS] classify the quotation into one of , . : category "
    "law food work beer court judge pizza salary boss a is good very"
).split()


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer built in code: one token per lower-cased word or punctuation mark."""
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(_WORDS)}, unk_token="[UNK]"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", eos_token="[EOS]", unk_token="[UNK]")


@pytest.fixture(scope="module")
def toy_dataset() -> Dataset:
    rows = {
        "text": ["the judge is in court", "a very good pizza", "the boss is a boss", "beer is food"],
        "category": [0, 1, 2, 1],
    }
    return Dataset.from_dict(rows).cast_column("category", ClassLabel(names=["law", "food", "work"]))


# ---------------------------------------------------------------------------------------------- bundled corpus


def test_bundled_fortunes_schema_and_split(fortunes):
    assert set(fortunes) == {"train", "test"}
    for split in fortunes.values():
        assert split.column_names == ["text", "category"]
        assert split.features["category"].names == FORTUNE_CATEGORIES
    train, test = fortunes["train"], fortunes["test"]
    assert 1000 < train.num_rows < 3000 and 200 < test.num_rows < 800
    # Every category is in both splits with a stratified share, and no text is in two places.
    train_counts = np.bincount(train["category"], minlength=10)
    test_counts = np.bincount(test["category"], minlength=10)
    assert (train_counts > 100).all() and (test_counts > 25).all()
    assert np.allclose(test_counts / (train_counts + test_counts), 0.2, atol=0.01)
    texts = list(train["text"]) + list(test["text"])
    assert len(set(texts)) == len(texts)
    assert all(0 < len(t) <= 600 and "\b" not in t and "\t" not in t for t in texts)


def test_bundled_fortunes_reports_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="fortunes_train.jsonl.gz"):
        load_bundled_fortunes(tmp_path)


# ----------------------------------------------------------------------------------------------- generic loader


def _write_jsonl_gz(path, rows):
    with gzip.open(path, "wt", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")


def test_load_text_dataset_from_local_file_renames_and_encodes(tmp_path):
    rows = [{"body": f"text number {i}", "domain": ["news", "sports"][i % 2], "extra": i} for i in range(20)]
    path = tmp_path / "corpus.jsonl.gz"
    _write_jsonl_gz(path, rows)
    corpus = load_text_dataset(str(path), text_column="body", label_column="domain", test_size=0.25, seed=1)
    assert set(corpus) == {"train", "test"}
    assert corpus["train"].column_names == ["text", "category"]
    assert corpus["train"].features["category"].names == ["news", "sports"]
    assert (corpus["train"].num_rows, corpus["test"].num_rows) == (15, 5)
    assert sorted(list(corpus["train"]["text"]) + list(corpus["test"]["text"])) == sorted(r["body"] for r in rows)
    # Labels follow the texts through the encoding.
    truth = {r["body"]: r["domain"] for r in rows}
    names = corpus["test"].features["category"].names
    assert all(truth[t] == names[c] for t, c in zip(list(corpus["test"]["text"]), corpus["test"]["category"]))


def test_load_text_dataset_from_disk_keeps_splits_and_shared_names(tmp_path):
    saved = DatasetDict(
        train=Dataset.from_dict({"sentence": ["a", "b", "c"], "topic": ["x", "y", "x"]}),
        validation=Dataset.from_dict({"sentence": ["d", "e"], "topic": ["z", "y"]}),
    )
    saved.save_to_disk(str(tmp_path / "saved"))
    corpus = load_text_dataset(str(tmp_path / "saved"), text_column="sentence", label_column="topic")
    assert list(corpus["test"]["text"]) == ["d", "e"]  # `validation` becomes the test split
    names = ["x", "y", "z"]
    assert corpus["train"].features["category"].names == names == corpus["test"].features["category"].names
    assert list(corpus["test"]["category"]) == [2, 1]


def test_load_text_dataset_errors_name_the_column(tmp_path):
    path = tmp_path / "corpus.jsonl.gz"
    _write_jsonl_gz(path, [{"text": "a", "label": 0}, {"text": "b", "label": 1}])
    with pytest.raises(ValueError, match="label_column 'domain' not found"):
        load_text_dataset(str(path), label_column="domain")
    with pytest.raises(ValueError, match="text_column 'body' not found"):
        load_text_dataset(str(path), text_column="body", label_column="label")
    with pytest.raises(ValueError, match="pass label_names"):
        load_text_dataset(str(path), label_column="label")
    corpus = load_text_dataset(str(path), label_column="label", label_names=["neg", "pos"], test_size=0.5)
    assert corpus["train"].features["category"].names == ["neg", "pos"]
    with pytest.raises(ValueError, match="split 'dev' not found"):
        load_text_dataset(str(path), label_column="label", label_names=["neg", "pos"], test_split="dev")


# ------------------------------------------------------------------------------------------------- partitioning


def _client_texts(splits):
    return [sorted(list(c["train"]["text"]) + list(c["test"]["text"])) for c in splits]


@pytest.mark.parametrize(
    "config",
    [
        PartitionConfig(num_clients=10, scheme="dirichlet", alpha=0.3, partition_seed=3),
        PartitionConfig(num_clients=10, scheme="pathological", classes_per_client=2, partition_seed=3),
        PartitionConfig(num_clients=7, scheme="iid", partition_seed=3),
    ],
    ids=["dirichlet", "pathological", "iid"],
)
def test_partitions_deterministic_disjoint_and_covering(fortunes, config):
    splits = partition_dataset(fortunes, config)
    again = partition_dataset(fortunes, config)
    assert len(splits) == config.num_clients
    assert _client_texts(splits) == _client_texts(again)
    assert [list(c["train"]["text"]) for c in splits] == [
        list(c["train"]["text"]) for c in again
    ]  # the local splits too
    all_texts = [t for texts in _client_texts(splits) for t in texts]
    assert len(all_texts) == len(set(all_texts))  # disjoint
    assert sorted(all_texts) == sorted(list(fortunes["train"]["text"]))  # together they are the train split
    for client in splits:
        assert client["test"].num_rows == pytest.approx(
            0.2 * (client["train"].num_rows + client["test"].num_rows), abs=1
        )
        assert not set(list(client["train"]["text"])) & set(list(client["test"]["text"]))
    assert list(splits.global_test["text"]) == list(fortunes["test"]["text"])
    assert sum(splits.num_train_examples) == splits.label_counts("train").sum()


def test_partition_seed_changes_assignment(fortunes):
    a = partition_dataset(fortunes, PartitionConfig(num_clients=5, alpha=0.5, partition_seed=1))
    b = partition_dataset(fortunes, PartitionConfig(num_clients=5, alpha=0.5, partition_seed=2))
    assert _client_texts(a) != _client_texts(b)


def test_dirichlet_small_alpha_is_more_skewed(fortunes):
    def mean_max_share(alpha):
        counts = partition_dataset(
            fortunes, PartitionConfig(num_clients=10, alpha=alpha, partition_seed=0)
        ).label_counts()
        return float((counts.max(1) / counts.sum(1)).mean())

    skewed, uniform = mean_max_share(0.1), mean_max_share(100.0)
    assert skewed > 0.4 and uniform < 0.2 and skewed > 2 * uniform


def test_pathological_gives_k_classes_per_client(fortunes):
    splits = partition_dataset(fortunes, PartitionConfig(num_clients=10, scheme="pathological", classes_per_client=3))
    classes_per_client = (splits.label_counts("train") + splits.label_counts("test") > 0).sum(1)
    assert (classes_per_client <= 3).all()


def test_partition_config_validation_and_errors(fortunes):
    with pytest.raises(ValueError, match="scheme"):
        PartitionConfig(scheme="shards")
    with pytest.raises(ValueError, match="local_test_fraction"):
        PartitionConfig(local_test_fraction=1.0)
    unlabeled = DatasetDict(
        train=Dataset.from_dict({"text": ["a", "b"], "category": ["x", "y"]}),
        test=Dataset.from_dict({"text": ["c"], "category": ["x"]}),
    )
    with pytest.raises(ValueError, match="label_column 'category' must be a ClassLabel"):
        partition_dataset(unlabeled, PartitionConfig(num_clients=2))
    with pytest.raises(ValueError, match="label_column 'domain' not found"):
        partition_dataset(fortunes, PartitionConfig(num_clients=2), label_column="domain")


# ------------------------------------------------------------------------------------------------- task formats


def test_task_functions_still_importable_from_data():
    import fcmoe_hf.data as data
    import fcmoe_hf.tasks as tasks

    for name in data._MOVED_TO_TASKS:
        assert getattr(data, name) is getattr(tasks, name)
    from fcmoe_hf.data import evaluate_category_prediction, tokenize_for_causal_lm  # noqa: F401
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        _ = data.nope


def test_category_task_masks_prompt_and_labels_answer(tokenizer, toy_dataset):
    encoded = tokenize_for_category_prediction(toy_dataset, tokenizer, max_length=64)
    assert encoded.column_names == ["input_ids", "attention_mask", "labels"]
    eos = tokenizer.eos_token_id
    names = ["law", "food", "work"]
    for row, label in zip(encoded, toy_dataset["category"]):
        answer = tokenizer(" " + names[label], add_special_tokens=False)["input_ids"] + [eos]
        prompt_len = len(row["input_ids"]) - len(answer)
        assert row["labels"][:prompt_len] == [IGNORE_INDEX] * prompt_len
        assert row["labels"][prompt_len:] == row["input_ids"][prompt_len:] == answer
        assert row["attention_mask"] == [1] * len(row["input_ids"])
        prompt = tokenizer.decode(row["input_ids"][:prompt_len])
        assert prompt.startswith("classify the quotation into one of : law , food , work .")
        assert prompt.endswith("category :")


def test_category_task_truncates_the_text_not_the_answer(tokenizer, toy_dataset):
    long = Dataset.from_dict({"text": ["pizza " * 200], "category": [1]}).cast_column(
        "category", toy_dataset.features["category"]
    )
    row = tokenize_for_category_prediction(long, tokenizer, max_length=32)[0]
    assert len(row["input_ids"]) <= 32
    assert row["input_ids"][-2:] == [tokenizer.convert_tokens_to_ids("food"), tokenizer.eos_token_id]
    assert tokenizer.decode(row["input_ids"]).rstrip().endswith("category : food [EOS]")
    with pytest.raises(ValueError, match="max_length=8 leaves no room"):
        tokenize_for_category_prediction(long, tokenizer, max_length=8)
    with pytest.raises(ValueError, match="label_column 'domain' not found"):
        tokenize_for_category_prediction(long, tokenizer, label_column="domain")


def test_causal_lm_task_and_collator(tokenizer, toy_dataset):
    encoded = tokenize_for_causal_lm(toy_dataset, tokenizer, max_length=4)
    assert encoded[0]["labels"] == encoded[0]["input_ids"]
    assert all(len(ids) <= 4 and ids[-1] == tokenizer.eos_token_id for ids in encoded["input_ids"])
    task = tokenize_for_category_prediction(toy_dataset, tokenizer, max_length=64)
    batch = get_data_collator(tokenizer)([task[i] for i in range(task.num_rows)])
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    lengths = [len(ids) for ids in task["input_ids"]]
    short = int(np.argmin(lengths))
    # Padding is -100 in the labels even though EOS ends every answer.
    assert (batch["labels"][short, lengths[short] :] == IGNORE_INDEX).all()
    assert (batch["attention_mask"][short, lengths[short] :] == 0).all()


# ---------------------------------------------------------------------------------------- likelihood scoring


class _BagOfWordsLM(torch.nn.Module):
    """A causal LM whose next-token logits are a sum over the tokens so far: `logits_t = sum_{s<=t} W[x_s]`.

    `W[keyword, answer] = 5` makes an answer likely after a text containing its keyword, so the right class is known.
    It returns no KV cache, which exercises the full-sequence scoring path.
    """

    def __init__(self, vocab_size: int, boosts: dict[int, int]):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(vocab_size, vocab_size), requires_grad=False)
        for keyword, answer in boosts.items():
            self.weight.data[keyword, answer] = 5.0

    def forward(self, input_ids, attention_mask, position_ids=None, logits_to_keep=0, **kwargs):
        contributions = self.weight[input_ids] * attention_mask[..., None]
        logits = contributions.cumsum(dim=1)
        if logits_to_keep:
            logits = logits[:, -logits_to_keep:]
        return SimpleNamespace(logits=logits, past_key_values=None)


def test_likelihood_classifier_picks_the_keyword_class(tokenizer, toy_dataset):
    ids = tokenizer.convert_tokens_to_ids
    model = _BagOfWordsLM(
        len(tokenizer),
        {ids("judge"): ids("law"), ids("pizza"): ids("food"), ids("beer"): ids("food"), ids("boss"): ids("work")},
    )
    out = predict_categories(model, tokenizer, toy_dataset, batch_size=3)
    assert out.log_likelihoods.shape == (4, 3)
    assert out.predictions.tolist() == out.references.tolist() == [0, 1, 2, 1]
    # "judge" once: logit 5 on "law", 0 elsewhere, after the prompt and after either answer (answers boost nothing).
    log_z = np.log(len(tokenizer) - 1 + np.exp(5.0))
    np.testing.assert_allclose(out.log_likelihoods[0], [5 - 2 * log_z, -2 * log_z, -2 * log_z], atol=1e-4)


def _tiny_llama(vocab_size: int) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    return LlamaForCausalLM(config).eval()


def _reference_scores(model, encoder, texts):
    """Unbatched, unpadded log-likelihood of every answer: the definition the fast paths must match."""
    scores = np.zeros((len(texts), len(encoder.answer_ids)))
    for i, prompt in enumerate(encoder.encode_prompts(texts)):
        for c, answer in enumerate(encoder.answer_ids):
            ids = torch.tensor([prompt + answer])
            with torch.no_grad():
                logprobs = torch.log_softmax(model(input_ids=ids).logits[0].float(), dim=-1)
            positions = torch.arange(len(prompt) - 1, len(prompt) + len(answer) - 1)
            scores[i, c] = logprobs[positions, torch.tensor(answer)].sum().item()
    return scores


@pytest.mark.parametrize("use_cache", [True, False], ids=["kv-cache", "full"])
def test_likelihood_scoring_on_tiny_llama_matches_reference(tokenizer, toy_dataset, use_cache):
    model = _tiny_llama(len(tokenizer))
    encoder = CategoryPromptEncoder(tokenizer, ["law", "food", "work"], max_length=64)
    expected = _reference_scores(model, encoder, toy_dataset["text"])
    calls = []
    hook = model.register_forward_pre_hook(
        lambda _, args, kwargs: calls.append(tuple(kwargs["input_ids"].shape)), with_kwargs=True
    )
    out = predict_categories(model, tokenizer, toy_dataset, batch_size=3, use_cache=use_cache)  # a padded batch
    hook.remove()
    prompt_lengths = sorted((len(p) for p in encoder.encode_prompts(toy_dataset["text"])), reverse=True)
    if use_cache:  # per batch: the prompts once, then one token (answer + EOS) for every (prompt, candidate) pair
        assert calls == [(3, prompt_lengths[0]), (9, 1), (1, prompt_lengths[3]), (3, 1)]
    else:  # per batch: every prompt + candidate sequence
        assert calls == [(9, prompt_lengths[0] + 2), (3, prompt_lengths[3] + 2)]
    assert out.log_likelihoods.shape == (4, 3)
    np.testing.assert_allclose(out.log_likelihoods, expected, atol=1e-4)
    assert out.predictions.tolist() == expected.argmax(1).tolist()
    assert not model.training


def test_likelihood_scoring_multi_token_answers_and_length_norm(tokenizer, toy_dataset):
    # "very good" and "a" are multi-token and single-token answers (plus EOS) of different lengths.
    model = _tiny_llama(len(tokenizer))
    names = ["very good", "a", "beer is food"]
    encoder = CategoryPromptEncoder(tokenizer, names, max_length=64)
    expected = _reference_scores(model, encoder, toy_dataset["text"])
    cached = predict_categories(model, tokenizer, toy_dataset, label_names=names, batch_size=4)
    full = predict_categories(model, tokenizer, toy_dataset, label_names=names, batch_size=2, use_cache=False)
    np.testing.assert_allclose(cached.log_likelihoods, expected, atol=1e-4)
    np.testing.assert_allclose(full.log_likelihoods, expected, atol=1e-4)
    normed = predict_categories(model, tokenizer, toy_dataset, label_names=names, length_normalize=True)
    np.testing.assert_allclose(normed.log_likelihoods, expected / np.array([3, 2, 4]), atol=1e-4)
    # First-token scoring equals the likelihood of the answers' first tokens alone.
    first = predict_categories(model, tokenizer, toy_dataset, label_names=names, first_token_only=True)
    firsts = CategoryPromptEncoder(tokenizer, names, max_length=64, append_eos=False)
    firsts.answer_ids = [answer[:1] for answer in firsts.answer_ids]
    np.testing.assert_allclose(first.log_likelihoods, _reference_scores(model, firsts, toy_dataset["text"]), atol=1e-4)
    with pytest.raises(ValueError, match=r"categories \['very good', 'very well'\] share"):
        predict_categories(
            model, tokenizer, toy_dataset, label_names=["very good", "very well", "a"], first_token_only=True
        )


# ------------------------------------------------------------------------------------------------------ metrics


def test_shipped_metrics_compute_known_values():
    assert available_metrics() == ["accuracy", "f1", "precision", "recall"]
    references, predictions = [0, 0, 1, 1, 2, 2], [0, 1, 1, 1, 2, 0]
    # Per class (tp, fp, fn): 0 -> (1, 1, 1), 1 -> (2, 1, 0), 2 -> (1, 0, 1).
    assert load_metric("accuracy").compute(predictions=predictions, references=references) == {"accuracy": 4 / 6}
    precision = load_metric("precision")
    recall = load_metric("recall")
    f1 = load_metric("f1")
    assert precision.compute(predictions=predictions, references=references)["precision"] == pytest.approx(
        (0.5 + 2 / 3 + 1) / 3
    )
    assert recall.compute(predictions=predictions, references=references)["recall"] == pytest.approx(
        (0.5 + 1 + 0.5) / 3
    )
    assert f1.compute(predictions=predictions, references=references)["f1"] == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)
    assert f1.compute(predictions=predictions, references=references, average="micro")["f1"] == pytest.approx(4 / 6)
    assert recall.compute(predictions=predictions, references=references, average=None)["recall"] == [0.5, 1.0, 0.5]
    # A class absent from both sides counts as zero in the macro average only when listed in `labels`.
    with_absent = precision.compute(predictions=predictions, references=references, labels=[0, 1, 2, 3])
    assert with_absent["precision"] == pytest.approx((0.5 + 2 / 3 + 1 + 0) / 4)
    with pytest.raises(ValueError, match="unknown metric 'bleu'"):
        load_metric("bleu")


def test_compute_classification_metrics_over_all_classes():
    results = compute_classification_metrics([0, 1, 1], [0, 1, 0], num_classes=3)
    assert results["accuracy"] == pytest.approx(2 / 3)
    assert results["precision"] == pytest.approx((1 + 0.5 + 0) / 3)
    assert results["recall"] == pytest.approx((0.5 + 1 + 0) / 3)
    assert results["f1"] == pytest.approx((2 / 3 + 2 / 3 + 0) / 3)
