"""How a federation is scored after a round: the global adapter on the global test set, each client's personalized
model on its own local test split."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch

from ..trainer import set_federated_state
from .round_metrics import first_rows, local_summary

if TYPE_CHECKING:
    from .loop import FederatedSimulation


def evaluate_federation(simulation: FederatedSimulation, global_state: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """Global adapter on the global test set, each client's personalized adapter on its local test set.

    With PFL-MoE personalization a client's local model is the mixture of the global adapter with its personal
    adapter through its gate ([`~fcmoe_hf.personalization.PFLMoEModel`]); a client that has not trained one yet
    is scored with the global adapter (a mixture of two equal models).
    """
    metrics: dict[str, float] = {}
    global_test = first_rows(simulation.splits.global_test, simulation.args.max_global_eval_samples)
    set_federated_state(simulation.model, global_state)
    metrics.update({f"global_{k}": v for k, v in _score(simulation, global_test).items()})
    store = None
    if simulation.client_config(len(simulation.history) + 1).personalization == "pfl_moe":
        from ..personalization import PersonalStateStore, PFLMoEModel

        store = PersonalStateStore(simulation.run_dir / "clients")
        latest = simulation.checkpoints.latest()  # states newer than the round after it would be from an abandoned run
        before_round = (int(latest.name.removeprefix("round_")) if latest is not None else 0) + 2
    local: dict[str, list[float]] = {}
    for index, client_id in enumerate(simulation.client_ids):
        test = first_rows(simulation.splits.clients[index]["test"], simulation.args.max_local_eval_samples)
        set_federated_state(simulation.model, simulation.personalized_state(global_state, client_id))
        kept = store.load(client_id, before_round) if store is not None else None
        if kept is None:
            scores = _score(simulation, test)
        else:
            with PFLMoEModel(simulation.model, kept[1]) as mixture:
                scores = simulation.task.evaluate(mixture, test, batch_size=simulation.args.eval_batch_size)
        for key, value in scores.items():
            local.setdefault(key, []).append(value)
            metrics[f"{client_id}/local_{key}"] = value
    metrics.update(local_summary(local))
    set_federated_state(simulation.model, global_state)
    return metrics


def _score(simulation: FederatedSimulation, dataset: Any) -> dict[str, float]:
    return simulation.task.evaluate(simulation.model, dataset, batch_size=simulation.args.eval_batch_size)
