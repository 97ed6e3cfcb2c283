"""Local knowledge retention (FC-MoE, arXiv:2606.15625, Eq. 5-6): a client's residual re-anchored on the new global experts.

After a merge, client `i` does not restart from the new global experts `Theta[k]` alone but from
`Theta[k] + lambda * R[i,k]`, keeping part of what it learned. Two readings of the residual are offered:

- `"projection"` (Eq. 5 as printed, the default): `R[i,k] = (<Delta[i,k], Theta[k]> / ||Theta[k]||^2) * Theta[k]`,
  the client's last update projected onto the new global expert;
- `"filtered"`: `R[i,k] = Delta[i,k] - Delta'[i,k]`, the part of the update the server's consensus projection
  removed. With the consensus rule that part is `a[i,k] * g[k]`, and since the merged step is
  `u[k] = Theta_new[k] - Theta_old[k] = s[k] g[k]` (`s >= 1`), it equals
  `(min(<Delta[i,k], u[k]>, 0) / ||u[k]||^2) * u[k]`: the client computes it from the two global states and its own
  update, with nothing else from the server. (It assumes the server ran the consensus projection, which
  `FCMoEConfig` enforces for this mode.)

Either way `R[i,k]` is a scalar per client and expert times a basis vector every client has (`Theta[k]` or `u[k]`),
so a residual is an `(E,)` coefficient vector per expert group: a personalized adapter costs a few numbers to keep and
is materialised only when needed. One set of functions serves the client's round start ([`retained_start`]) and the
server's personalized adapters ([`apply_retention`] with the coefficients an aggregation returns).

Non-expert (shared) tensors have no residual: a personalized state holds the global tensors there.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Optional

import torch

from ..layout import group_keys
from .consensus import row_dots

RETENTION_MODES = ("projection", "filtered")


def _check_mode(mode: str, previous_global) -> None:
    if mode not in RETENTION_MODES:
        raise ValueError(f"retention mode must be one of {RETENTION_MODES}, got {mode!r}.")
    if mode == "filtered" and previous_global is None:
        raise ValueError("retention mode 'filtered' needs previous_global (the global state the round started from).")


def retention_basis(
    global_state: Mapping[str, torch.Tensor],
    keys: Sequence[str],
    mode: str = "projection",
    previous_global: Optional[Mapping[str, torch.Tensor]] = None,
) -> list[torch.Tensor]:
    """The basis tensors of one expert group: `Theta` (`"projection"`) or `Theta - Theta_old` (`"filtered"`)."""
    _check_mode(mode, previous_global)
    if mode == "projection":
        return [global_state[key] for key in keys]
    return [global_state[key].float() - previous_global[key].float() for key in keys]


def residual_coefficients(
    delta: Sequence[torch.Tensor], basis: Sequence[torch.Tensor], mode: str = "projection"
) -> torch.Tensor:
    """`(E,)` float64 coefficients `r[k]` with `R[k] = r[k] * basis[k]` for one expert group.

    `"projection"`: `r = <Delta, Theta> / ||Theta||^2`; `"filtered"`: `r = min(<Delta, u>, 0) / ||u||^2`. An expert
    whose basis vector is zero gets 0.

    Args:
        delta (`Sequence[torch.Tensor]`): the client's update tensors of the group (dimension 0 indexes experts).
        basis (`Sequence[torch.Tensor]`): the basis tensors, paired with `delta`.
        mode (`str`): `"projection"` or `"filtered"`.
    """
    if mode not in RETENTION_MODES:
        raise ValueError(f"retention mode must be one of {RETENTION_MODES}, got {mode!r}.")
    numerator = row_dots(delta, basis)
    denominator = row_dots(basis, basis)
    coefficients = torch.where(denominator > 0, numerator / torch.where(denominator > 0, denominator, 1.0), 0.0)
    return coefficients.clamp_max(0.0) if mode == "filtered" else coefficients


def retention_coefficients(
    previous_deltas: Mapping[str, torch.Tensor],
    global_state: Mapping[str, torch.Tensor],
    *,
    mode: str = "projection",
    previous_global: Optional[Mapping[str, torch.Tensor]] = None,
    scale: float = 1.0,
) -> dict[str, torch.Tensor]:
    """Per expert group of `global_state`, the `(E,)` residual coefficients of a client's previous update.

    Args:
        previous_deltas (`Mapping[str, torch.Tensor]`): the client's last update (`ClientUpdate.deltas`).
        global_state (`Mapping[str, torch.Tensor]`): the new global state `Theta`.
        mode (`str`): `"projection"` (Eq. 5, default) or `"filtered"`.
        previous_global (`Mapping[str, torch.Tensor]`, *optional*): the global state the update started from;
            required by `"filtered"`.
        scale (`float`): the factor the server scaled the update by before merging it (its norm clip,
            `AggregationResult.update_scales`): the residual is that of the update the server merged. Both readings
            are linear in the update for a positive factor, so this scales the coefficients.

    Raises:
        `KeyError`: naming the key, if the update lacks an expert tensor of the global state.
    """
    out = {}
    for group, keys in group_keys(global_state.keys())[0].items():
        missing = [key for key in keys if key not in previous_deltas]
        if missing:
            raise KeyError(f"The previous update lacks expert tensor(s) {missing} of the global state.")
        basis = retention_basis(global_state, keys, mode, previous_global)
        out[group] = residual_coefficients([previous_deltas[key] for key in keys], basis, mode)
    if scale != 1.0:
        out = {group: c * scale for group, c in out.items()}
    return out


def retention_residual(coefficients: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """`R = r[k] * basis[k]` for one tensor of a group (float32): `coefficients` `(E,)`, `basis` `(E, ...)`."""
    shape = (-1,) + (1,) * (basis.dim() - 1)
    return coefficients.to(torch.float32).reshape(shape) * basis.float()


def apply_retention(
    global_state: Mapping[str, torch.Tensor],
    coefficients: Mapping[str, torch.Tensor],
    lam: float = 0.5,
    *,
    mode: str = "projection",
    previous_global: Optional[Mapping[str, torch.Tensor]] = None,
) -> dict[str, torch.Tensor]:
    """A personalized state: `Theta + lam * R` on the expert tensors of the groups in `coefficients`, `Theta` elsewhere.

    Computed in float32 and cast back to each tensor's dtype. Tensors without a residual are the global state's own
    tensors (not copies): treat the result as read-only, as the global state is.

    Args:
        global_state (`Mapping[str, torch.Tensor]`): the new global state `Theta` (may be lazy).
        coefficients (`Mapping[str, torch.Tensor]`): `{group: (E,)}` residual coefficients ([`retention_coefficients`]
            or an aggregation result's).
        lam (`float`): the retention strength `lambda` (the paper's 0.5); 0 returns the global tensors.
        mode (`str`): the basis the coefficients refer to, `"projection"` or `"filtered"`.
        previous_global (`Mapping[str, torch.Tensor]`, *optional*): required by `"filtered"`.
    """
    _check_mode(mode, previous_global)
    groups = group_keys(global_state.keys())[0]
    unknown = [group for group in coefficients if group not in groups]
    if unknown:
        raise KeyError(f"Residual coefficients for expert groups {unknown} that the global state does not have.")
    out = {key: global_state[key] for key in global_state.keys()}
    if lam == 0:
        return out
    for group, coef in coefficients.items():
        keys = groups[group]
        for key, basis in zip(keys, retention_basis(global_state, keys, mode, previous_global), strict=True):
            theta = out[key]
            if coef.shape != (theta.shape[0],):
                raise ValueError(f"Residual coefficients of {group!r} have shape {tuple(coef.shape)}, expected ({theta.shape[0]},).")
            out[key] = (theta.float() + lam * retention_residual(coef, basis)).to(theta.dtype)
    return out


def retained_start(
    global_state: Mapping[str, torch.Tensor],
    previous_deltas: Optional[Mapping[str, torch.Tensor]] = None,
    lam: float = 0.5,
    *,
    mode: str = "projection",
    previous_global: Optional[Mapping[str, torch.Tensor]] = None,
    coefficients: Optional[Mapping[str, torch.Tensor]] = None,
    scale: float = 1.0,
) -> dict[str, torch.Tensor]:
    """A client's starting point for the next round: `Theta + lam * R` for expert tensors, `Theta` for shared ones.

    The one personalization path: a client's next starting point ([`FederatedMoEMixin.start_round`]), the
    personalized adapter that is evaluated and the one that is saved ([`AggregationResult.personalized_state`], the
    simulation's outputs) all come from here. With no previous update
    (first round, or a new client) and no coefficients, or with `lam == 0`, the start is the global state itself.

    Args:
        global_state (`Mapping[str, torch.Tensor]`): the new global state `Theta`.
        previous_deltas (`Mapping[str, torch.Tensor]`, *optional*): the client's last update, from which the residual
            is computed (ignored when `coefficients` is given).
        lam (`float`): `lambda`, 0.5 in the paper; 0 turns retention off.
        mode (`str`): `"projection"` (Eq. 5, default) or `"filtered"` (`Delta - Delta'`).
        previous_global (`Mapping[str, torch.Tensor]`, *optional*): the global state the previous update started from;
            required by `"filtered"`.
        coefficients (`Mapping[str, torch.Tensor]`, *optional*): precomputed `{group: (E,)}` coefficients (e.g. the
            server's `AggregationResult.residuals[client_id]`, already scaled).
        scale (`float`): the server's scale factor of the previous update (`AggregationResult.update_scales`; 1.0
            when it was not clipped); see [`retention_coefficients`].

    Returns:
        `dict[str, torch.Tensor]` keyed as `global_state`.

    Example:
        ```python
        start = retained_start(new_global, previous_update.deltas, lam=0.5)
        set_peft_model_state_dict(model, start)
        ```
    """
    if coefficients is None:
        if previous_deltas is None or lam == 0:
            return {key: global_state[key] for key in global_state.keys()}
        coefficients = retention_coefficients(
            previous_deltas, global_state, mode=mode, previous_global=previous_global, scale=scale
        )
    return apply_retention(global_state, coefficients, lam, mode=mode, previous_global=previous_global)
