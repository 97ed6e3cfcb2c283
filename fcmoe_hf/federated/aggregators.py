"""Server-side aggregation: FC-MoE and the baselines behind one interface.

Every aggregator takes the previous global state (a `Mapping[str, Tensor]` keyed like the clients' deltas, e.g. the
peft adapter checkpoint keys; it may be lazy, such as a [`~fcmoe_hf.federated.LazySafetensors`] over
`adapter_model.safetensors`) and a list of [`~fcmoe_hf.federated.ClientUpdate`]s, and returns an [`AggregationResult`]:
the new global state, each client's personalization (compact residual coefficients, materialised on demand),
diagnostics and the rejected updates.

```python
from fcmoe_hf.federated import build_aggregator

aggregator = build_aggregator("fcmoe", retention_lambda=0.5)
result = aggregator.aggregate(global_state, updates)
global_state = result.global_state
personal = result.personalized_state("client-3")
checkpoint = aggregator.state_dict()  # server optimizer state (empty for stateless aggregators)
```

Each aggregator streams (see [`~fcmoe_hf.federated.streaming`]): peak memory is about one adapter (the output) plus a
few expert groups' worth of buffers, whatever the number of clients, except where a docstring says otherwise
(pairwise projection, server optimizers' moment buffers).

Inputs are never modified. Invalid updates are rejected with a logged reason; the merge goes on when at least
`min_clients` valid updates remain, else it raises `ValueError` and the caller's global state stays as it was.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar, Optional, Union

import torch

from .consensus import (
    ConsensusDiagnostics,
    consensus_statistics,
    pairwise_statistics,
    row_dots,
    stacked_consensus,
)
from .importance import normalize_scores, stack_statistics
from .retention import RETENTION_MODES, apply_retention, retention_coefficients
from .streaming import (
    ACCUMULATE_DTYPE,
    ChunkArena,
    ContentRejected,
    UpdateStream,
    as_rows,
    dot_pass,
    experts_per_chunk,
    non_finite_reason,
    read_stacked_rows,
    rows_shape,
    weighted_pass,
)
from .updates import ClientUpdate, LazySafetensors, describe_tensor, group_keys
from .validation import (
    RejectedUpdate,
    check_update_norm,
    clip_factor,
    global_expert_sizes,
    measure_update,
    reject,
    require_min_clients,
    validate_updates,
)

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------------- configs


@dataclass
class AggregatorConfig:
    """Options every aggregator has: how bad updates are handled.

    Args:
        min_clients (`int`): merge only when at least this many valid updates remain; otherwise raise `ValueError`
            and leave the global state unchanged.
        max_update_norm (`float`, *optional*): reject an update whose L2 norm over all its tensors exceeds this.
            `None` (default) sets no bound.
        clip_update_norm (`float`, *optional*): scale an update with a larger L2 norm down to this norm before
            merging (`None`, the default, does not clip). Clipping needs every update's norm before the merge starts:
            it costs one extra read of every update.
    """

    min_clients: int = field(
        default=1,
        metadata={"help": "Merge only when at least this many valid client updates remain; else raise and keep the global state."},
    )
    max_update_norm: Optional[float] = field(
        default=None, metadata={"help": "Reject client updates whose L2 norm over all tensors exceeds this (default: no bound)."}
    )
    clip_update_norm: Optional[float] = field(
        default=None,
        metadata={"help": "Scale client updates with a larger L2 norm down to this norm (default: no clipping; costs one extra read)."},
    )

    def __post_init__(self):
        if isinstance(self.min_clients, bool) or not isinstance(self.min_clients, int) or self.min_clients < 1:
            raise ValueError(f"min_clients must be an integer >= 1, got {self.min_clients!r}.")
        for name in ("max_update_norm", "clip_update_norm"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, (int, float)) and value > 0 and math.isfinite(value)):
                raise ValueError(f"{name} must be a positive finite number or None, got {value!r}.")

    def to_dict(self) -> dict[str, Any]:
        """The configuration as a plain dict (for checkpoints and model cards)."""
        return asdict(self)


@dataclass
class FedAvgConfig(AggregatorConfig):
    """FedAvg has no options beyond [`AggregatorConfig`]'s."""


@dataclass
class FedProxConfig(FedAvgConfig):
    """FedProx: the server merges as FedAvg; `proximal_mu` is carried for the clients' proximal term.

    Args:
        proximal_mu (`float`): the clients' proximal coefficient `mu` in `mu/2 * ||theta - theta_global||^2`
            (0.01 by default). The server does not use it: the simulation hands it to the trainers.
    """

    proximal_mu: float = field(
        default=0.01, metadata={"help": "Clients' proximal coefficient mu (mu/2 ||theta - theta_global||^2); used client-side."}
    )

    def __post_init__(self):
        super().__post_init__()
        if self.proximal_mu < 0:
            raise ValueError(f"proximal_mu must be >= 0, got {self.proximal_mu}.")


@dataclass
class PFLMoEConfig(FedAvgConfig):
    """PFL-MoE's server is FedAvg; the personal model and the gate are client-side and have no server options."""


@dataclass
class FedAvgMConfig(AggregatorConfig):
    """FedAvgM (Hsu et al. 2019) server momentum.

    Args:
        server_learning_rate (`float`): server step size `eta` (1.0).
        server_momentum (`float`): momentum `beta` (0.9, the paper's usual value; 0 gives FedAvg when `eta = 1`).
    """

    server_learning_rate: float = field(default=1.0, metadata={"help": "Server learning rate eta."})
    server_momentum: float = field(default=0.9, metadata={"help": "Server momentum beta (0 with eta=1 is FedAvg)."})

    def __post_init__(self):
        super().__post_init__()
        if not 0 <= self.server_momentum < 1:
            raise ValueError(f"server_momentum must be in [0, 1), got {self.server_momentum}.")


@dataclass
class FedOptConfig(AggregatorConfig):
    """Adaptive server optimizers (Reddi et al. 2021, "Adaptive Federated Optimization", arXiv:2003.00295).

    Defaults are Flower's for each strategy. The right server learning rate depends on the scale of the updates
    (LoRA deltas are small): tune it.

    Args:
        server_learning_rate (`float`): `eta`.
        beta_1 (`float`): first-moment decay.
        beta_2 (`float`): second-moment decay (unused by FedAdagrad).
        tau (`float`): adaptivity (denominator offset).
    """

    server_learning_rate: float = field(default=0.1, metadata={"help": "Server learning rate eta."})
    beta_1: float = field(default=0.9, metadata={"help": "First-moment decay beta_1."})
    beta_2: float = field(default=0.99, metadata={"help": "Second-moment decay beta_2 (unused by FedAdagrad)."})
    tau: float = field(default=1e-9, metadata={"help": "Adaptivity tau added to sqrt(v)."})

    def __post_init__(self):
        super().__post_init__()
        if not (0 <= self.beta_1 < 1 and 0 <= self.beta_2 < 1):
            raise ValueError(f"beta_1 and beta_2 must be in [0, 1), got {self.beta_1}, {self.beta_2}.")
        if self.tau <= 0:
            raise ValueError(f"tau must be > 0, got {self.tau}.")


@dataclass
class FedAdamConfig(FedOptConfig):
    """FedAdam: Flower's defaults `eta=0.1, beta_1=0.9, beta_2=0.99, tau=1e-9`."""


@dataclass
class FedYogiConfig(FedOptConfig):
    """FedYogi: Flower's defaults `eta=0.01, beta_1=0.9, beta_2=0.99, tau=1e-3`."""

    server_learning_rate: float = field(default=0.01, metadata={"help": "Server learning rate eta."})
    tau: float = field(default=1e-3, metadata={"help": "Adaptivity tau added to sqrt(v)."})


@dataclass
class FedAdagradConfig(FedOptConfig):
    """FedAdagrad: Flower's defaults `eta=0.1, beta_1=0.0 (no momentum), tau=1e-9`."""

    beta_1: float = field(default=0.0, metadata={"help": "First-moment decay beta_1 (0: no momentum)."})


@dataclass
class TiesConfig(AggregatorConfig):
    """TIES-Merging (Yadav et al. 2023).

    Args:
        density (`float`): fraction of each update's entries kept per tensor, by magnitude (the paper's k = 20%).
        scaling (`float`): `lambda`, the merged update's scale (1.0).
    """

    density: float = field(default=0.2, metadata={"help": "Fraction of each update's largest-magnitude entries kept per tensor."})
    scaling: float = field(default=1.0, metadata={"help": "Scale lambda of the merged update."})

    def __post_init__(self):
        super().__post_init__()
        if not 0 < self.density <= 1:
            raise ValueError(f"density must be in (0, 1], got {self.density}.")


@dataclass
class FedMoEConfig(AggregatorConfig):
    """Usage-thresholded expert averaging (the FedMoE stand-in, PAPER.md).

    Args:
        usage_threshold (`float`): `tau`; client `c` contributes to expert `e` when its usage `u_c(e) >= tau`.
        threshold_relative (`bool`): read `usage_threshold` as a fraction of the uniform share `1/E` (default: 0.5
            means "at least half of what a uniform router would give"), so one value fits any number of experts.
    """

    usage_threshold: float = field(default=0.5, metadata={"help": "Usage threshold tau (see threshold_relative)."})
    threshold_relative: bool = field(
        default=True, metadata={"help": "Read usage_threshold as a fraction of the uniform share 1/E."}
    )

    def __post_init__(self):
        super().__post_init__()
        if self.usage_threshold < 0:
            raise ValueError(f"usage_threshold must be >= 0, got {self.usage_threshold}.")


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


# ---------------------------------------------------------------------------------------------------------- result


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
                coefficients = retention_coefficients(update.deltas, self._global_state)
            if isinstance(update.deltas, LazySafetensors):
                update.deltas.close()
            self._computed[client_id] = {g: c * factor for g, c in coefficients.items()} if factor != 1.0 else coefficients
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
    previous_state: Optional[Mapping[str, torch.Tensor]] = field(default=None, repr=False)

    def personalized_state(self, client_id: str, lam: Optional[float] = None) -> dict[str, torch.Tensor]:
        """Client `client_id`'s personalized state `Theta + lambda * R` (the global tensors where it has no residual).

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
        return apply_retention(
            self.global_state, coefficients, lam, mode=self.retention_mode, previous_global=self.previous_state
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
        out: dict[str, float] = {"num_clients": float(len(self.client_ids)), "num_rejected": float(len(self.rejected))}
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


# ------------------------------------------------------------------------------------------------------- interface


class Aggregator:
    """Base class: validation, the rejection loop, and server state; subclasses implement `_aggregate`.

    Args:
        config ([`AggregatorConfig`] subclass or `dict`, *optional*): the configuration (`config_class()` defaults).
        **kwargs: overrides of single config fields.
    """

    name: ClassVar[str] = "base"
    config_class: ClassVar[type[AggregatorConfig]] = AggregatorConfig

    def __init__(self, config: Union[AggregatorConfig, Mapping[str, Any], None] = None, **kwargs: Any):
        if config is None:
            config = self.config_class(**kwargs)
        elif isinstance(config, Mapping):
            config = self.config_class(**{**config, **kwargs})
        else:
            if not isinstance(config, self.config_class):
                raise TypeError(f"{type(self).__name__} expects a {self.config_class.__name__}, got {type(config).__name__}.")
            if kwargs:
                config = type(config)(**{**config.to_dict(), **kwargs})
        self.config = config

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config})"

    def aggregate(self, global_state: Mapping[str, torch.Tensor], updates: Sequence[ClientUpdate]) -> AggregationResult:
        """Merge `updates` into `global_state` and return the new state with personalization and diagnostics.

        Args:
            global_state (`Mapping[str, torch.Tensor]`): the previous global state (not modified; may be lazy).
            updates (`Sequence[ClientUpdate]`): this round's client updates (not modified; deltas may be lazy).

        Raises:
            `ValueError`: if fewer than `config.min_clients` valid updates remain (the message lists the rejections),
                or if `global_state` itself is malformed.
        """
        try:
            return self._aggregate_validated(global_state, updates)
        finally:
            # Lazily read files keep a descriptor while in use; a server must not hold K of them between rounds.
            for source in [global_state, *(getattr(u, "deltas", None) for u in updates)]:
                if isinstance(source, LazySafetensors):
                    source.close()

    __call__ = aggregate

    def _aggregate_validated(self, global_state: Mapping[str, torch.Tensor], updates: Sequence[ClientUpdate]) -> AggregationResult:
        cfg = self.config
        with torch.no_grad():
            _check_global_state(global_state)
            valid, rejected = validate_updates(updates, global_state, check_values=False)
            require_min_clients(len(valid), rejected, cfg.min_clients)
            clip: Optional[list[float]] = None
            if cfg.clip_update_norm is not None:
                valid, clip = self._clip_factors(valid, rejected)
            while True:
                stream = UpdateStream(
                    valid, clip, track_norms=cfg.max_update_norm is not None and clip is None, cache_bytes=self._cache_bytes()
                )
                self._discard_pending()
                problems: dict[int, str] = {}
                try:
                    result = self._aggregate(global_state, stream)
                except ContentRejected as err:
                    problems = err.problems
                else:
                    if stream.track_norms:
                        for i, norm in enumerate(stream.norms()):
                            reason = check_update_norm(norm, cfg.max_update_norm)
                            if reason is not None:
                                problems[i] = reason
                if not problems:
                    break
                # A rejected update may already have been folded in: merge the remaining ones again from scratch.
                rejected.extend(reject(valid[i].client_id, problems[i]) for i in sorted(problems))
                valid = [u for i, u in enumerate(valid) if i not in problems]
                if clip is not None:
                    clip = [c for i, c in enumerate(clip) if i not in problems]
                require_min_clients(len(valid), rejected, cfg.min_clients)
            self._commit_pending()
        result.rejected = rejected
        return result

    def _clip_factors(self, valid: list[ClientUpdate], rejected: list[RejectedUpdate]) -> tuple[list[ClientUpdate], list[float]]:
        kept, factors = [], []
        for update in valid:
            norm, reason = measure_update(update)
            reason = reason or check_update_norm(norm, self.config.max_update_norm)
            if reason is not None:
                rejected.append(reject(update.client_id, reason))
                continue
            kept.append(update)
            factors.append(clip_factor(norm, self.config.clip_update_norm))
        require_min_clients(len(kept), rejected, self.config.min_clients)
        return kept, factors

    def _aggregate(self, global_state: Mapping[str, torch.Tensor], stream: UpdateStream) -> AggregationResult:
        """Merge the (structurally valid) updates of `stream`. Raise [`ContentRejected`] for invalid values."""
        raise NotImplementedError

    def _cache_bytes(self) -> int:
        """Memory the stream may use to keep a group between two reads of it (aggregators that read twice)."""
        return 0

    # Server state. A merge computes the next state aside ("pending") and commits it only once the merge succeeded,
    # so a rejected update or an error never leaves half-updated optimizer moments behind.
    def _discard_pending(self) -> None:
        pass

    def _commit_pending(self) -> None:
        pass

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The server state to checkpoint, as a flat `dict[str, Tensor]` (safetensors-ready); `{}` when stateless."""
        return {}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Restore a state from [`state_dict`]."""
        if state:
            raise ValueError(f"{type(self).__name__} keeps no server state, got keys {sorted(state)[:5]}.")


def _check_global_state(global_state: Mapping[str, torch.Tensor]) -> None:
    if len(global_state) == 0:
        raise ValueError("The global state is empty.")
    for key in global_state.keys():
        _, dtype = describe_tensor(global_state, key)
        if dtype is None or not dtype.is_floating_point:
            raise ValueError(f"Global state tensor {key!r} has non-floating dtype {dtype}.")
    global_expert_sizes(global_state)


# -------------------------------------------------------------------------------------------------------- registry

AGGREGATORS: dict[str, type[Aggregator]] = {}


def register_aggregator(name: str):
    """Class decorator: make an [`Aggregator`] subclass buildable by `name` with [`build_aggregator`]."""

    def decorator(cls: type[Aggregator]) -> type[Aggregator]:
        if name in AGGREGATORS:
            raise ValueError(f"An aggregator named {name!r} is already registered ({AGGREGATORS[name].__name__}).")
        cls.name = name
        AGGREGATORS[name] = cls
        return cls

    return decorator


def available_aggregators() -> list[str]:
    """The registered aggregator names."""
    return sorted(AGGREGATORS)


def aggregator_config_class(name: str) -> type[AggregatorConfig]:
    """The config dataclass of aggregator `name` (e.g. to parse it with `HfArgumentParser`)."""
    return _lookup(name).config_class


def build_aggregator(name: str, config: Union[AggregatorConfig, Mapping[str, Any], None] = None, **kwargs: Any) -> Aggregator:
    """Build a registered aggregator by name, e.g. `build_aggregator("fcmoe", use_projection=False)`.

    Args:
        name (`str`): one of [`available_aggregators`].
        config ([`AggregatorConfig`] or `dict`, *optional*): its configuration.
        **kwargs: overrides of single config fields.
    """
    return _lookup(name)(config, **kwargs)


def _lookup(name: str) -> type[Aggregator]:
    try:
        return AGGREGATORS[name]
    except KeyError:
        raise ValueError(f"Unknown aggregator {name!r}; available: {available_aggregators()}.") from None


# ------------------------------------------------------------------------------------------------- shared kernels


def _sample_sizes(stream: UpdateStream) -> torch.Tensor:
    return torch.tensor([float(u.num_samples) for u in stream.updates], dtype=torch.float64)


def _data_size_scores(sizes: torch.Tensor):
    return lambda i, norms: sizes[i]


def _apply_step(
    theta: torch.Tensor, step: torch.Tensor, expert_rows: bool, factor: Optional[torch.Tensor] = None, owned: bool = False
) -> torch.Tensor:
    """`Theta + step`, or `Theta + factor[r] * step` per row, in float32, cast back to `Theta`'s dtype.

    One fused pass writes the new tensor: the weighted sums are never normalised in place first. With `owned` (`theta`
    is a fresh copy nobody else holds, e.g. read from a [`LazySafetensors`]) a float32 `theta` is updated in place:
    the same values, without allocating (and page-faulting) a second adapter's worth of memory.
    """
    in_place = owned and theta.dtype == ACCUMULATE_DTYPE and theta.device == step.device and theta.is_contiguous()
    base = as_rows(theta.to(device=step.device, dtype=ACCUMULATE_DTYPE), expert_rows)
    if factor is None:
        new = base.add_(step) if in_place else base + step
    else:
        factor = factor.to(device=step.device, dtype=ACCUMULATE_DTYPE).unsqueeze(1)
        new = base.addcmul_(step, factor) if in_place else torch.addcmul(base, step, factor)
    return new.reshape(theta.shape).to(theta.dtype)


def _owns_tensors(global_state: Mapping[str, torch.Tensor]) -> bool:
    """Whether `global_state[key]` returns a fresh tensor on every access (a lazy file), which a merge may reuse."""
    return isinstance(global_state, LazySafetensors)


def _weighted_group(stream, keys, theta, score_fn, need_norms, expert_rows=True, keep=False):
    return weighted_pass(
        stream,
        keys,
        [t.shape for t in theta],
        expert_rows=expert_rows,
        score_fn=score_fn,
        need_norms=need_norms,
        keep=keep,
        device=theta[0].device,
    )


def _fedavg_shared(stream: UpdateStream, global_state: Mapping[str, torch.Tensor], keys: Sequence[str], sizes: torch.Tensor) -> dict[str, torch.Tensor]:
    """FedAvg of the non-expert tensors, one tensor at a time."""
    out = {}
    owned = _owns_tensors(global_state)
    for key in keys:
        theta = global_state[key]
        result = _weighted_group(stream, [key], [theta], _data_size_scores(sizes), need_norms=False, expert_rows=False)
        out[key] = _apply_step(theta, result.sums[0], False, result.inverse_total(), owned=owned)
    return out


def _fedavg_steps(stream: UpdateStream, global_state: Mapping[str, torch.Tensor]):
    """Yield `(key, theta, pseudo-gradient)` for every tensor: the data-size-weighted mean update (FedAvg's step)."""
    sizes = _sample_sizes(stream)
    for key in global_state.keys():
        theta = global_state[key]
        result = _weighted_group(stream, [key], [theta], _data_size_scores(sizes), need_norms=False, expert_rows=False)
        yield key, theta, (result.sums[0] * result.inverse_total().to(ACCUMULATE_DTYPE).unsqueeze(1)).reshape(theta.shape)


def _expert_weighted_mean(stream: UpdateStream, global_state: Mapping[str, torch.Tensor], scores_of, need_norms: bool) -> AggregationResult:
    """`Theta + sum_i w[i,k] Delta[i,k]` per expert group with `w` the normalised `scores_of(group, num_experts)`
    (a `ScoreFn`); shared tensors by data size. FedAvg and usage-thresholded averaging differ only in the scores."""
    groups, shared = group_keys(global_state.keys())
    new, weights = {}, {}
    owned = _owns_tensors(global_state)
    for group, keys in groups.items():
        theta = [global_state[key] for key in keys]
        result = _weighted_group(stream, keys, theta, scores_of(group, theta[0].shape[0]), need_norms=need_norms)
        factor = result.inverse_total()
        new.update({key: _apply_step(t, s, True, factor, owned) for key, t, s in zip(keys, theta, result.sums)})
        weights[group] = normalize_scores(result.scores)
    new.update(_fedavg_shared(stream, global_state, shared, _sample_sizes(stream)))
    return AggregationResult(
        global_state={key: new[key] for key in global_state.keys()},
        client_ids=[u.client_id for u in stream.updates],
        expert_weights=weights,
    )


# ----------------------------------------------------------------------------------------------------- aggregators


@register_aggregator("fedavg")
class FedAvgAggregator(Aggregator):
    """FedAvg (McMahan et al. 2017, "Communication-Efficient Learning of Deep Networks from Decentralized Data",
    arXiv:1602.05629).

    `Theta <- Theta + sum_i (|D_i| / sum_j |D_j|) Delta_i` for every tensor, expert or not.
    """

    config_class = FedAvgConfig

    def _aggregate(self, global_state, stream):
        by_size = _data_size_scores(_sample_sizes(stream))
        return _expert_weighted_mean(stream, global_state, lambda group, num_experts: by_size, need_norms=False)


@register_aggregator("fedprox")
class FedProxAggregator(FedAvgAggregator):
    """FedProx (Li et al. 2020, "Federated Optimization in Heterogeneous Networks", arXiv:1812.06127).

    The server side is FedAvg: FedProx changes the clients' objective, adding `mu/2 * ||theta - Theta||^2` (the
    trainer's proximal term). `config.proximal_mu` is carried here so a simulation configures both sides from one place.
    """

    config_class = FedProxConfig


@register_aggregator("pfl_moe")
class PFLMoEAggregator(FedAvgAggregator):
    """PFL-MoE (Guo et al. 2021, "PFL-MoE: Personalized Federated Learning Based on Mixture of Experts",
    arXiv:2012.15589).

    The server is FedAvg: `Theta <- Theta + sum_i (|D_i| / sum |D|) Delta_i`. Each client then freezes the FedAvg model,
    trains a personal copy (on 3/4 of its data) and a gate `g = sigmoid(w . x)` (on 1/4) that mixes the two:
    `output = g * f_global + (1 - g) * f_personal`. The personal copy and the gate never leave the client, so the
    server returns only the global state; `personalized_state` is the global state (the mixing is client-side).
    """

    config_class = PFLMoEConfig


@register_aggregator("fedmoe")
class FedMoEAggregator(Aggregator):
    """FedMoE stand-in: usage-thresholded expert averaging (Mei et al. 2024, arXiv:2408.11304; formula from the
    same group's HFedMoE).

    With `u_c(e)` the mean gate value of expert `e` on client `c`'s data and `tau` the usage threshold,
    `E_e <- sum_c |D_c| 1[u_c(e) >= tau] E_e(c) / sum_c |D_c| 1[u_c(e) >= tau]`, applied to updates:
    `Theta_e += sum_c w_c Delta_e(c)` with those weights. An expert no client uses enough stays unchanged. Shared
    tensors: FedAvg. A client without `mean_gate` for a group uses its activation-count shares `f / sum f` instead
    (both sum to 1 over experts); a client with neither never used the group.
    """

    config_class = FedMoEConfig

    def _usage(self, updates: Sequence[ClientUpdate], group: str, num_experts: int) -> torch.Tensor:
        usage = torch.zeros(len(updates), num_experts, dtype=torch.float64)
        for i, update in enumerate(updates):
            if group in update.mean_gate:
                usage[i] = update.mean_gate[group].double()
            elif group in update.activation_counts:
                counts = update.activation_counts[group].double()
                if counts.sum() > 0:
                    usage[i] = counts / counts.sum()
        return usage

    def _aggregate(self, global_state, stream):
        cfg = self.config
        sizes = _sample_sizes(stream)

        def scores_of(group, num_experts):
            tau = cfg.usage_threshold / num_experts if cfg.threshold_relative else cfg.usage_threshold
            scores = sizes.unsqueeze(1) * (self._usage(stream.updates, group, num_experts) >= tau).double()
            return lambda i, norms: scores[i]

        return _expert_weighted_mean(stream, global_state, scores_of, need_norms=True)


@register_aggregator("ties")
class TiesAggregator(Aggregator):
    """TIES-Merging (Yadav et al. 2023, "TIES-Merging: Resolving Interference When Merging Models",
    arXiv:2306.01708), applied to client updates tensor by tensor.

    1. Trim: keep the `density` fraction of each update's entries with the largest magnitude (per tensor), zero the
       rest: `hat Delta_i`;
    2. elect: `gamma = sign(sum_i hat Delta_i)` per entry;
    3. disjoint mean: `Delta = mean over {i : sign(hat Delta_i) = gamma, hat Delta_i != 0} of hat Delta_i`;
    4. `Theta <- Theta + scaling * Delta`.

    Unweighted, as in the paper. Two streaming reads per tensor; per-client trim thresholds are kept between them.
    """

    config_class = TiesConfig

    @staticmethod
    def _threshold(values: torch.Tensor, density: float) -> torch.Tensor:
        flat = values.abs().flatten()
        keep = max(1, math.ceil(density * flat.numel()))
        return torch.kthvalue(flat, flat.numel() - keep + 1).values

    def _aggregate(self, global_state, stream):
        cfg = self.config
        new = {}
        for key in global_state.keys():
            theta = global_state[key]
            device = theta.device
            elect = torch.zeros(rows_shape(theta.shape, False), dtype=ACCUMULATE_DTYPE, device=device)
            thresholds = []
            for i, (t,) in stream.clients(range(len(stream)), [key], device, expert_rows=False):
                stream.check(i, [key], [t], need_norms=True)
                threshold = self._threshold(t, cfg.density)
                thresholds.append(threshold)
                elect.add_(torch.where(t.abs() >= threshold, t, 0.0), alpha=float(stream.clip[i]))
                stream.release([t])
            sign = torch.sign(elect)
            total = torch.zeros_like(elect)
            count = torch.zeros_like(elect)
            for i, (t,) in stream.clients(range(len(stream)), [key], device, expert_rows=False):
                trimmed = torch.where(t.abs() >= thresholds[i], t, 0.0) * float(stream.clip[i])
                agree = (torch.sign(trimmed) == sign) & (trimmed != 0)
                total.add_(torch.where(agree, trimmed, 0.0))
                count.add_(agree.to(count.dtype))
                stream.release([t])
            merged = total / count.clamp_min(1.0)
            new[key] = _apply_step(theta, cfg.scaling * merged, expert_rows=False)
        return AggregationResult(global_state=new, client_ids=[u.client_id for u in stream.updates])


class _ServerOptimizer(Aggregator):
    """FedAvg's step as a pseudo-gradient `d_t = sum_i (|D_i| / sum |D|) Delta_i`, fed to a server optimizer.

    Moment buffers are float32 tensors shaped like the global state (one or two extra adapters of memory), kept in
    the aggregator and checkpointed through `state_dict()`.
    """

    _buffers: ClassVar[tuple[str, ...]] = ()

    def __init__(self, config=None, **kwargs):
        super().__init__(config, **kwargs)
        self._state: dict[str, dict[str, torch.Tensor]] = {name: {} for name in self._buffers}
        self._step = 0
        self._pending: Optional[dict[str, dict[str, torch.Tensor]]] = None

    def _update(self, d: torch.Tensor, state: dict[str, Optional[torch.Tensor]]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """`(server step to add to Theta, new buffers)` from the pseudo-gradient `d` and the old buffers."""
        raise NotImplementedError

    def _aggregate(self, global_state, stream):
        existing = next((b for b in self._state.values() if b), None)
        if existing is not None and set(existing) != set(global_state.keys()):
            raise ValueError(
                f"{type(self).__name__}'s optimizer state does not match the global state's keys "
                f"(e.g. {sorted(set(existing) ^ set(global_state.keys()))[:3]}); load a matching state_dict or start afresh."
            )
        pending = {name: {} for name in self._buffers}
        new = {}
        for key, theta, d in _fedavg_steps(stream, global_state):
            step, buffers = self._update(d, {name: self._state[name].get(key) for name in self._buffers})
            for name, value in buffers.items():
                pending[name][key] = value
            new[key] = (theta.to(ACCUMULATE_DTYPE) + step).to(theta.dtype)
        self._pending = pending
        return AggregationResult(global_state=new, client_ids=[u.client_id for u in stream.updates])

    def _discard_pending(self) -> None:
        self._pending = None

    def _commit_pending(self) -> None:
        if self._pending is not None:
            self._state, self._pending = self._pending, None
            self._step += 1

    def state_dict(self) -> dict[str, torch.Tensor]:
        """`{"step": ()}` plus `"<buffer>/<key>"` float32 tensors (e.g. `"m/..."`, `"v/..."`)."""
        out = {"step": torch.tensor(self._step, dtype=torch.int64)}
        for name, buffers in self._state.items():
            out.update({f"{name}/{key}": value for key, value in buffers.items()})
        return out

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        if "step" not in state:
            raise ValueError(f"{type(self).__name__} state lacks 'step'.")
        buffers: dict[str, dict[str, torch.Tensor]] = {name: {} for name in self._buffers}
        for full_key, value in state.items():
            if full_key == "step":
                continue
            name, sep, key = full_key.partition("/")
            if not sep or name not in buffers:
                raise ValueError(f"Unexpected key {full_key!r} in {type(self).__name__} state; buffers: {self._buffers}.")
            buffers[name][key] = value.to(ACCUMULATE_DTYPE).clone()
        self._state, self._step, self._pending = buffers, int(state["step"]), None


@register_aggregator("fedavgm")
class FedAvgMAggregator(_ServerOptimizer):
    """FedAvgM (Hsu et al. 2019, "Measuring the Effects of Non-Identical Data Distribution for Federated Visual
    Classification", arXiv:1909.06335).

    `m_t = beta * m_{t-1} + d_t`, `Theta <- Theta + eta * m_t`, with `d_t` FedAvg's step and `m_0 = 0`.
    """

    config_class = FedAvgMConfig
    _buffers = ("momentum",)

    def _update(self, d, state):
        cfg = self.config
        m = d.clone() if state["momentum"] is None else cfg.server_momentum * state["momentum"] + d
        return cfg.server_learning_rate * m, {"momentum": m}


class _AdaptiveServerOptimizer(_ServerOptimizer):
    """Reddi et al. 2021 Algorithm 2: `m_t = beta_1 m + (1 - beta_1) d`, `v_t` per variant,
    `Theta <- Theta + eta * m_t / (sqrt(v_t) + tau)`; `m` and `v` start at 0 (as Flower does), no bias correction."""

    _buffers = ("m", "v")

    def _second_moment(self, v: torch.Tensor, d2: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _update(self, d, state):
        cfg = self.config
        m_prev = torch.zeros_like(d) if state["m"] is None else state["m"]
        v_prev = torch.zeros_like(d) if state["v"] is None else state["v"]
        m = cfg.beta_1 * m_prev + (1 - cfg.beta_1) * d
        v = self._second_moment(v_prev, d * d)
        return cfg.server_learning_rate * m / (v.sqrt() + cfg.tau), {"m": m, "v": v}


@register_aggregator("fedadagrad")
class FedAdagradAggregator(_AdaptiveServerOptimizer):
    """FedAdagrad (Reddi et al. 2021, arXiv:2003.00295): `v_t = v_{t-1} + d_t^2`."""

    config_class = FedAdagradConfig

    def _second_moment(self, v, d2):
        return v + d2


@register_aggregator("fedadam")
class FedAdamAggregator(_AdaptiveServerOptimizer):
    """FedAdam (Reddi et al. 2021, arXiv:2003.00295): `v_t = beta_2 v_{t-1} + (1 - beta_2) d_t^2`."""

    config_class = FedAdamConfig

    def _second_moment(self, v, d2):
        return self.config.beta_2 * v + (1 - self.config.beta_2) * d2


@register_aggregator("fedyogi")
class FedYogiAggregator(_AdaptiveServerOptimizer):
    """FedYogi (Reddi et al. 2021, arXiv:2003.00295): `v_t = v_{t-1} - (1 - beta_2) d_t^2 sign(v_{t-1} - d_t^2)`."""

    config_class = FedYogiConfig

    def _second_moment(self, v, d2):
        return v - (1 - self.config.beta_2) * d2 * torch.sign(v - d2)


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

    def _cache_bytes(self) -> int:
        return int(self.config.merge_buffer_mb * 2**20)

    def _aggregate(self, global_state, stream):
        cfg = self.config
        sizes = _sample_sizes(stream)
        groups, shared = group_keys(global_state.keys())
        new: dict[str, torch.Tensor] = {}
        weights, diagnostics, coefficients = {}, {}, {}
        owned = _owns_tensors(global_state)
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
        new.update(_fedavg_shared(stream, global_state, shared, sizes))
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
        return _data_size_scores(sizes)

    def _consensus_group(self, stream, keys, theta, counts, sizes, owned, buffers):
        cfg = self.config
        device = theta[0].device
        filtered = cfg.use_retention and cfg.retention_mode == "filtered"
        if cfg.use_projection:
            expert_numel = sum(rows_shape(t.shape, True)[1] for t in theta)
            chunk = experts_per_chunk(len(stream), expert_numel, self._cache_bytes())
            if chunk > 0:
                merged, weights, diag, a, scale = self._stacked_consensus_group(
                    stream, keys, theta, counts, sizes, chunk, owned, buffers
                )
                return merged, weights, diag, (a / scale.unsqueeze(0) if filtered else None)
        result = _weighted_group(
            stream,
            keys,
            theta,
            self._scores(counts, sizes),
            need_norms=cfg.use_importance or cfg.use_projection,
            keep=cfg.use_projection,
        )
        weights = normalize_scores(result.scores)
        # The consensus g[k] = sum_i w[i,k] Delta[i,k] is sums * inverse: kept unnormalised, scaled in the statistics.
        inverse = result.inverse_total()
        if not cfg.use_projection:
            return [_apply_step(t, u, True, inverse, owned) for t, u in zip(theta, result.sums)], weights, None, None

        # Clients with no weight in this group need no dot product, unless the filtered residual needs theirs.
        readers = range(len(stream)) if filtered else [i for i in range(len(stream)) if bool((weights[i] > 0).any())]
        dots = dot_pass(stream, keys, readers, [result.sums], expert_rows=True, device=device)[:, 0] * inverse
        g_sq = row_dots(result.sums, result.sums) * inverse.square()
        a, scale, diag = consensus_statistics(weights, result.norms, dots, g_sq)
        merged = [_apply_step(t, u, True, scale * inverse, owned) for t, u in zip(theta, result.sums)]
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
            scores = counts[:, part] * norms[:, part] if cfg.use_importance else sizes.unsqueeze(1).expand(k, stop - start)
            weights[:, part] = normalize_scores(scores)
            # Clipping scales client i's update: fold it into the weights and the dot products, not into the data.
            _, chunk_dots, g_sq[part] = stacked_consensus(stacked, weights[:, part] * clip, out=[g[part] for g in consensus])
            dots[:, part] = chunk_dots * clip
        a, scale, diag = consensus_statistics(weights, norms, dots, g_sq)
        merged = [_apply_step(t, g, True, scale, owned) for t, g in zip(theta, consensus)]
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
        scores = counts * norms if cfg.use_importance else sizes.unsqueeze(1).expand_as(norms)
        weights = normalize_scores(scores)
        _, combination, diag = pairwise_statistics(weights, gram)
        steps = [torch.einsum("ke,ked->ed", combination.to(ACCUMULATE_DTYPE), x) for x in stacked]
        merged = [_apply_step(t, s, True) for t, s in zip(theta, steps)]
        return merged, weights, diag, None
