"""FC-MoE: importance-aware, conflict-aware expert-wise merging with local knowledge retention."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from ..client_config import ClientConfig
from ..functional.consensus import (
    conflict_coefficients,
    consensus_statistics,
    pairwise_statistics,
    row_dots,
    stacked_consensus,
)
from ..functional.importance import capped_norms, normalize_scores, stack_statistics
from ..functional.retention import RETENTION_MODES
from ..functional.robust import ROBUST_BYTES_PER_ELEMENT, weighted_median, weighted_trimmed_mean
from ..io.stream import ACCUMULATE_DTYPE, ChunkArena, experts_per_chunk, read_stacked_rows, rows_shape
from ..layout import group_keys
from ..validation import ContentRejected, non_finite_reason
from .base import Aggregator, AggregatorConfig
from .kernels import (
    apply_step,
    data_size_scores,
    dot_pass,
    fedavg_shared,
    owns_tensors,
    read_checked_chunk,
    sample_sizes,
    weighted_group,
)
from .registry import register_aggregator
from .result import AggregationResult, ResidualCoefficients


@dataclass
class FCMoEConfig(AggregatorConfig):
    """FC-MoE, with the paper's defaults and its ablations switchable one at a time.

    With `use_importance=False`, `use_projection=False` and `use_retention=False` the merge is FedAvg, bit for bit.

    Args:
        use_importance (`bool`): weight experts by importance `c = f * ||Delta||` (Eq. 2-3). `False` is ablation (c):
            data-size weights.
        use_projection (`bool`): gradient consensus projection (Eq. 4). `False` is ablation (a).
        use_retention (`bool`): compute local knowledge retention residuals (Eq. 5-6). `False` is ablation (b): clients
            restart from the global state.
        projection_mode (`str`): `"consensus"` (the paper: project once against the importance-weighted consensus,
            O(N) per expert) or `"pairwise"` (PCGrad-style against every other update, O(N^2) per expert, and one
            expert group of every client in memory at once).
        retention_mode (`str`): `"projection"` (Eq. 5 as printed: the update projected onto the new global expert)
            or `"filtered"` (`Delta - Delta'`, the part the projection removed; needs `use_projection=True` and
            `projection_mode="consensus"`).
        retention_lambda (`float`): `lambda`, the weight of the residual in a client's start point (0.5).
        robust (`str`, *optional*): `"median"` or `"trimmed_mean"`: the consensus and the merge of every expert are
            the coordinate-wise importance-*weighted* median / trimmed mean of the clients' updates
            ([`~fcmoe_hf.federated.functional.robust`]) instead of the weighted mean, so a minority of clients cannot
            drag a coordinate outside the honest range. The importance norm is then capped at the expert's median
            norm (a weighted median follows whoever holds half the weight). With projection, conflicting updates
            are projected against the robust consensus (Eq. 4) and the merge is the robust statistic of the projected
            updates. `None` (default): the paper's weighted mean. Needs `projection_mode="consensus"` and
            `retention_mode="projection"`.
        trim_beta (`float`): with `robust="trimmed_mean"`, the weight fraction cut at each end of every coordinate.
        merge_buffer_mb (`float`): working memory of the consensus merge (64 MiB), a fixed budget whatever the number
            of clients. The merge reads a chunk of experts of every client into it at once (as float32) and computes
            the consensus, the dot products and the merged experts from there, so each update is read from disk
            once. When not even one expert of every client fits, it falls back to two streaming reads of each expert
            group (the weighted sum, then the dot products) and keeps in this budget what it can between the two.
    """

    use_importance: bool = field(default=True, metadata={"help": "Importance-aware weights c = f*||Delta|| (False: data-size weights)."})
    use_projection: bool = field(default=True, metadata={"help": "Gradient consensus projection of conflicting updates."})
    use_retention: bool = field(default=True, metadata={"help": "Local knowledge retention residuals for the clients' next start."})
    projection_mode: str = field(
        default="consensus", metadata={"help": "Projection rule.", "choices": ["consensus", "pairwise"]}
    )
    retention_mode: str = field(
        default="projection", metadata={"help": "Residual: Eq. 5 projection or Delta - Delta'.", "choices": list(RETENTION_MODES)}
    )
    retention_lambda: float = field(default=0.5, metadata={"help": "Retention strength lambda."})
    robust: Optional[str] = field(
        default=None,
        metadata={"help": "Robust consensus and merge per expert (importance-weighted).", "choices": [None, "median", "trimmed_mean"]},
    )
    trim_beta: float = field(default=0.2, metadata={"help": "Weight fraction cut at each end with robust='trimmed_mean'."})
    merge_buffer_mb: float = field(
        default=64.0,
        metadata={
            "help": "Working memory (MiB) of the consensus merge: chunks of experts of every client are merged from it "
            "with one read of each update. 0 forces the two-read streaming merge."
        },
    )

    def __post_init__(self):
        super().__post_init__()
        if self.merge_buffer_mb < 0:
            raise ValueError(f"merge_buffer_mb must be >= 0, got {self.merge_buffer_mb}.")
        if self.projection_mode not in ("consensus", "pairwise"):
            raise ValueError(f"projection_mode must be 'consensus' or 'pairwise', got {self.projection_mode!r}.")
        if self.retention_mode not in RETENTION_MODES:
            raise ValueError(f"retention_mode must be one of {RETENTION_MODES}, got {self.retention_mode!r}.")
        if self.retention_mode == "filtered" and self.use_retention and not self.use_projection:
            raise ValueError(
                "retention_mode='filtered' keeps the part the projection removes; with use_projection=False nothing is "
                "removed and the residual is always 0 (clients computing it from the global states would disagree). "
                "Use use_retention=False, or retention_mode='projection'."
            )
        if self.retention_mode == "filtered" and self.projection_mode == "pairwise" and self.use_projection:
            raise ValueError(
                "retention_mode='filtered' needs projection_mode='consensus': under pairwise projection the filtered "
                "part is a different mix of other clients' updates per client, not a compact residual."
            )
        if self.retention_lambda < 0:
            raise ValueError(f"retention_lambda must be >= 0, got {self.retention_lambda}.")
        if self.robust not in (None, "median", "trimmed_mean"):
            raise ValueError(f"robust must be None, 'median' or 'trimmed_mean', got {self.robust!r}.")
        if not 0.0 <= self.trim_beta < 0.5:
            raise ValueError(f"trim_beta must be in [0, 0.5), got {self.trim_beta}.")
        if self.robust is not None and self.projection_mode == "pairwise" and self.use_projection:
            raise ValueError("robust needs projection_mode='consensus' (the pairwise rule has no single consensus).")
        if self.robust is not None and self.retention_mode == "filtered" and self.use_retention:
            raise ValueError("robust needs retention_mode='projection': the filtered residual assumes the mean rule.")



@register_aggregator("fcmoe")
class FCMoEAggregator(Aggregator):
    """FC-MoE (Lu et al. 2026, "Conflict-Aware Federated Fine-Tuning of Large Language Models with
    Mixture-of-Experts", arXiv:2606.15625): importance-aware, conflict-aware expert-wise merging.

    Per expert `k` (an expert of one MoE-LoRA module: its `A[k]` and `B[k]` concatenated, or an MoE base's expert):

    - Eq. 2-3: `c[i,k] = f[i,k] * ||Delta[i,k]||`, `w[i,k] = c[i,k] / sum_j c[j,k]`,
      `g[k] = sum_i w[i,k] Delta[i,k]`; clients with `f = 0` contribute nothing, and an expert with `sum c = 0` is
      left unchanged;
    - Eq. 4: if `cos(Delta[i,k], g[k]) < 0`, `Delta'[i,k] = Delta[i,k] - <Delta[i,k], g[k]> / ||g[k]||^2 * g[k]`;
    - Eq. 5 (merge): `Theta[k] <- Theta[k] + sum_i w[i,k] Delta'[i,k]`;
    - Eq. 5-6 (retention): `R[i,k] = <Delta[i,k], Theta[k]> / ||Theta[k]||^2 * Theta[k]` on the new `Theta`; client
      `i`'s personalized state and next start is `Theta + lambda * R[i,k]`. Returned as `(E,)` coefficients per
      client and group ([`AggregationResult.personalized_state`], [`~fcmoe_hf.federated.retained_start`]).

    Non-expert tensors (routers, norms, ...): FedAvg by data size. The paper does not say how it merges them.

    Streaming: a chunk of experts of every client is read into a fixed buffer (`config.merge_buffer_mb`) and merged
    from there, so each update is read from disk once; when one expert of every client does not fit the buffer,
    two streaming reads of each group (the weighted sum with norms, then the dot products with the consensus). Shared
    tensors are read once. Eq. 5 coefficients are computed when first asked for ([`ResidualCoefficients`]). The
    pairwise projection mode instead holds one expert group of every client at once (memory K x group).

    LoRA note: an MoE-LoRA expert's vector is `(A[k], B[k])`; averaging A and B separately is not averaging `B @ A`.
    The paper's experts are full FFN experts, where the question does not arise.
    """

    config_class = FCMoEConfig

    def configure_client(self, server_round: int) -> ClientConfig:
        cfg = self.config
        if not cfg.use_retention:
            return ClientConfig()
        return ClientConfig(retention_lambda=cfg.retention_lambda, retention_mode=cfg.retention_mode)

    def _cache_bytes(self) -> int:
        return int(self.config.merge_buffer_mb * 2**20)

    def _aggregate(self, global_state, stream):
        cfg = self.config
        sizes = sample_sizes(stream)
        groups, shared = group_keys(global_state.keys())
        new: dict[str, torch.Tensor] = {}
        weights, diagnostics, coefficients = {}, {}, {}
        owned = owns_tensors(global_state)
        # Merge buffers reused across the groups of this merge (stacked expert chunks, the consensus): locals, so an
        # aggregator shared between threads stays correct, and a server holds none between rounds.
        buffers: dict[Any, ChunkArena] = {}
        for group, keys in groups.items():
            theta = [global_state[key] for key in keys]
            counts = stack_statistics(stream.updates, group, theta[0].shape[0])
            if cfg.use_projection and cfg.projection_mode == "pairwise":
                merged, w, diag, coef = self._pairwise_group(stream, keys, theta, counts, sizes)
            else:
                merged, w, diag, coef = self._consensus_group(stream, keys, theta, counts, sizes, owned, buffers)
            new.update(zip(keys, merged))
            weights[group] = w
            if diag is not None:
                diagnostics[group] = diag
            if coef is not None:
                coefficients[group] = coef
        new.update(fedavg_shared(stream, global_state, shared, sizes))
        new_state = {key: new[key] for key in global_state.keys()}
        residuals: Mapping[str, dict[str, torch.Tensor]] = {}
        if cfg.use_retention and cfg.retention_mode == "filtered":
            residuals = {u.client_id: {g: c[i].clone() for g, c in coefficients.items()} for i, u in enumerate(stream.updates)}
        elif cfg.use_retention:
            residuals = ResidualCoefficients(stream.updates, stream.clip.tolist(), new_state)
        return AggregationResult(
            global_state=new_state,
            client_ids=[u.client_id for u in stream.updates],
            residuals=residuals,
            retention_lambda=cfg.retention_lambda if cfg.use_retention else 0.0,
            retention_mode=cfg.retention_mode,
            diagnostics=diagnostics,
            expert_weights=weights,
            previous_state=global_state if cfg.use_retention and cfg.retention_mode == "filtered" else None,
        )

    def _scores(self, counts, sizes):
        if self.config.use_importance:
            return lambda i, norms: counts[i] * norms
        return data_size_scores(sizes)

    def _consensus_group(self, stream, keys, theta, counts, sizes, owned, buffers):
        cfg = self.config
        device = theta[0].device
        filtered = cfg.use_retention and cfg.retention_mode == "filtered"
        if cfg.robust is not None:
            return self._robust_group(stream, keys, theta, counts, sizes, owned, buffers)
        if cfg.use_projection:
            expert_numel = sum(rows_shape(t.shape, True)[1] for t in theta)
            chunk = experts_per_chunk(len(stream), expert_numel, self._cache_bytes())
            if chunk > 0:
                merged, weights, diag, a, scale = self._stacked_consensus_group(
                    stream, keys, theta, counts, sizes, chunk, owned, buffers
                )
                return merged, weights, diag, (a / scale.unsqueeze(0) if filtered else None)
        need_norms = cfg.use_importance or cfg.use_projection
        tracked = stream.squared_norms.clone()
        result = weighted_group(stream, keys, theta, self._scores(counts, sizes), need_norms=need_norms, keep=cfg.use_projection)
        if cfg.use_importance and cfg.norm_bound_factor is not None:
            # The importance norms are capped relative to the median, known only once every client was read: a
            # round where the cap binds is merged again with the capped norms (an honest round is not).
            capped = capped_norms(result.norms, counts, cfg.norm_bound_factor)
            if not torch.equal(capped, result.norms):
                stream.squared_norms.copy_(tracked)
                result = weighted_group(
                    stream, keys, theta, lambda i, norms: counts[i] * capped[i], need_norms=need_norms, keep=cfg.use_projection
                )
        weights = normalize_scores(result.scores)
        # The consensus g[k] = sum_i w[i,k] Delta[i,k] is sums * inverse: kept unnormalised, scaled in the statistics.
        inverse = result.inverse_total()
        if not cfg.use_projection:
            return [apply_step(t, u, True, inverse, owned) for t, u in zip(theta, result.sums)], weights, None, None

        # Clients with no weight in this group need no dot product, unless the filtered residual needs theirs.
        readers = range(len(stream)) if filtered else [i for i in range(len(stream)) if bool((weights[i] > 0).any())]
        dots = dot_pass(stream, keys, readers, [result.sums], expert_rows=True, device=device)[:, 0] * inverse
        g_sq = row_dots(result.sums, result.sums) * inverse.square()
        a, scale, diag = consensus_statistics(weights, result.norms, dots, g_sq)
        merged = [apply_step(t, u, True, scale * inverse, owned) for t, u in zip(theta, result.sums)]
        # Delta - Delta' = a g = (a / s) (Theta_new - Theta_old): the filtered residual's coefficients, for free.
        return merged, weights, diag, (a / scale.unsqueeze(0) if filtered else None)

    def _stacked_consensus_group(self, stream, keys, theta, counts, sizes, chunk, owned, buffers):
        """The consensus merge of one group with one read of each update: `chunk` experts of every client at a time.

        Returns `(merged tensors, weights, diagnostics, a, s)`, `a` and `s` as [`consensus_statistics`] gives them.
        """
        cfg = self.config
        device = theta[0].device
        k, num_experts = len(stream), theta[0].shape[0]
        dims = [rows_shape(t.shape, True)[1] for t in theta]
        clip = stream.clip.unsqueeze(1)
        norms = torch.zeros(k, num_experts, dtype=torch.float64)
        weights = torch.zeros(k, num_experts, dtype=torch.float64)
        dots = torch.zeros(k, num_experts, dtype=torch.float64)
        g_sq = torch.zeros(num_experts, dtype=torch.float64)
        arena = buffers.setdefault(("chunks", device), ChunkArena(device))
        consensus = buffers.setdefault(("consensus", device), ChunkArena(device)).views([(num_experts, d) for d in dims])
        for start in range(0, num_experts, chunk):
            stop = min(start + chunk, num_experts)
            part = slice(start, stop)
            stacked = arena.views([(k, stop - start, d) for d in dims])
            sq = read_stacked_rows(stream, keys, start, stop, stacked)
            bad = [i for i, total in enumerate(sq.sum(dim=1).tolist()) if not math.isfinite(total)]
            if bad:  # NaN/Inf propagate into the norms: name the tensor
                group = keys[0].rsplit(".", 1)[0]
                raise ContentRejected({i: non_finite_reason(keys, [x[i] for x in stacked], group) for i in bad})
            if stream.track_norms:
                stream.squared_norms += sq.sum(dim=1) * stream.clip.square()
            norms[:, part] = sq.sqrt() * clip
            scores = (
                counts[:, part] * capped_norms(norms[:, part], counts[:, part], cfg.norm_bound_factor)
                if cfg.use_importance
                else sizes.unsqueeze(1).expand(k, stop - start)
            )
            weights[:, part] = normalize_scores(scores)
            # Clipping scales client i's update: fold it into the weights and the dot products, not into the data.
            _, chunk_dots, g_sq[part] = stacked_consensus(stacked, weights[:, part] * clip, out=[g[part] for g in consensus])
            dots[:, part] = chunk_dots * clip
        a, scale, diag = consensus_statistics(weights, norms, dots, g_sq)
        merged = [apply_step(t, g, True, scale, owned) for t, g in zip(theta, consensus)]
        return merged, weights, diag, a, scale

    def _pairwise_group(self, stream, keys, theta, counts, sizes):
        cfg = self.config
        device = theta[0].device
        k = len(stream)
        stacked = [torch.empty((k, *rows_shape(t.shape, True)), dtype=ACCUMULATE_DTYPE, device=device) for t in theta]
        for i, tensors in stream.clients(range(k), keys, device, expert_rows=True):
            stream.check(i, keys, tensors, need_norms=True)
            factor = float(stream.clip[i])
            for buffer, t in zip(stacked, tensors):
                buffer[i] = t if factor == 1.0 else t * factor
            stream.release(tensors)
        # (E, K, K) Gram matrices of the expert vectors, summed over the group's tensors.
        gram = sum(torch.bmm(x.transpose(0, 1), x.permute(1, 2, 0)).double() for x in stacked)
        norms = torch.diagonal(gram, dim1=1, dim2=2).T.clamp_min(0).sqrt()
        scores = counts * capped_norms(norms, counts, cfg.norm_bound_factor) if cfg.use_importance else sizes.unsqueeze(1).expand_as(norms)
        weights = normalize_scores(scores)
        _, combination, diag = pairwise_statistics(weights, gram)
        steps = [torch.einsum("ke,ked->ed", combination.to(ACCUMULATE_DTYPE), x) for x in stacked]
        merged = [apply_step(t, s, True) for t, s in zip(theta, steps)]
        return merged, weights, diag, None

    def _robust_group(self, stream, keys, theta, counts, sizes, owned, buffers):
        """`config.robust`: the importance-weighted robust consensus `g`, Eq. 4 against it, then the weighted robust
        statistic of the projected updates, chunk of experts by chunk (one read of each update). Diagnostics are
        computed as for the mean rule (`removed_norm` is the mean rule's estimate)."""
        cfg = self.config
        device = theta[0].device
        k, num_experts = len(stream), theta[0].shape[0]
        dims = [rows_shape(t.shape, True)[1] for t in theta]
        if cfg.robust == "median":
            statistic = weighted_median
        else:
            def statistic(values, weights):
                return weighted_trimmed_mean(values, weights, cfg.trim_beta)
        norms = torch.zeros(k, num_experts, dtype=torch.float64)
        weights = torch.zeros(k, num_experts, dtype=torch.float64)
        dots = torch.zeros(k, num_experts, dtype=torch.float64)
        g_sq = torch.zeros(num_experts, dtype=torch.float64)
        steps = [torch.zeros(num_experts, d, dtype=ACCUMULATE_DTYPE, device=device) for d in dims]
        arena = buffers.setdefault(("robust", device), ChunkArena(device))
        per_expert = k * sum(dims) * ROBUST_BYTES_PER_ELEMENT
        chunk = max(1, self._cache_bytes() // per_expert) if per_expert else num_experts
        for start in range(0, num_experts, chunk):
            stop = min(start + chunk, num_experts)
            part = slice(start, stop)
            stacked = arena.views([(k, stop - start, d) for d in dims])
            norms[:, part] = read_checked_chunk(stream, keys, start, stop, stacked).sqrt()  # clip applied to the data
            # A weighted median follows whoever holds half the weight: the importance norm is capped at the expert's
            # median norm, so moving an expert further than a typical client buys no weight at all.
            scores = (
                counts[:, part] * capped_norms(norms[:, part], counts[:, part], 1.0)
                if cfg.use_importance
                else sizes.unsqueeze(1).expand(k, stop - start)
            )
            w = weights[:, part] = normalize_scores(scores)
            consensus = [statistic(x, w) for x in stacked]
            if cfg.use_projection:
                chunk_dots = sum(torch.einsum("ked,ed->ke", x, g).double() for x, g in zip(stacked, consensus))
                g_sq[part] = sum(g.double().square().sum(dim=1) for g in consensus)
                dots[:, part] = chunk_dots
                a = conflict_coefficients(chunk_dots, g_sq[part]).to(ACCUMULATE_DTYPE)
                for x, g in zip(stacked, consensus):  # Delta' = Delta - a g, in the chunk buffer
                    x.sub_(a.unsqueeze(-1) * g.unsqueeze(0))
                consensus = [statistic(x, w) for x in stacked]
            for step, merged in zip(steps, consensus):
                step[part] = merged
        diag = consensus_statistics(weights, norms, dots, g_sq)[2] if cfg.use_projection else None
        return [apply_step(t, s, True, owned=owned) for t, s in zip(theta, steps)], weights, diag, None
