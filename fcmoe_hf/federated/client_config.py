"""What the server asks of every client's local training in a round: the server-to-client half of a strategy.

Flower strategies send it in `configure_train`'s `ConfigRecord`; here an aggregator returns it from
[`~fcmoe_hf.federated.Aggregator.configure_client`] and the federation applies it to the clients' training arguments.
No field is copied by hand anywhere else: a new client-side behaviour is a new field here and in
[`~fcmoe_hf.trainer.FederatedClientArguments`].
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, TypeVar

_Args = TypeVar("_Args")


@dataclass(frozen=True)
class ClientConfig:
    """A round's instructions to the clients. The defaults are plain local training.

    Field names are those of [`~fcmoe_hf.trainer.FederatedClientArguments`], so the config applies to a client's
    training arguments as it is ([`apply`]) and travels as a flat mapping of scalars ([`to_dict`], e.g. a Flower
    `ConfigRecord`).

    Args:
        proximal_mu (`float`): FedProx's proximal coefficient (Li et al. 2020, arXiv:1812.06127): the clients add
            `mu / 2 * ||theta - theta_round_start||^2` to their loss. 0 turns it off.
        retention_lambda (`float`): FC-MoE's local knowledge retention (arXiv:2606.15625, Eq. 6): a client starts
            its round from `Theta + lambda * R` with `R` its retained residual. 0 starts from the global state.
        retention_mode (`str`): which residual (`"projection"`, Eq. 5 as printed, or `"filtered"`).
        personalization (`str`): client-side personalization next to the federated adapter. `"none"` (default), or
            `"pfl_moe"`: PFL-MoE (arXiv:2012.15589), a personal adapter and a gate kept on the client
            ([`~fcmoe_hf.personalization.train_pfl_moe_client`]).
    """

    proximal_mu: float = field(default=0.0, metadata={"help": "FedProx proximal coefficient mu (0: off)."})
    retention_lambda: float = field(default=0.0, metadata={"help": "Retention strength lambda (0: start from Theta)."})
    retention_mode: str = field(default="projection", metadata={"help": "Residual: 'projection' or 'filtered'."})
    personalization: str = field(default="none", metadata={"help": "Client-side personalization: 'none' or 'pfl_moe'."})

    def __post_init__(self):
        if not self.proximal_mu >= 0:
            raise ValueError(f"ClientConfig.proximal_mu must be >= 0, got {self.proximal_mu!r}.")
        if not self.retention_lambda >= 0:
            raise ValueError(f"ClientConfig.retention_lambda must be >= 0, got {self.retention_lambda!r}.")
        if self.retention_mode not in ("projection", "filtered"):
            raise ValueError(f"ClientConfig.retention_mode must be 'projection' or 'filtered', got {self.retention_mode!r}.")
        if self.personalization not in ("none", "pfl_moe"):
            raise ValueError(f"ClientConfig.personalization must be 'none' or 'pfl_moe', got {self.personalization!r}.")

    def to_dict(self) -> dict[str, Any]:
        """The config as a flat `{field: scalar}` dict."""
        return asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> ClientConfig:
        """Inverse of [`to_dict`]; an unknown key is an error that names it."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"Unknown ClientConfig field(s) {unknown}; known: {sorted(known)}.")
        return cls(**values)

    def apply(self, args: _Args) -> _Args:
        """A copy of training arguments `args` (a dataclass with these fields) with this config's values set.

        Raises:
            `TypeError`: if `args` lacks one of the fields (use [`~fcmoe_hf.trainer.FederatedMoETrainingArguments`]).
        """
        missing = [f.name for f in dataclasses.fields(self) if not hasattr(args, f.name)]
        if missing:
            raise TypeError(
                f"{type(args).__name__} has no field(s) {missing}: clients need FederatedClientArguments' fields "
                "(e.g. FederatedMoETrainingArguments)."
            )
        return dataclasses.replace(args, **self.to_dict())
