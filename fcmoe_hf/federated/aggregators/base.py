"""The aggregator interface: configuration, what clients are asked to do, validation and the rejection loop.

Every aggregator takes the previous global state (a `Mapping[str, Tensor]` keyed like the clients' deltas, e.g. the
peft adapter checkpoint keys; it may be lazy, such as a [`~fcmoe_hf.federated.io.LazySafetensors`] over
`adapter_model.safetensors`) and a list of [`~fcmoe_hf.federated.ClientUpdate`]s, and returns an
[`~fcmoe_hf.federated.AggregationResult`]: the new global state, each client's personalization (compact residual
coefficients, materialised on demand), diagnostics and the rejected updates. Before a round,
[`Aggregator.configure_client`] says what every client's local training needs (as Flower strategies'
`configure_train` does): FedProx's proximal term, FC-MoE's retention.

A subclass implements `_aggregate(global_state, stream)` over an [`~fcmoe_hf.federated.io.stream.UpdateStream`] of
structurally valid updates, with the kernels of [`~fcmoe_hf.federated.aggregators.kernels`]; this class does the
rest. Inputs are never modified. Invalid updates are rejected with a logged reason; the merge goes on when at least
`min_clients` valid updates remain, else it raises `ValueError` and the caller's global state stays as it was.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar, Optional, Union

import torch

from ..client_config import ClientConfig
from ..io.safetensors import LazySafetensors
from ..io.stream import UpdateStream
from ..update import ClientUpdate
from ..validation import (
    ContentRejected,
    RejectedUpdate,
    check_global_state,
    check_update_norm,
    clip_factor,
    measure_update,
    reject,
    require_min_clients,
    validate_updates,
)
from .result import AggregationResult


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

    def configure_client(self, server_round: int) -> ClientConfig:
        """What every client's local training needs in round `server_round` (Flower's `configure_train`).

        The default is plain local training; FedProx asks for its proximal term, FC-MoE for retention. The federation
        applies it to each client's training arguments ([`ClientConfig.apply`]).
        """
        return ClientConfig()

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
            check_global_state(global_state)
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
        scales = clip if clip is not None else [1.0] * len(valid)
        result.update_scales = {u.client_id: float(c) for u, c in zip(valid, scales, strict=True)}
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
