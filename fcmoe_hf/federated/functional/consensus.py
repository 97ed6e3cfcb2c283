"""Gradient consensus projection (FC-MoE, arXiv:2606.15625, Eq. 3-5), and a pairwise PCGrad-style variant.

Per expert `k`, with weights `w[i,k]` (importance or data size):

- Eq. 3, consensus: `g[k] = sum_i w[i,k] * Delta[i,k]`;
- Eq. 4, projection: if `cos(Delta[i,k], g[k]) < 0`, `Delta'[i,k] = Delta[i,k] - a[i,k] * g[k]` with
  `a[i,k] = <Delta[i,k], g[k]> / ||g[k]||^2` (a negative number), else `Delta'[i,k] = Delta[i,k]` (`a[i,k] = 0`);
- Eq. 5 (merge part): `Theta[k] += sum_i w[i,k] * Delta'[i,k]`.

Because the consensus uses the same weights as the merge, the projected merge is a multiple of the consensus:
`sum_i w Delta' = g - (sum_i w a) g = s[k] * g[k]` with `s[k] = 1 - sum_i w[i,k] a[i,k] >= 1`. A conflicting client
cannot cancel the direction the others agree on: its opposing component is removed, and what remains of its update
still counts. So the whole projection needs, per client and expert, only the dot product `<Delta[i,k], g[k]>`: O(N)
per expert. Each update is used twice (to build `g`, then for its dot product with `g`); a streaming merge reads a
chunk of experts of every client into memory once and does both from there ([`stacked_consensus`]).

The pairwise variant (PCGrad, Yu et al. 2020, "Gradient Surgery for Multi-Task Learning", arXiv:2001.06782) projects
each update against every other conflicting update in turn. It is expressed here on the Gram matrix
`G[k] = [<Delta[i,k], Delta[j,k]>]`: O(N^2) per expert, and it needs every client's copy of an expert group at once.
It is offered for comparison; the consensus rule is the paper's.

Functions take `(K, E, ...)` tensors (clients x experts) and are vectorised over experts; statistics are float64.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Optional

import torch


@dataclass
class ConsensusDiagnostics:
    """What the projection did to one expert group, per expert (and per client where stated).

    Experts nobody contributed to have `NaN` in the per-expert means.

    Args:
        weights (`torch.Tensor` of shape `(K, E)`): effective merge weights `w[i,k]` (each column sums to 1 or is 0).
        cosine (`torch.Tensor` of shape `(K, E)`): `cos(Delta[i,k], g[k])` of contributing clients (`NaN` for the
            others and where a norm is 0).
        conflict (`torch.Tensor` of shape `(K, E)`, bool): contributing clients whose update opposes the consensus
            (`cos < 0`); they are projected when projection is on.
        conflict_share (`torch.Tensor` of shape `(E,)`): share of contributing clients in conflict.
        mean_cosine (`torch.Tensor` of shape `(E,)`): mean cosine to the consensus over contributing clients.
        removed_norm (`torch.Tensor` of shape `(E,)`): norm of what projection removed from the merged update,
            `||sum_i w[i,k] (Delta[i,k] - Delta'[i,k])||` (0 when projection is off).
        consensus_norm (`torch.Tensor` of shape `(E,)`): `||g[k]||`.
    """

    weights: torch.Tensor
    cosine: torch.Tensor
    conflict: torch.Tensor
    conflict_share: torch.Tensor
    mean_cosine: torch.Tensor
    removed_norm: torch.Tensor
    consensus_norm: torch.Tensor

    def to_dict(self) -> dict[str, Any]:
        """Plain lists (JSON-ready; `NaN` becomes `None`)."""

        def plain(t: torch.Tensor):
            values = t.tolist()
            if t.is_floating_point():
                return _nan_to_none(values)
            return values

        return {name: plain(getattr(self, name)) for name in self.__dataclass_fields__}


def _nan_to_none(values):
    if isinstance(values, list):
        return [_nan_to_none(v) for v in values]
    return None if isinstance(values, float) and math.isnan(values) else values


def row_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """`(R,)` float64 dot products of the rows of two 2-D tensors of one dtype.

    One BLAS `dot` per row when rows are few (expert tensors have E rows): `linalg.vecdot` and `(a * b).sum(1)` were
    measured slower here on long rows, as they make an extra pass over memory.
    """
    if a.shape[0] <= 64:
        return torch.stack([torch.dot(x, y) for x, y in zip(a.unbind(), b.unbind())]).double()
    return torch.linalg.vecdot(a, b).double()


def row_dots(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> torch.Tensor:
    """`(E,)` float64: per expert, `sum_t <a_t[e], b_t[e]>` over paired tensors whose dimension 0 indexes experts.

    This is the dot product of the concatenated expert vectors without concatenating them.
    """
    total = None
    for x, y in zip(a, b, strict=True):
        x2, y2 = x.reshape(x.shape[0], -1), y.reshape(y.shape[0], -1)
        if x2.dtype != y2.dtype or not x2.is_floating_point():
            x2, y2 = x2.float(), y2.float()
        part = row_dot(x2, y2)
        total = part if total is None else total + part
    if total is None:
        raise ValueError("row_dots needs at least one tensor.")
    return total


def stacked_consensus(
    stacked: Sequence[torch.Tensor], weights: torch.Tensor, out: Optional[Sequence[torch.Tensor]] = None
) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """Eq. 3 and the dot products Eq. 4 needs, over updates held as `(K, E, D_j)` tensors.

    One matrix-vector product per expert and tensor for `g` and one for the dot products: each update is read twice
    from memory, and never more than once from disk.

    Args:
        stacked (`Sequence[torch.Tensor]`): the tensors of one expert group, each `(K, E, D_j)`.
        weights (`torch.Tensor` of shape `(K, E)`): `w[i,k]`, in any float dtype.
        out (`Sequence[torch.Tensor]`, *optional*): `(E, D_j)` tensors to write `g` into.

    Returns:
        `(g, dots, g_sq)`: `g[j]` of shape `(E, D_j)` (the consensus, in `stacked`'s dtype), `dots[i,k] =
        <Delta[i,k], g[k]>` `(K, E)` and `g_sq[k] = ||g[k]||^2` `(E,)`, both float64.
    """
    num_clients, num_experts = weights.shape
    w = weights.to(device=stacked[0].device, dtype=stacked[0].dtype)
    consensus = list(out) if out is not None else [torch.empty(x.shape[1:], dtype=x.dtype, device=x.device) for x in stacked]
    dots = torch.zeros(num_clients, num_experts, dtype=torch.float64)
    g_sq = torch.zeros(num_experts, dtype=torch.float64)
    for x, g in zip(stacked, consensus, strict=True):
        for k in range(num_experts):
            # (K, D) with row stride E*D: a plain strided matrix for BLAS, no copy.
            torch.mv(x[:, k].t(), w[:, k], out=g[k])
            dots[:, k] += torch.mv(x[:, k], g[k]).double().cpu()
        g_sq += torch.linalg.vector_norm(g, dim=1).double().square().cpu()
    return consensus, dots, g_sq


def consensus_direction(deltas: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Eq. 3: `g[k] = sum_i w[i,k] Delta[i,k]`.

    Args:
        deltas (`torch.Tensor` of shape `(K, E, D)`): flattened expert updates.
        weights (`torch.Tensor` of shape `(K, E)`): merge weights.

    Returns:
        `torch.Tensor` of shape `(E, D)`, in `deltas`' dtype.
    """
    return torch.einsum("ke,ked->ed", weights.to(deltas.dtype), deltas)


def conflict_coefficients(dots: torch.Tensor, consensus_sq_norm: torch.Tensor) -> torch.Tensor:
    """Eq. 4's coefficients `a[i,k] = min(<Delta[i,k], g[k]>, 0) / ||g[k]||^2` (0 where `g[k] = 0`).

    `cos < 0` is the same test as `<Delta, g> < 0`, and needs no norms. `Delta'[i,k] = Delta[i,k] - a[i,k] g[k]`.

    Args:
        dots (`torch.Tensor` of shape `(K, E)`): `<Delta[i,k], g[k]>`.
        consensus_sq_norm (`torch.Tensor` of shape `(E,)`): `||g[k]||^2`.
    """
    dots, sq = dots.double(), consensus_sq_norm.double()
    safe = torch.where(sq > 0, sq, 1.0)
    return torch.where((dots < 0) & (sq > 0), dots / safe, 0.0)


def projected_merge_scale(weights: torch.Tensor, coefficients: torch.Tensor) -> torch.Tensor:
    """`s[k] = 1 - sum_i w[i,k] a[i,k]`, so that `sum_i w[i,k] Delta'[i,k] = s[k] g[k]` (Eq. 5 after Eq. 4)."""
    return 1.0 - (weights.double() * coefficients.double()).sum(dim=0)


def consensus_statistics(
    weights: torch.Tensor, norms: torch.Tensor, dots: torch.Tensor, consensus_sq_norm: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, ConsensusDiagnostics]:
    """Everything the consensus projection needs and reports, from per-client statistics only.

    Args:
        weights (`torch.Tensor` of shape `(K, E)`): merge weights `w[i,k]`.
        norms (`torch.Tensor` of shape `(K, E)`): `||Delta[i,k]||`.
        dots (`torch.Tensor` of shape `(K, E)`): `<Delta[i,k], g[k]>`.
        consensus_sq_norm (`torch.Tensor` of shape `(E,)`): `||g[k]||^2`.

    Returns:
        `(coefficients a (K, E), scale s (E,), diagnostics)`; the merged update of expert `k` is `s[k] * g[k]`.
    """
    weights, norms, dots = weights.double(), norms.double(), dots.double()
    coefficients = conflict_coefficients(dots, consensus_sq_norm)
    scale = projected_merge_scale(weights, coefficients)
    g_norm = consensus_sq_norm.double().clamp_min(0).sqrt()
    contributing = weights > 0
    conflict = contributing & (coefficients < 0)
    diagnostics = _diagnostics(weights, norms, dots, g_norm, contributing, conflict, (scale - 1.0) * g_norm)
    return coefficients, scale, diagnostics


def _diagnostics(weights, norms, dots, g_norm, contributing, conflict, removed_norm) -> ConsensusDiagnostics:
    denominator = norms * g_norm.unsqueeze(0)
    defined = contributing & (denominator > 0)
    cosine = torch.where(defined, dots / torch.where(denominator > 0, denominator, 1.0), math.nan)
    n_contributing = contributing.sum(dim=0).double()
    n_defined = defined.sum(dim=0).double()
    nan = torch.full_like(n_contributing, math.nan)
    share = torch.where(n_contributing > 0, conflict.sum(dim=0).double() / n_contributing.clamp_min(1), nan)
    mean_cos = torch.where(n_defined > 0, torch.where(defined, cosine, 0.0).sum(dim=0) / n_defined.clamp_min(1), nan)
    return ConsensusDiagnostics(
        weights=weights,
        cosine=cosine,
        conflict=conflict,
        conflict_share=share,
        mean_cosine=mean_cos,
        removed_norm=torch.where(n_contributing > 0, removed_norm, 0.0),
        consensus_norm=g_norm,
    )


def project_onto_consensus(deltas: torch.Tensor, consensus: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 4 on explicit vectors: `(Delta' (K, E, D), coefficients a (K, E))` with `Delta' = Delta - a g`."""
    dots = torch.einsum("ked,ed->ke", deltas.double(), consensus.double())
    coefficients = conflict_coefficients(dots, consensus.double().square().sum(dim=-1))
    projected = deltas - coefficients.to(deltas.dtype).unsqueeze(-1) * consensus.unsqueeze(0)
    return projected, coefficients


def pairwise_projection(
    gram: torch.Tensor, participants: torch.Tensor, order: Optional[Sequence[int]] = None
) -> torch.Tensor:
    """PCGrad on Gram matrices: the matrix `M` with `Delta'[i,k] = sum_l M[k,i,l] Delta[l,k]`.

    Each participating update is projected in turn against every other participating update `j` (in `order`, the
    same for every `i`) with which it conflicts, as PCGrad does: `Delta'_i -= <Delta'_i, Delta_j> / ||Delta_j||^2 *
    Delta_j` when that dot product is negative. Only dot products are needed: `<Delta'_i, Delta_j> = (M G)[i,j]`.

    Args:
        gram (`torch.Tensor` of shape `(E, K, K)`): `G[k,i,j] = <Delta[i,k], Delta[j,k]>`.
        participants (`torch.Tensor` of shape `(K, E)`, bool): clients taking part per expert (weight > 0); the
            others are neither projected nor projected against.
        order (`Sequence[int]`, *optional*): the order of the `j`s; client order by default.

    Returns:
        `torch.Tensor` of shape `(E, K, K)`, float64.
    """
    gram = gram.double()
    num_experts, k, _ = gram.shape
    m = torch.eye(k, dtype=torch.float64).expand(num_experts, k, k).clone()
    part = participants.T  # (E, K)
    not_self = ~torch.eye(k, dtype=torch.bool)
    for j in range(k) if order is None else order:
        gjj = gram[:, j, j]  # (E,)
        dot = torch.einsum("eil,el->ei", m, gram[:, :, j])  # <Delta'_i, Delta_j>
        mask = (dot < 0) & part & part[:, j : j + 1] & not_self[:, j].unsqueeze(0) & (gjj > 0).unsqueeze(1)
        m[:, :, j] -= torch.where(mask, dot / torch.where(gjj > 0, gjj, 1.0).unsqueeze(1), 0.0)
    return m


def pairwise_statistics(
    weights: torch.Tensor, gram: torch.Tensor, order: Optional[Sequence[int]] = None
) -> tuple[torch.Tensor, torch.Tensor, ConsensusDiagnostics]:
    """The pairwise variant's merge and diagnostics from the Gram matrices.

    Args:
        weights (`torch.Tensor` of shape `(K, E)`): merge weights.
        gram (`torch.Tensor` of shape `(E, K, K)`): per-expert Gram matrices of the updates.
        order (`Sequence[int]`, *optional*): projection order (see [`pairwise_projection`]).

    Returns:
        `(M (E, K, K), combination (K, E), diagnostics)`: the merged update of expert `k` is
        `sum_l combination[l,k] Delta[l,k]` with `combination[l,k] = sum_i w[i,k] M[k,i,l]`.
    """
    weights, gram = weights.double(), gram.double()
    contributing = weights > 0
    m = pairwise_projection(gram, contributing, order)
    combination = torch.einsum("ie,eil->le", weights, m)
    eye = torch.eye(m.shape[-1], dtype=torch.bool)
    conflict = contributing & (m.masked_fill(eye, 0.0) != 0).any(dim=-1).T
    diag = torch.diagonal(gram, dim1=1, dim2=2).T  # (K, E) squared norms
    dots = torch.einsum("eij,je->ie", gram, weights)  # <Delta_i, g>
    g_sq = torch.einsum("ie,ie->e", weights, dots)
    removed = weights - combination
    removed_sq = torch.einsum("ie,eij,je->e", removed, gram, removed)
    diagnostics = _diagnostics(
        weights, diag.clamp_min(0).sqrt(), dots, g_sq.clamp_min(0).sqrt(), contributing, conflict, removed_sq.clamp_min(0).sqrt()
    )
    return m, combination, diagnostics


def consensus_merge(
    deltas: torch.Tensor, weights: torch.Tensor, mode: str = "consensus"
) -> tuple[torch.Tensor, torch.Tensor, ConsensusDiagnostics]:
    """Eq. 3-5's merged update of one expert group held in memory: `(sum_i w Delta' (E, D), a or M, diagnostics)`.

    The reference form of what the streaming aggregator computes group by group.

    Args:
        deltas (`torch.Tensor` of shape `(K, E, D)`): flattened expert updates.
        weights (`torch.Tensor` of shape `(K, E)`): merge weights.
        mode (`str`): `"consensus"` (the paper's rule) or `"pairwise"` (PCGrad-style).
    """
    if mode == "consensus":
        consensus = consensus_direction(deltas.double(), weights)
        norms = deltas.double().square().sum(dim=-1).sqrt()
        dots = torch.einsum("ked,ed->ke", deltas.double(), consensus)
        coefficients, scale, diagnostics = consensus_statistics(weights, norms, dots, consensus.square().sum(dim=-1))
        return (scale.unsqueeze(-1) * consensus).to(deltas.dtype), coefficients, diagnostics
    if mode == "pairwise":
        gram = torch.einsum("ied,jed->eij", deltas.double(), deltas.double())
        m, combination, diagnostics = pairwise_statistics(weights, gram)
        return torch.einsum("ke,ked->ed", combination, deltas.double()).to(deltas.dtype), m, diagnostics
    raise ValueError(f"mode must be 'consensus' or 'pairwise', got {mode!r}.")
