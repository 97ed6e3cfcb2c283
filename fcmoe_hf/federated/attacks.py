"""Malicious client updates, for tests and benchmarks of the server's defences (not for training).

Each function returns a new [`ClientUpdate`] and leaves its input alone; deltas are materialised in memory (one
adapter). [`attack_clients`] turns them into the `update_transform` hook of
[`~fcmoe_hf.simulation.FederatedSimulation`], which applies it to the updates the server receives, after the honest
clients trained and before the merge:

```python
from fcmoe_hf.federated.attacks import attack_clients, inflate_counts, sign_flip_update

simulation.update_transform = attack_clients({
    "client_3": lambda u: sign_flip_update(u, 100.0),       # a sign-flipped x100 update
    "client_7": lambda u: inflate_counts(u, 10**6),          # activation counts and num_samples x 10**6
})
```
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Optional

import torch

from .update import ClientUpdate

UpdateTransform = Callable[[int, str, ClientUpdate], ClientUpdate]


def scale_update(update: ClientUpdate, scale: float) -> ClientUpdate:
    """The update with every delta multiplied by `scale` (computed in float32, stored in each delta's dtype)."""
    deltas = {key: (value.float() * scale).to(value.dtype) for key, value in update.deltas.items()}
    return dataclasses.replace(update, deltas=deltas)


def sign_flip_update(update: ClientUpdate, scale: float = 100.0) -> ClientUpdate:
    """The sign-flipped update scaled by `scale`: `-scale * Delta` (the issue's "sign-flipped x100" attack)."""
    return scale_update(update, -scale)


def inflate_counts(update: ClientUpdate, factor: float = 1e6, num_samples: Optional[int] = None) -> ClientUpdate:
    """The update claiming `factor` times its activation counts (rounded to whole numbers) and `num_samples` samples
    (by default its own count times `factor`, as an integer): it buys FedAvg and FC-MoE weight when unchecked."""
    counts = {group: (c.double() * factor).round() for group, c in update.activation_counts.items()}
    samples = int(update.num_samples * factor) if num_samples is None else num_samples
    return dataclasses.replace(update, activation_counts=counts, num_samples=samples)


def spoof_id(update: ClientUpdate, client_id: str) -> ClientUpdate:
    """The update claiming to come from `client_id`."""
    return dataclasses.replace(update, client_id=client_id)


def attack_clients(attacks: Mapping[str, Callable[[ClientUpdate], ClientUpdate]], rounds: Optional[set[int]] = None) -> UpdateTransform:
    """An `update_transform(round, client_id, update)` that applies `attacks[client_id]` (in `rounds`, or every round)
    and returns the other updates unchanged."""

    def transform(round_index: int, client_id: str, update: ClientUpdate) -> ClientUpdate:
        attack = attacks.get(client_id)
        if attack is None or (rounds is not None and round_index not in rounds):
            return update
        with torch.no_grad():
            return attack(update)

    return transform
