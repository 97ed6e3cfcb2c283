"""Non-IID partitioning of a corpus into federated clients with `flwr-datasets` partitioners.

The train split is divided among clients by a `flwr_datasets.partitioner` (Dirichlet label skew, pathological
k-domains-per-client, or IID); every client's partition is then split, seeded, into the client's own `train` and local
`test` sets. The corpus' test split, which no client trains on, is the global test set over all domains.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Literal, Optional

import numpy as np
from datasets import ClassLabel, Dataset, DatasetDict
from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner, Partitioner, PathologicalPartitioner

from .corpora import LABEL_COLUMN

_SCHEMES = ("dirichlet", "pathological", "iid")
_ASSIGNMENT_MODES = ("first-deterministic", "deterministic", "random")


@dataclass
class PartitionConfig:
    """How a corpus is divided among federated clients (a dataclass that `transformers.HfArgumentParser` reads).

    Args:
        num_clients (`int`): number of clients (partitions of the train split).
        scheme (`str`): `"dirichlet"` (per class, the class's examples are divided among clients with proportions
            drawn from Dir(alpha), as in FC-MoE and PFL-MoE), `"pathological"` (each client holds examples of
            exactly `classes_per_client` classes) or `"iid"` (a seeded shuffle cut into equal shards).
        alpha (`float`): Dirichlet concentration; small values (0.1) give strongly skewed clients, large values
            (100) nearly IID ones. Used by `"dirichlet"` only.
        classes_per_client (`int`): number of classes per client for `"pathological"`.
        class_assignment_mode (`str`): how `"pathological"` assigns classes to clients: `"first-deterministic"`
            (client i gets class i mod C plus random others, so every class is used when `num_clients >= C`; the
            setting of Li et al. 2022), `"deterministic"` (classes i..i+k-1 mod C) or `"random"` (may leave classes
            unused; their examples then belong to no client).
        self_balancing (`bool`): Dirichlet only: stop giving examples to a client once it holds more than the
            average share (flwr-datasets' option; it makes sizes more even and the skew less than alpha suggests).
        min_partition_size (`int`): Dirichlet only: redraw the proportions (at most 10 times, then fail) until
            every client has at least this many examples. Must leave room for the local test split.
        local_test_fraction (`float`): share of every client's partition held out as its local test set.
        partition_seed (`int`): seed of the partitioner, of the IID shuffle and of the per-client splits (named apart
            from `TrainingArguments.seed` so that both parse in one `HfArgumentParser`).
    """

    num_clients: int = field(default=10, metadata={"help": "Number of federated clients."})
    scheme: Literal["dirichlet", "pathological", "iid"] = field(
        default="dirichlet",
        metadata={"help": "Partitioning scheme over the label column: dirichlet, pathological or iid."},
    )
    alpha: float = field(
        default=0.1, metadata={"help": "Dirichlet concentration (smaller = more skewed); dirichlet only."}
    )
    classes_per_client: int = field(
        default=2, metadata={"help": "Number of classes each client holds; pathological only."}
    )
    class_assignment_mode: Literal["first-deterministic", "deterministic", "random"] = field(
        default="first-deterministic",
        metadata={"help": "How pathological assigns classes to clients (flwr-datasets' class_assignment_mode)."},
    )
    self_balancing: bool = field(
        default=False,
        metadata={"help": "Dirichlet: stop filling a client once it exceeds the average size (flwr-datasets)."},
    )
    min_partition_size: int = field(
        default=10,
        metadata={
            "help": "Dirichlet: resample (up to 10 times, then fail) until every client has this many examples."
        },
    )
    local_test_fraction: float = field(
        default=0.2, metadata={"help": "Share of each client's partition held out as its local test set."}
    )
    partition_seed: int = field(
        default=42, metadata={"help": "Seed of the partitioning and of the per-client splits."}
    )

    def __post_init__(self) -> None:
        if self.num_clients < 1:
            raise ValueError(f"num_clients must be >= 1, got {self.num_clients}")
        if self.scheme not in _SCHEMES:
            raise ValueError(f"scheme must be one of {_SCHEMES}, got {self.scheme!r}")
        if not self.alpha > 0:
            raise ValueError(f"alpha must be > 0, got {self.alpha}")
        if self.classes_per_client < 1:
            raise ValueError(f"classes_per_client must be >= 1, got {self.classes_per_client}")
        if self.class_assignment_mode not in _ASSIGNMENT_MODES:
            raise ValueError(
                f"class_assignment_mode must be one of {_ASSIGNMENT_MODES}, got {self.class_assignment_mode!r}"
            )
        if self.min_partition_size < 0:
            raise ValueError(f"min_partition_size must be >= 0, got {self.min_partition_size}")
        if not 0.0 < self.local_test_fraction < 1.0:
            raise ValueError(f"local_test_fraction must be in (0, 1), got {self.local_test_fraction}")


@dataclass
class ClientSplits:
    """The federated view of a corpus: one `DatasetDict(train, test)` per client plus the global test set.

    Args:
        clients (`list[datasets.DatasetDict]`): client `i`'s local `train` and local `test` sets.
        global_test (`datasets.Dataset`): the corpus' test split, over all domains; no client trains on it.
        label_column (`str`): the column the partition is over.
        label_names (`list[str]`): class names of `label_column`, in label order.
        config (`PartitionConfig`): the configuration that produced the partition.
    """

    clients: list[DatasetDict]
    global_test: Dataset
    label_column: str
    label_names: list[str]
    config: PartitionConfig

    def __len__(self) -> int:
        return len(self.clients)

    def __getitem__(self, client_id: int) -> DatasetDict:
        return self.clients[client_id]

    def __iter__(self):
        return iter(self.clients)

    @property
    def num_clients(self) -> int:
        """Number of clients."""
        return len(self.clients)

    @property
    def num_train_examples(self) -> list[int]:
        """Size of every client's local train set (the FedAvg weights |D_i|)."""
        return [client["train"].num_rows for client in self.clients]

    def label_counts(self, split: str = "train") -> np.ndarray:
        """Per-client class histogram, shape `(num_clients, num_classes)`, of the clients' `split` (`train`/`test`)."""
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        counts = np.zeros((len(self.clients), len(self.label_names)), dtype=np.int64)
        for i, client in enumerate(self.clients):
            labels = np.asarray(client[split][self.label_column], dtype=np.int64)
            counts[i] = np.bincount(labels, minlength=len(self.label_names))
        return counts

    def summary(self) -> dict:
        """A JSON-serialisable description: config, sizes and per-client label histograms."""
        return {
            "config": asdict(self.config),
            "label_names": list(self.label_names),
            "global_test_size": self.global_test.num_rows,
            "train_sizes": self.num_train_examples,
            "local_test_sizes": [client["test"].num_rows for client in self.clients],
            "train_label_counts": self.label_counts("train").tolist(),
        }


def build_partitioner(config: PartitionConfig, label_column: str = LABEL_COLUMN) -> Partitioner:
    """Create the `flwr_datasets` partitioner that `config` describes (no dataset assigned yet).

    Args:
        config (`PartitionConfig`): the partitioning configuration.
        label_column (`str`): column the Dirichlet and pathological schemes partition by.

    Returns:
        `flwr_datasets.partitioner.Partitioner`: a `DirichletPartitioner`, `PathologicalPartitioner` or
        `IidPartitioner`.
    """
    if config.scheme == "dirichlet":
        return DirichletPartitioner(
            num_partitions=config.num_clients,
            partition_by=label_column,
            alpha=float(config.alpha),
            min_partition_size=config.min_partition_size,
            self_balancing=config.self_balancing,
            shuffle=True,
            seed=config.partition_seed,
        )
    if config.scheme == "pathological":
        return PathologicalPartitioner(
            num_partitions=config.num_clients,
            partition_by=label_column,
            num_classes_per_partition=config.classes_per_client,
            class_assignment_mode=config.class_assignment_mode,
            shuffle=True,
            seed=config.partition_seed,
        )
    # IidPartitioner cuts contiguous shards of the data as given; `partition_dataset` shuffles it first.
    return IidPartitioner(num_partitions=config.num_clients)


def _too_many_clients(config: PartitionConfig, dataset_name: str, rows: int, why: str) -> ValueError:
    dirichlet = config.scheme == "dirichlet"
    setting = f"min_partition_size={config.min_partition_size}, " if dirichlet else ""
    return ValueError(
        f"num_clients={config.num_clients} is too many for {dataset_name} ({rows} train rows, {setting}"
        f"scheme={config.scheme!r}): {why}. Use fewer clients"
        + (", a larger alpha or a smaller min_partition_size." if dirichlet else ".")
    )


def partition_dataset(
    corpus: DatasetDict, config: PartitionConfig, label_column: str = LABEL_COLUMN, *, dataset_name: Optional[str] = None
) -> ClientSplits:
    """Divide `corpus["train"]` among clients and give each client a train and a local test split.

    Deterministic for a given corpus and `config.partition_seed`. Every train example goes to at most one client, so clients
    are disjoint. With `"dirichlet"` and `"iid"` the clients together cover the whole train split; with
    `"pathological"` they do too unless `class_assignment_mode="random"` (or `num_clients` below the number of classes
    with `"first-deterministic"`) leaves a class unassigned, in which case flwr-datasets warns and those examples are
    unused. The Dirichlet scheme redraws its proportions until every client holds `min_partition_size` examples and
    fails after 10 attempts (lower `alpha`, `num_clients` or `min_partition_size` then).

    Args:
        corpus (`datasets.DatasetDict`): needs `train` and `test` splits and, for the label-based schemes, a
            `ClassLabel` column `label_column` (see `load_bundled_fortunes` / `load_text_dataset`).
        config (`PartitionConfig`): the partitioning configuration.
        label_column (`str`): column to partition by.
        dataset_name (`str`, *optional*): the corpus' name, for error messages (`"the corpus"` when omitted).

    Returns:
        [`ClientSplits`]: per-client `DatasetDict(train=..., test=...)` and the global test set (`corpus["test"]`).

    Example:

    ```py
    >>> from fcmoe_hf.data import PartitionConfig, load_bundled_fortunes, partition_dataset
    >>> splits = partition_dataset(load_bundled_fortunes(), PartitionConfig(num_clients=10, alpha=0.1))
    >>> splits[0]["train"], splits[0]["test"], splits.global_test
    ```
    """
    for split in ("train", "test"):
        if split not in corpus:
            raise ValueError(f"corpus has no {split!r} split; available splits: {list(corpus)}")
    train = corpus["train"]
    if label_column not in train.column_names:
        raise ValueError(f"label_column {label_column!r} not found in the train split; columns: {train.column_names}")
    feature = train.features[label_column]
    if not isinstance(feature, ClassLabel):
        raise ValueError(
            f"label_column {label_column!r} must be a ClassLabel (got {feature}); load the corpus with "
            "load_text_dataset, or cast the column with Dataset.class_encode_column"
        )
    name = dataset_name or "the corpus"
    if config.num_clients > train.num_rows:
        raise _too_many_clients(config, name, train.num_rows, "there are fewer train rows than clients")
    if config.scheme == "dirichlet" and config.num_clients * config.min_partition_size > train.num_rows:
        raise _too_many_clients(
            config, name, train.num_rows, f"{config.num_clients} x {config.min_partition_size} rows do not fit"
        )

    if config.scheme == "iid":
        # IidPartitioner cuts contiguous shards: shuffle first (seeded) so that a label-sorted corpus is still IID.
        train = train.shuffle(seed=config.partition_seed)
    partitioner = build_partitioner(config, label_column)
    partitioner.dataset = train

    clients = []
    for client_id in range(config.num_clients):
        try:
            partition = partitioner.load_partition(client_id)
        except ValueError as err:
            if "max number of attempts" not in str(err):
                raise
            # flwr-datasets' Dirichlet sampler gave up redrawing: say it in terms of the configuration.
            raise _too_many_clients(
                config, name, train.num_rows,
                f"10 Dirichlet draws (alpha={config.alpha}) all left a client below min_partition_size",
            ) from err
        if partition.num_rows < 2:
            raise _too_many_clients(
                config, name, train.num_rows,
                f"client {client_id} received {partition.num_rows} example(s), too few for a train and a local test split",
            )
        # Seed per client so that one client's split does not depend on the others'.
        local = partition.train_test_split(
            test_size=config.local_test_fraction, seed=config.partition_seed + client_id
        )
        clients.append(DatasetDict(train=local["train"], test=local["test"]))
    return ClientSplits(
        clients=clients,
        global_test=corpus["test"],
        label_column=label_column,
        label_names=list(feature.names),
        config=config,
    )
