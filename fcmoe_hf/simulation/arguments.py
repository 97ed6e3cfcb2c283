"""The federation's own arguments (rounds, sampling, aggregator, task, evaluation), a dataclass `HfArgumentParser` reads."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Optional, Union


@dataclass
class FederationArguments:
    """The federation around the clients' local training.

    Local training itself (learning rate, batch size, epochs per round, ...) is configured by
    [`~fcmoe_hf.trainer.FederatedMoETrainingArguments`], whose `output_dir` is the run directory, `seed` the seed of
    client sampling and of the clients' training, and `report_to` where round metrics go besides `metrics.jsonl`
    (`tensorboard`); the partition of the data by [`~fcmoe_hf.data.PartitionConfig`]. What the aggregator asks of the
    clients (FedProx's `proximal_mu`, FC-MoE's retention) comes from the aggregator itself
    ([`~fcmoe_hf.federated.Aggregator.configure_client`]), not from here.
    """

    aggregator: str = field(
        default="fcmoe",
        metadata={
            "help": "Server merge, by registered name (fcmoe_hf.federated.available_aggregators()): fcmoe, fedavg, "
            "fedprox, fedavgm, fedadam, fedyogi, fedadagrad, ties, fedmoe, fedalign_moe, pfl_moe, or your own."
        },
    )
    aggregator_config: Union[dict, str, None] = field(
        default=None, metadata={"help": "Aggregator config overrides, a dict (YAML) or a JSON string."}
    )
    num_rounds: int = field(default=5, metadata={"help": "Number of federated rounds."})
    fraction_fit: float = field(default=1.0, metadata={"help": "Fraction of clients sampled each round."})
    min_fit_clients: int = field(default=2, metadata={"help": "At least this many clients are sampled each round."})
    task: str = field(
        default="category",
        metadata={
            "help": "Task (fcmoe_hf.tasks): 'category' (instruction-style category prediction with a causal LM), "
            "'sequence_classification' (a classification head, e.g. on MiniLM), 'causal_lm' (LM on the text)."
        },
    )
    max_length: int = field(default=128, metadata={"help": "Maximum tokens per example."})
    eval_every: int = field(default=1, metadata={"help": "Evaluate every N rounds (and always after the last)."})
    eval_batch_size: int = field(default=16, metadata={"help": "Batch size of evaluation."})
    max_global_eval_samples: Optional[int] = field(
        default=None, metadata={"help": "Evaluate the global adapter on at most this many global test examples."}
    )
    max_local_eval_samples: Optional[int] = field(
        default=None, metadata={"help": "Evaluate each personalized adapter on at most this many local test examples."}
    )
    resume: bool = field(default=False, metadata={"help": "Continue from the last complete round in run_dir."})
    resume_allow_config_change: bool = field(
        default=False,
        metadata={
            "help": "On --resume, continue although the run's configuration (aggregator config, partition, client "
            "data, sampling, task, model, seed, local training hyperparameters) differs from the checkpoint's; by "
            "default a difference is refused, naming the fields. num_rounds, evaluation and logging may always change."
        },
    )
    save_client_adapters: bool = field(default=True, metadata={"help": "Save every client's personalized adapter."})
    base_model_id: Optional[str] = field(
        default=None, metadata={"help": "Base model id written into adapter configs and model cards."}
    )
    dataset_id: Optional[str] = field(
        default=None, metadata={"help": "Hub dataset id the clients' data comes from, for the model cards' metadata."}
    )

    def __post_init__(self):
        from ..tasks import available_tasks

        if isinstance(self.aggregator_config, str):
            try:
                self.aggregator_config = json.loads(self.aggregator_config)
            except json.JSONDecodeError as err:
                raise ValueError(f"aggregator_config is not valid JSON: {err}") from err
        if self.num_rounds < 1:
            raise ValueError(f"num_rounds must be >= 1, got {self.num_rounds}.")
        if not 0 < self.fraction_fit <= 1:
            raise ValueError(f"fraction_fit must be in (0, 1], got {self.fraction_fit}.")
        if self.min_fit_clients < 1:
            raise ValueError(f"min_fit_clients must be >= 1, got {self.min_fit_clients}.")
        from ..federated import available_aggregators, build_aggregator

        if self.aggregator not in available_aggregators():
            raise ValueError(f"aggregator must be one of {available_aggregators()}, got {self.aggregator!r}.")
        if self.aggregator_config is not None and not isinstance(self.aggregator_config, dict):
            raise ValueError(
                f"aggregator_config must be a mapping of field names to values (YAML) or a JSON object, got "
                f"{type(self.aggregator_config).__name__} {self.aggregator_config!r}."
            )
        # Built once here so that an unknown or invalid field fails before any data or model is loaded.
        build_aggregator(self.aggregator, self.aggregator_config)
        if self.task not in available_tasks():
            raise ValueError(f"task must be one of {available_tasks()}, got {self.task!r}.")
        if self.eval_every < 1:
            raise ValueError(f"eval_every must be >= 1, got {self.eval_every}.")
