"""The Flower app's run configuration: one dataclass, read from Flower's flat run config (`--run-config "k=v ..."`)."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

#: The prefix that selects one of Flower's own strategies instead of an fcmoe_hf aggregator (`"flwr:fedavg"`).
FLOWER_PREFIX = "flwr:"
#: Flower's strategies the app runs as peers (`aggregator="flwr:<name>"`), by name.
FLOWER_STRATEGIES = ("fedavg", "fedprox", "fedadam", "fedyogi", "fedadagrad", "fedavgm")
TRANSPORT_DTYPES = ("float32", "bfloat16")


@dataclass
class FlowerRunConfig:
    """Everything a Flower run of fcmoe_hf needs, shared by the `ServerApp` and every `ClientApp`.

    Flower passes it as the run config (`[tool.flwr.app.config]` of the app's `pyproject.toml`, overridden with
    `flwr run --run-config "num-server-rounds=3 aggregator='fedavg'"`): keys are these field names in kebab-case,
    values TOML scalars. Optional numbers use 0 (or `""` for strings) for "not set", since TOML has no null.

    Args:
        num_server_rounds (`int`): federated rounds.
        aggregator (`str`): an fcmoe_hf aggregator by registered name (`fcmoe`, `fedavg`, `fedprox`, ...), or one of
            Flower's own strategies with Flower's arithmetic, `flwr:fedavg`, `flwr:fedprox`, `flwr:fedadam`, ...
        aggregator_config (`str`): JSON object of aggregator config overrides (for `flwr:*`, keyword arguments of
            the Flower strategy, e.g. `{"proximal_mu": 0.01}` or `{"eta": 0.01}`).
        fraction_train (`float`): share of the connected clients sampled each round (Flower's `fraction_train`).
        min_train_clients (`int`): at least this many clients each round (Flower's `min_train_nodes`).
        min_available_clients (`int`): wait for this many connected clients before sampling.
        round_timeout (`float`): seconds the server waits for the round's replies; a client that has not replied by
            then is counted as failed.
        eval_every (`int`): evaluate every N rounds (and always after the last).
        num_clients (`int`): number of partitions of the data (SuperNodes in a simulation).
        components (`str`): `"module:function"` that builds the model, tokenizer, task and data partition
            ([`~fcmoe_hf.flower.components.build_components`] by default).
        model, task, dataset, text_column, label_column: the base model, task and corpus, as in the recipe.
        partition_scheme, alpha, classes_per_client, partition_seed, min_partition_size, local_test_fraction: the
            partition ([`~fcmoe_hf.data.PartitionConfig`]).
        max_train_samples_per_client (`int`): cap every client's train split (0: no cap).
        max_length (`int`): tokens per example.
        moe_r, moe_lora_alpha, moe_num_experts, moe_top_k: the MoE-LoRA adapter.
        learning_rate, batch_size, local_epochs, lr_scheduler_type, seed: local training.
        training_args (`str`): JSON object of further `TrainingArguments` fields for local training.
        eval_batch_size, max_global_eval_samples, max_local_eval_samples: evaluation (0: the whole split).
        run_dir (`str`): the server's run directory (metrics, plots, checkpoints, global adapter).
        client_output_dir (`str`): where each client writes its personalized adapter (`<dir>/<client_id>/adapter`)
            and keeps its state between runs (`<dir>/<client_id>/flower_state`); `<run_dir>/clients` by default.
        save_client_adapters (`bool`): clients write their personalized adapters after the last round.
        resume (`bool`): continue from the last complete round in `run_dir`. The run's configuration must match the
            checkpoint's (as for the in-process run, [`~fcmoe_hf.simulation.resume.check_resume_config`]): a
            difference is refused, naming every field, unless `resume_allow_config_change`.
        resume_allow_config_change (`bool`): resume with a changed configuration (logged).
        transport_dtype (`str`): dtype of the clients' updates on the wire, `float32` or `bfloat16` (half the bytes).
        push_to_hub (`bool`), hub_model_id (`str`): the server pushes the global adapter to `hub_model_id`, every
            client its own personalized adapter to `<hub_model_id>-clients/<client_id>` (private).
        base_model_id, dataset_id (`str`): written into adapter configs and model cards.
    """

    num_server_rounds: int = 3
    aggregator: str = "fcmoe"
    aggregator_config: str = ""
    fraction_train: float = 1.0
    min_train_clients: int = 2
    min_available_clients: int = 2
    round_timeout: float = 3600.0
    eval_every: int = 1
    num_clients: int = 10
    components: str = "fcmoe_hf.flower.components:build_components"
    model: str = "smollm2-135m-instruct"
    task: str = "category"
    dataset: str = "fortunes"
    text_column: str = "text"
    label_column: str = "category"
    partition_scheme: str = "dirichlet"
    alpha: float = 0.1
    classes_per_client: int = 2
    partition_seed: int = 42
    min_partition_size: int = 10
    local_test_fraction: float = 0.2
    max_train_samples_per_client: int = 0
    max_length: int = 128
    moe_r: int = 8
    moe_lora_alpha: int = 16
    moe_num_experts: int = 8
    moe_top_k: int = 2
    learning_rate: float = 2e-4
    batch_size: int = 8
    local_epochs: float = 1.0
    lr_scheduler_type: str = "linear"
    seed: int = 42
    training_args: str = ""
    eval_batch_size: int = 16
    max_global_eval_samples: int = 0
    max_local_eval_samples: int = 0
    run_dir: str = "outputs/flower"
    client_output_dir: str = ""
    save_client_adapters: bool = True
    resume: bool = False
    resume_allow_config_change: bool = False
    transport_dtype: str = "float32"
    push_to_hub: bool = False
    hub_model_id: str = ""
    base_model_id: str = ""
    dataset_id: str = ""

    def __post_init__(self):
        from ..federated import available_aggregators

        if self.num_server_rounds < 1:
            raise ValueError(f"num-server-rounds must be >= 1, got {self.num_server_rounds}.")
        if self.is_flower_strategy:
            if self.flower_strategy not in FLOWER_STRATEGIES:
                raise ValueError(f"aggregator {self.aggregator!r}: Flower strategies are {[FLOWER_PREFIX + s for s in FLOWER_STRATEGIES]}.")
        elif self.aggregator not in available_aggregators():
            raise ValueError(
                f"aggregator must be one of {available_aggregators()} or {[FLOWER_PREFIX + s for s in FLOWER_STRATEGIES]}, "
                f"got {self.aggregator!r}."
            )
        if not 0 < self.fraction_train <= 1:
            raise ValueError(f"fraction-train must be in (0, 1], got {self.fraction_train}.")
        for name in ("min_train_clients", "min_available_clients", "eval_every", "num_clients"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}.")
        if self.round_timeout <= 0:
            raise ValueError(f"round-timeout must be > 0, got {self.round_timeout}.")
        if self.transport_dtype not in TRANSPORT_DTYPES:
            raise ValueError(f"transport-dtype must be one of {TRANSPORT_DTYPES}, got {self.transport_dtype!r}.")
        if ":" not in self.components:
            raise ValueError(f"components must be 'module:function', got {self.components!r}.")
        for name in ("aggregator_config", "training_args"):
            self._json(name)

    def _json(self, name: str) -> dict[str, Any]:
        text = getattr(self, name)
        if not text:
            return {}
        try:
            value = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"{name.replace('_', '-')} is not valid JSON: {err}") from err
        if not isinstance(value, dict):
            raise ValueError(f"{name.replace('_', '-')} must be a JSON object, got {text!r}.")
        return value

    # -- derived values ----------------------------------------------------------------------------------------------

    @property
    def is_flower_strategy(self) -> bool:
        """Whether `aggregator` names one of Flower's own strategies (`flwr:<name>`)."""
        return self.aggregator.startswith(FLOWER_PREFIX)

    @property
    def flower_strategy(self) -> str:
        return self.aggregator.removeprefix(FLOWER_PREFIX)

    @property
    def aggregator_overrides(self) -> dict[str, Any]:
        """`aggregator_config` parsed."""
        return self._json("aggregator_config")

    @property
    def training_overrides(self) -> dict[str, Any]:
        """`training_args` parsed."""
        return self._json("training_args")

    @property
    def num_rounds(self) -> int:
        """`num_server_rounds` (the name the outputs writers read)."""
        return self.num_server_rounds

    def optional(self, name: str) -> Any:
        """Field `name`, with 0 / `""` read as `None`."""
        value = getattr(self, name)
        return None if value in (0, "") else value

    # -- Flower's run config ------------------------------------------------------------------------------------------

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> FlowerRunConfig:
        """Parse Flower's run config (kebab-case keys). Unknown keys raise `ValueError` naming them."""
        known = {f.name: f for f in dataclasses.fields(cls)}
        values: dict[str, Any] = {}
        unknown = []
        for key, value in run_config.items():
            name = key.replace("-", "_")
            if name not in known:
                unknown.append(key)
                continue
            default = known[name].default
            if isinstance(default, bool):
                if not isinstance(value, bool):
                    raise ValueError(f"run config {key!r} must be true or false, got {value!r}.")
            elif isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            elif not isinstance(value, type(default)) or isinstance(value, bool):
                raise ValueError(f"run config {key!r} must be a {type(default).__name__}, got {value!r}.")
            values[name] = value
        if unknown:
            raise ValueError(f"Unknown run config key(s) {sorted(unknown)}; known: {sorted(k.replace('_', '-') for k in known)}.")
        return cls(**values)

    def to_run_config(self) -> dict[str, Any]:
        """The inverse of [`from_run_config`]: kebab-case keys, TOML scalars."""
        return {f.name.replace("_", "-"): getattr(self, f.name) for f in dataclasses.fields(self)}
