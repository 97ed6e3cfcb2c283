"""What a merge returns: the new global state, each client's personalization, diagnostics and rejections."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Optional

import torch

from ..bounds import CappedUpdate
from ..functional.consensus import ConsensusDiagnostics
from ..functional.retention import retained_start, retention_coefficients
from ..io.safetensors import LazySafetensors
from ..update import ClientUpdate
from ..validation import RejectedUpdate


class ResidualCoefficients(Mapping):
    """Eq. 5 retention coefficients per client, computed on first access: `{client_id: {group: (E,)}}`.

    Client `i`'s coefficients `<Delta[i,k], Theta[k]> / ||Theta[k]||^2` on the new global experts need one more read
    of its update; computing them at merge time would add a dot product per parameter and client to every merge, for
    values that are wanted only when a personalized adapter is materialised. They come from
    [`~fcmoe_hf.federated.retention_coefficients`], the very function a client uses at the start of its next round,
    so server and client agree exactly. Holds references (not copies) to the updates and the new global state.

    Args:
        updates (`Sequence[ClientUpdate]`): the merged updates.
        clip (`Sequence[float]`): their clip factors (a clipped update's coefficients scale with it).
        global_state (`Mapping[str, torch.Tensor]`): the new global state `Theta`.
    """

    def __init__(self, updates: Sequence[ClientUpdate], clip: Sequence[float], global_state: Mapping[str, torch.Tensor]):
        self._sources = {u.client_id: (u, float(c)) for u, c in zip(updates, clip, strict=True)}
        self._global_state = global_state
        self._computed: dict[str, dict[str, torch.Tensor]] = {}

    def __getitem__(self, client_id: str) -> dict[str, torch.Tensor]:
        if client_id not in self._computed:
            update, factor = self._sources[client_id]
            with torch.no_grad():
                coefficients = retention_coefficients(update.deltas, self._global_state, scale=factor)
            if isinstance(update.deltas, LazySafetensors):
                update.deltas.close()
            self._computed[client_id] = coefficients
        return self._computed[client_id]

    def __iter__(self):
        return iter(self._sources)

    def __len__(self) -> int:
        return len(self._sources)

    def __repr__(self) -> str:
        return f"ResidualCoefficients(clients={list(self._sources)}, computed={list(self._computed)})"


@dataclass
class AggregationResult:
    """What a merge returns.

    Args:
        global_state (`dict[str, torch.Tensor]`): the new global state, keyed and ordered as the previous one.
        client_ids (`list[str]`): the clients merged, in the order of the `K` axis of every `(K, E)` statistic.
        residuals (`Mapping[str, dict[str, torch.Tensor]]`): per client, per expert group, the `(E,)` retention
            coefficients (empty when the aggregator has no retention; computed on first access for Eq. 5, see
            [`ResidualCoefficients`]). See [`personalized_state`].
        retention_lambda (`float`): `lambda` for the personalized states (0: they equal the global state).
        retention_mode (`str`): the basis the coefficients refer to (`"projection"`: `Theta_new`; `"filtered"`:
            `Theta_new - Theta_old`).
        diagnostics (`dict[str, ConsensusDiagnostics]`): per expert group, what the consensus projection saw and did
            (empty when no projection ran).
        expert_weights (`dict[str, torch.Tensor]`): per expert group, the `(K, E)` effective merge weights.
        rejected (`list[RejectedUpdate]`): the updates left out, with reasons.
        capped (`list[CappedUpdate]`): the merged updates whose self-reported counts were capped to the round's
            bounds, with what was capped (`bounds_action="cap"`).
        update_scales (`dict[str, float]`): per merged client, the factor its update was scaled by before merging
            (its norm clip; 1.0 when not clipped). A client's residual is that of its scaled update: pass it as
            `scale` to [`~fcmoe_hf.federated.retained_start`].
        previous_state (`Mapping[str, torch.Tensor]`, *optional*): the previous global state, kept (by reference) only
            when the `"filtered"` basis needs it.
    """

    global_state: dict[str, torch.Tensor]
    client_ids: list[str]
    residuals: Mapping[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    retention_lambda: float = 0.0
    retention_mode: str = "projection"
    diagnostics: dict[str, ConsensusDiagnostics] = field(default_factory=dict)
    expert_weights: dict[str, torch.Tensor] = field(default_factory=dict)
    rejected: list[RejectedUpdate] = field(default_factory=list)
    capped: list[CappedUpdate] = field(default_factory=list)
    update_scales: dict[str, float] = field(default_factory=dict)
    previous_state: Optional[Mapping[str, torch.Tensor]] = field(default=None, repr=False)

    def personalized_state(self, client_id: str, lam: Optional[float] = None) -> dict[str, torch.Tensor]:
        """Client `client_id`'s personalized state `Theta + lambda * R` (the global tensors where it has no residual).

        The same as [`~fcmoe_hf.federated.retained_start`] gives a client from its own update (with
        `scale=update_scales[client_id]`): what the client starts its next round from.

        Materialised on each call (about one adapter of memory for the expert tensors); shared tensors are the global
        state's own tensors. `lam` overrides `retention_lambda`.

        Raises:
            `KeyError`: if `client_id` was not merged in this round.
        """
        if client_id not in self.client_ids:
            raise KeyError(f"Client {client_id!r} was not merged in this round; merged: {self.client_ids}.")
        lam = self.retention_lambda if lam is None else lam
        coefficients = self.residuals.get(client_id)
        if not coefficients or lam == 0:
            return dict(self.global_state)
        # The coefficients already carry the client's update scale (see `update_scales`).
        return retained_start(
            self.global_state, lam=lam, mode=self.retention_mode, previous_global=self.previous_state,
            coefficients=coefficients,
        )

    def residual_tensors(self) -> dict[str, torch.Tensor]:
        """The residual coefficients as one flat `{"<client_id>::<group>": (E,)}` dict, ready for safetensors."""
        return {f"{cid}::{group}": c.contiguous() for cid, groups in self.residuals.items() for group, c in groups.items()}

    @staticmethod
    def residuals_from_tensors(tensors: Mapping[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
        """Inverse of [`residual_tensors`]."""
        out: dict[str, dict[str, torch.Tensor]] = {}
        for key, value in tensors.items():
            cid, sep, group = key.rpartition("::")
            if not sep:
                raise ValueError(f"Residual key {key!r} is not of the form '<client_id>::<group>'.")
            out.setdefault(cid, {})[group] = value
        return out

    def summary(self) -> dict[str, float]:
        """Scalar metrics of the round for logs: clients, rejections, active experts, conflict statistics."""
        out: dict[str, float] = {"num_clients": float(len(self.client_ids)), "num_rejected": float(len(self.rejected)),
                                  "num_capped": float(len(self.capped))}
        if self.expert_weights:
            active = torch.cat([(w > 0).any(dim=0) for w in self.expert_weights.values()])
            out["active_expert_share"] = float(active.double().mean())
        if self.diagnostics:
            diags = list(self.diagnostics.values())
            share = torch.cat([d.conflict_share for d in diags])
            cosine = torch.cat([d.mean_cosine for d in diags])
            out["conflict_share"] = _nanmean(share)
            out["conflicting_expert_share"] = float((share.nan_to_num(0.0) > 0).double().mean())
            out["mean_cosine"] = _nanmean(cosine)
            out["removed_norm"] = float(sum(float(d.removed_norm.sum()) for d in diags))
        return out


def _nanmean(values: torch.Tensor) -> float:
    defined = values[~torch.isnan(values)]
    return float(defined.mean()) if defined.numel() else math.nan
