"""Corpora with a text column and a domain (label) column, as `datasets.DatasetDict`s with `train` and `test` splits.

Two sources:

- [`load_bundled_fortunes`]: the real, licensed extract of the Debian `fortunes` package that ships inside this
  package (`data/bundled/`, built by `python scripts/build_fortunes.py`); needs no network.
- [`load_text_dataset`]: any Hugging Face dataset with a text column and a label column: a directory written by
  `save_to_disk`, local data files (JSON/JSONL/CSV/Parquet, plain or compressed), or a Hub id where the Hub is reachable.

Both return the canonical schema `{"text": Value("string"), "category": ClassLabel}` that the partitioners and task
formats of `fcmoe_hf.data` use by default.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any, Optional, Union

import datasets
from datasets import ClassLabel, Dataset, DatasetDict, Features, Value
from transformers.utils import logging

logger = logging.get_logger(__name__)

#: Name of the text column in the canonical schema.
TEXT_COLUMN = "text"
#: Name of the domain/label column in the canonical schema (a `ClassLabel`).
LABEL_COLUMN = "category"

BUNDLED_DIR = Path(__file__).resolve().parent / "bundled"

_DATA_FILE_BUILDERS = {
    ".json": "json",
    ".jsonl": "json",
    ".csv": "csv",
    ".tsv": "csv",
    ".parquet": "parquet",
    ".arrow": "arrow",
}
_COMPRESSION_SUFFIXES = {".gz", ".bz2", ".xz", ".zst", ".zip"}


def _read_jsonl_gz(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        raise FileNotFoundError(
            f"bundled corpus file {str(path)!r} is missing: reinstall fcmoe_hf or rebuild it with "
            "`python scripts/build_fortunes.py`"
        )
    rows = []
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            row = json.loads(line)
            for key in (TEXT_COLUMN, LABEL_COLUMN):
                if key not in row:
                    raise ValueError(f"{path.name}, line {line_number}: field {key!r} is missing")
            rows.append(row)
    return rows


def load_bundled_fortunes(bundled_dir: Optional[Union[str, Path]] = None) -> DatasetDict:
    """Load the bundled extract of the Debian `fortunes` package (10 topical categories, train/test).

    The data ships inside the package, so this needs neither the Hub nor the Debian package. See
    `data/bundled/FORTUNES_SOURCE.md` for the source version, licence, categories and counts.

    Args:
        bundled_dir (`str` or `Path`, *optional*): directory holding `fortunes_train.jsonl.gz` and
            `fortunes_test.jsonl.gz`; defaults to the copy inside the package.

    Returns:
        `datasets.DatasetDict`: splits `train` and `test`, features `text` (`string`) and `category` (`ClassLabel`
        whose names are the sorted category names).

    Example:

    ```py
    >>> from fcmoe_hf.data import load_bundled_fortunes
    >>> corpus = load_bundled_fortunes()
    >>> corpus["train"].features["category"].names[:3]
    ['computers', 'drugs', 'education']
    ```
    """
    directory = Path(bundled_dir) if bundled_dir is not None else BUNDLED_DIR
    train_rows = _read_jsonl_gz(directory / "fortunes_train.jsonl.gz")
    test_rows = _read_jsonl_gz(directory / "fortunes_test.jsonl.gz")
    names = sorted({row[LABEL_COLUMN] for row in train_rows})
    unknown = sorted({row[LABEL_COLUMN] for row in test_rows} - set(names))
    if unknown:
        raise ValueError(f"fortunes_test.jsonl.gz has categories absent from the train split: {unknown}")
    features = Features({TEXT_COLUMN: Value("string"), LABEL_COLUMN: ClassLabel(names=names)})

    def to_dataset(rows: list[dict[str, Any]]) -> Dataset:
        columns = {
            TEXT_COLUMN: [row[TEXT_COLUMN] for row in rows],
            LABEL_COLUMN: [names.index(row[LABEL_COLUMN]) for row in rows],
        }
        return Dataset.from_dict(columns, features=features)

    return DatasetDict(train=to_dataset(train_rows), test=to_dataset(test_rows))


def _data_file_builder(path: Path) -> str:
    suffixes = [s.lower() for s in path.suffixes]
    while suffixes and suffixes[-1] in _COMPRESSION_SUFFIXES:
        suffixes.pop()
    if not suffixes or suffixes[-1] not in _DATA_FILE_BUILDERS:
        raise ValueError(
            f"cannot tell the format of data file {str(path)!r}: expected one of "
            f"{sorted(_DATA_FILE_BUILDERS)} (optionally compressed)"
        )
    return _DATA_FILE_BUILDERS[suffixes[-1]]


def _load_any(name_or_path: str, config_name: Optional[str], **load_kwargs: Any) -> Union[Dataset, DatasetDict]:
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
            return datasets.load_from_disk(str(path))
        return datasets.load_dataset(str(path), config_name, **load_kwargs)
    if path.is_file():
        builder = _data_file_builder(path)
        extra = {"delimiter": "\t"} if builder == "csv" and ".tsv" in [s.lower() for s in path.suffixes] else {}
        return datasets.load_dataset(builder, data_files=str(path), **extra, **load_kwargs)
    try:
        return datasets.load_dataset(name_or_path, config_name, **load_kwargs)
    except Exception as error:  # the Hub/offline errors vary; keep the cause and say what was tried
        raise ValueError(
            f"could not load dataset {name_or_path!r}: it is not a local path, and loading it as a Hub dataset "
            f"failed ({type(error).__name__}: {error})"
        ) from error


def _check_columns(dataset: Dataset, split: str, columns: dict[str, str]) -> None:
    for role, column in columns.items():
        if column not in dataset.column_names:
            raise ValueError(
                f"{role} {column!r} not found in split {split!r}; available columns: {dataset.column_names}"
            )


def load_text_dataset(
    name_or_path: str,
    text_column: str = TEXT_COLUMN,
    label_column: str = LABEL_COLUMN,
    config_name: Optional[str] = None,
    train_split: str = "train",
    test_split: Optional[str] = None,
    test_size: float = 0.2,
    label_names: Optional[list[str]] = None,
    seed: int = 0,
    **load_kwargs: Any,
) -> DatasetDict:
    """Load any dataset with a text column and a domain/label column into the canonical `text`/`category` schema.

    Args:
        name_or_path (`str`): a directory written by `Dataset.save_to_disk`/`DatasetDict.save_to_disk`, a directory
            of data files, a single data file (`.json`, `.jsonl`, `.csv`, `.tsv`, `.parquet`, `.arrow`, optionally
            compressed), or a Hub dataset id (needs a reachable Hub).
        text_column (`str`): column holding the text.
        label_column (`str`): column holding the domain/label (strings, integers or a `ClassLabel`).
        config_name (`str`, *optional*): dataset configuration for Hub datasets or loading scripts.
        train_split (`str`): split used as `train`.
        test_split (`str`, *optional*): split used as `test`. `None` takes `test`, else `validation`, if present;
            otherwise a seeded `test_size` share of the train split becomes the test split, stratified by label
            when every class has enough examples for it.
        test_size (`float`): share of the train split held out when the dataset has no test split.
        label_names (`list[str]`, *optional*): names of the classes in label order. Required to name integer labels
            that are not a `ClassLabel`; for string labels it fixes the class order (default: sorted).
        seed (`int`): seed of the held-out split.
        load_kwargs: passed to `datasets.load_dataset` (e.g. `revision`, `cache_dir`).

    Returns:
        `datasets.DatasetDict`: splits `train` and `test` with exactly the columns `text` (`string`) and `category`
        (`ClassLabel`, the same names in both splits). Other columns are dropped.

    Raises:
        `ValueError`: a column or split is missing (the message names it and lists what exists), or labels do not
        match `label_names`.
    """
    loaded = _load_any(name_or_path, config_name, **load_kwargs)
    if isinstance(loaded, Dataset):
        loaded = DatasetDict({train_split: loaded})
    if not isinstance(loaded, DatasetDict):
        raise ValueError(f"{name_or_path!r} loaded as {type(loaded).__name__}; expected a Dataset or DatasetDict")
    if train_split not in loaded:
        raise ValueError(f"split {train_split!r} not found in {name_or_path!r}; available splits: {list(loaded)}")
    if test_split is None:
        test_split = next((s for s in ("test", "validation") if s in loaded and s != train_split), None)
    elif test_split not in loaded:
        raise ValueError(f"split {test_split!r} not found in {name_or_path!r}; available splits: {list(loaded)}")

    columns = {"text_column": text_column, "label_column": label_column}
    splits = {"train": loaded[train_split]}
    if test_split is not None:
        splits["test"] = loaded[test_split]
    for name, split in splits.items():
        _check_columns(split, train_split if name == "train" else test_split, columns)
        splits[name] = split.select_columns([text_column, label_column])

    names = _class_names(splits, label_column, label_names)
    for name, split in splits.items():
        split = _encode_labels(split, label_column, names)
        if text_column != TEXT_COLUMN:
            split = split.rename_column(text_column, TEXT_COLUMN)
        if label_column != LABEL_COLUMN:
            split = split.rename_column(label_column, LABEL_COLUMN)
        splits[name] = split.cast_column(TEXT_COLUMN, Value("string"))

    if "test" not in splits:
        if not 0.0 < test_size < 1.0:
            raise ValueError(f"test_size must be in (0, 1), got {test_size}")
        try:
            held_out = splits["train"].train_test_split(
                test_size=test_size, seed=seed, stratify_by_column=LABEL_COLUMN
            )
        except ValueError as error:
            # datasets refuses to stratify when a class has a single example or the test share is smaller than
            # the number of classes; a plain seeded split is the best that such data allows.
            logger.warning(f"stratified train/test split impossible ({error}); splitting without stratification")
            held_out = splits["train"].train_test_split(test_size=test_size, seed=seed)
        splits = {"train": held_out["train"], "test": held_out["test"]}
    return DatasetDict(splits)


def _class_names(splits: dict[str, Dataset], label_column: str, label_names: Optional[list[str]]) -> list[str]:
    feature = splits["train"].features[label_column]
    if isinstance(feature, ClassLabel):
        if label_names is not None and list(label_names) != list(feature.names):
            raise ValueError(
                f"label_names {label_names} differ from the ClassLabel names of {label_column!r}: {feature.names}"
            )
        return list(feature.names)
    values = set()
    for split in splits.values():
        values.update(split.unique(label_column))
    if None in values:
        raise ValueError(f"label_column {label_column!r} has missing (None) values")
    if all(isinstance(v, str) for v in values):
        if label_names is None:
            return sorted(values)
        missing = sorted(values - set(label_names))
        if missing:
            raise ValueError(f"label_column {label_column!r} has values not in label_names: {missing}")
        return list(label_names)
    if all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        if label_names is None:
            raise ValueError(
                f"label_column {label_column!r} holds integers without class names: pass label_names (the name of "
                "class 0, 1, ...) so that prompts can name the categories"
            )
        out_of_range = sorted(v for v in values if not 0 <= v < len(label_names))
        if out_of_range:
            raise ValueError(
                f"label_column {label_column!r} has values {out_of_range} outside range(len(label_names)) = "
                f"range({len(label_names)})"
            )
        return list(label_names)
    raise ValueError(
        f"label_column {label_column!r} must hold strings, integers or a ClassLabel; found "
        f"{sorted({type(v).__name__ for v in values})}"
    )


def _encode_labels(split: Dataset, label_column: str, names: list[str]) -> Dataset:
    feature = split.features[label_column]
    target = ClassLabel(names=names)
    if isinstance(feature, ClassLabel):
        if list(feature.names) != names:
            raise ValueError(f"splits disagree on the ClassLabel names of {label_column!r}")
        return split
    if feature.dtype == "string":
        index = {name: i for i, name in enumerate(names)}
        split = split.map(
            lambda batch: {label_column: [index[v] for v in batch[label_column]]},
            batched=True,
            features=Features({**split.features, label_column: target}),
            desc=f"encoding {label_column}",
        )
        return split
    return split.cast_column(label_column, target)
