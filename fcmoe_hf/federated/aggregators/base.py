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

import difflib
import math
import typing
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any, ClassVar, Optional, Union

import torch

from ..bounds import CappedUpdate, UpdateBounds, cap_counts
from ..client_config import ClientConfig
from ..io.safetensors import LazySafetensors
from ..io.stream import UpdateStream
from ..update import ClientUpdate
from ..validation import (
    ContentRejected,
    Received,
    RejectedUpdate,
    check_global_state,
    check_update_norm,
    clip_factor,
    measure_update,
    median_norm,
    reject,
    relative_norm_problem,
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
        norm_bound_factor (`float`, *optional*): the default defence against scaled updates: an update whose L2 norm
            exceeds `norm_bound_factor` times the round's median update norm is rejected (or clipped, see
            `norm_bound_action`); it binds against one client from 3 clients on. 10 by default: honest clients
            of one round train the same number of local steps at the same learning rate and differ by a few times at
            most, while a scaled (e.g. sign-flipped x100) update stands out. FC-MoE also caps the norm in its
            importance `f * ||Delta||` at this factor times the expert's median, so weight cannot be bought by
            scaling. `None` turns both off.
        norm_bound_action (`str`): `"reject"` (default: the update is left out, and the merge equals the merge
            without it; norms are tracked during the merge, so an honest round costs no extra read) or `"clip"` (the
            update is scaled down to the bound; costs one extra read of every update, like `clip_update_norm`).
        enforce_bounds (`bool`): enforce the [`~fcmoe_hf.federated.UpdateBounds`] the transport passes to `aggregate`
            (assigned ids, `num_samples` up to the assigned partition, possible activation counts). `False` ignores
            them (for comparisons with the defences off); the static checks stay on.
        bounds_action (`str`): what happens to an update whose self-reported counts break the bounds. `"cap"`
            (default): they are capped ([`~fcmoe_hf.federated.bounds.cap_counts`]: `num_samples` to the partition
            size, activation counts to the round's typical rate per sample), so the lie buys no weight while the
            client's deltas still count (listed in `AggregationResult.capped`). `"reject"`: the update is left out,
            its honest data too. An id not assigned to the round is rejected either way.
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

    norm_bound_factor: Optional[float] = field(
        default=10.0,
        metadata={"help": "Reject (or clip) client updates with an L2 norm above this factor times the round's median norm; None: off."},
    )
    norm_bound_action: str = field(
        default="reject", metadata={"help": "What the relative norm bound does.", "choices": ["reject", "clip"]}
    )
    enforce_bounds: bool = field(
        default=True, metadata={"help": "Enforce the round's UpdateBounds (assigned ids, partition sizes, activation counts)."}
    )
    bounds_action: str = field(
        default="cap",
        metadata={"help": "What a count beyond the round's bounds gets: capped to it, or the update rejected.", "choices": ["cap", "reject"]},
    )

    def __post_init__(self):
        self._check_types()
        if self.norm_bound_action not in ("reject", "clip"):
            raise ValueError(f"norm_bound_action must be 'reject' or 'clip', got {self.norm_bound_action!r}.")
        if self.bounds_action not in ("cap", "reject"):
            raise ValueError(f"bounds_action must be 'cap' or 'reject', got {self.bounds_action!r}.")
        factor = self.norm_bound_factor
        if factor is not None and not (isinstance(factor, (int, float)) and factor >= 1 and math.isfinite(factor)):
            raise ValueError(f"norm_bound_factor must be a finite number >= 1 or None, got {factor!r}.")
        if isinstance(self.min_clients, bool) or not isinstance(self.min_clients, int) or self.min_clients < 1:
            raise ValueError(f"min_clients must be an integer >= 1, got {self.min_clients!r}.")
        for name in ("max_update_norm", "clip_update_norm"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, (int, float)) and value > 0 and math.isfinite(value)):
                raise ValueError(f"{name} must be a positive finite number or None, got {value!r}.")

    def _check_types(self) -> None:
        # Every field against its annotation: a bool field takes only True/False (not "no", not 0), a number field
        # a real int/float (an int field an int), never a bool; `Optional[...]` fields also take None.
        hints = typing.get_type_hints(type(self))
        for f in fields(self):
            hint, value = hints[f.name], getattr(self, f.name)
            args = [a for a in typing.get_args(hint) if a is not type(None)]
            if value is None and len(args) < len(typing.get_args(hint)):
                continue
            kind = args[0] if typing.get_origin(hint) is Union and len(args) == 1 else hint
            expected = {bool: "a bool (true or false)", int: "an integer", float: "a number", str: "a string"}.get(kind)
            is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
            ok = {bool: isinstance(value, bool), int: is_number and isinstance(value, int), float: is_number,
                  str: isinstance(value, str)}.get(kind, True)
            if not ok:
                raise ValueError(
                    f"aggregator_config: {f.name} must be {expected}, got {type(value).__name__} {value!r} "
                    f"({type(self).__name__})."
                )

    def to_dict(self) -> dict[str, Any]:
        """The configuration as a plain dict (for checkpoints and model cards)."""
        return asdict(self)




def check_config_fields(config_class: type[AggregatorConfig], names: Iterable[Any], aggregator: str) -> None:
    """Raise a `ValueError` naming the first of `names` that is not a field of `config_class`, with the closest field.

    Args:
        config_class (`type[AggregatorConfig]`): the aggregator's config dataclass.
        names (`Iterable[Any]`): the keys given (an `aggregator_config` mapping's, keyword overrides).
        aggregator (`str`): the aggregator's registered name, for the message.
    """
    known = [f.name for f in fields(config_class)]
    for name in names:
        if name in known:
            continue
        close = difflib.get_close_matches(str(name), known, n=1, cutoff=0.6)
        hint = f"did you mean {close[0]!r}?" if close else f"its fields: {', '.join(known)}"
        raise ValueError(f"aggregator_config: unknown field {name!r} for {aggregator} ({hint})")


class Aggregator:
    """Base class: validation, the rejection loop, and server state; subclasses implement `_aggregate`.

    Args:
        config ([`AggregatorConfig`] subclass or `dict`, *optional*): the configuration (`config_class()` defaults).
        **kwargs: overrides of single config fields.
    """

    name: ClassVar[str] = "base"
    config_class: ClassVar[type[AggregatorConfig]] = AggregatorConfig

    def __init__(self, config: Union[AggregatorConfig, Mapping[str, Any], None] = None, **kwargs: Any):
        check_config_fields(self.config_class, [*(config if isinstance(config, Mapping) else ()), *kwargs], self.name)
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

    def aggregate(
        self,
        global_state: Mapping[str, torch.Tensor],
        updates: Union[Sequence[Received], Mapping[str, Received]],
        bounds: Optional[UpdateBounds] = None,
    ) -> AggregationResult:
        """Merge `updates` into `global_state` and return the new state with personalization and diagnostics.

        Args:
            global_state (`Mapping[str, torch.Tensor]`): the previous global state (not modified; may be lazy).
            updates (`Sequence[ClientUpdate]` or `Mapping[str, ClientUpdate]`): this round's client updates (not
                modified; deltas may be lazy). A mapping binds each update to the sender the transport received it
                from (`{sender_id: update}`): an update claiming another id is rejected as spoofed. Items may also
                be [`RejectedUpdate`]s (rejected upstream, e.g. unreadable files); they are reported as rejected.
            bounds ([`UpdateBounds`], *optional*): what the transport knows about the round (assigned ids,
                partition sizes, activation bounds), enforced when `config.enforce_bounds`: an unassigned id is
                rejected, counts beyond the bounds are capped or the update rejected (`config.bounds_action`).

        Raises:
            `ValueError`: if fewer than `config.min_clients` valid updates remain (the message lists the rejections),
                or if `global_state` itself is malformed.
        """
        items = updates.values() if isinstance(updates, Mapping) else updates
        try:
            return self._aggregate_validated(global_state, updates, bounds)
        finally:
            # Lazily read files keep a descriptor while in use; a server must not hold K of them between rounds.
            for source in [global_state, *(getattr(u, "deltas", None) for u in items)]:
                if isinstance(source, LazySafetensors):
                    source.close()

    __call__ = aggregate

    def _aggregate_validated(self, global_state, updates, bounds) -> AggregationResult:
        cfg = self.config
        relative = cfg.norm_bound_factor
        with torch.no_grad():
            check_global_state(global_state)
            enforced = bounds if cfg.enforce_bounds else None
            capping = enforced is not None and cfg.bounds_action == "cap"
            valid, rejected = validate_updates(
                updates, global_state, check_values=False, bounds=enforced.assignment_only() if capping else enforced
            )
            capped: list[CappedUpdate] = []
            if capping:
                valid, capped = cap_counts(valid, enforced)
            require_min_clients(len(valid), rejected, cfg.min_clients)
            clip: Optional[list[float]] = None
            reference: Optional[float] = None  # the median norm the relative bound refers to, fixed once known
            if cfg.clip_update_norm is not None or (relative is not None and cfg.norm_bound_action == "clip"):
                valid, clip = self._clip_factors(valid, rejected)
            track = clip is None and (cfg.max_update_norm is not None or relative is not None)
            while True:
                stream = UpdateStream(valid, clip, track_norms=track, cache_bytes=self._cache_bytes())
                self._discard_pending()
                problems: dict[int, str] = {}
                try:
                    result = self._aggregate(global_state, stream)
                except ContentRejected as err:
                    problems = err.problems
                else:
                    if stream.track_norms:
                        norms = stream.norms()
                        if reference is None and relative is not None:
                            reference = median_norm(norms)
                        for i, norm in enumerate(norms):
                            reason = check_update_norm(norm, cfg.max_update_norm) or relative_norm_problem(norm, reference, relative)
                            if reason is not None:
                                problems[i] = reason
                    if not problems:
                        problems = self._overflow_problems(result, stream)
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
        result.capped = [c for c in capped if c.client_id in result.client_ids]
        scales = clip if clip is not None else [1.0] * len(valid)
        result.update_scales = {u.client_id: float(c) for u, c in zip(valid, scales, strict=True)}
        return result

    def _overflow_problems(self, result: AggregationResult, stream: UpdateStream) -> dict[int, str]:
        """`{}` if the merged state is finite; else the client with the largest (clipped) update norm, whose finite
        but huge values overflowed the merge: it is rejected and the round goes on without it."""
        bad = [key for key, t in result.global_state.items() if not bool(torch.isfinite(t).all())]
        if not bad:
            return {}
        if stream.track_norms:
            norms = stream.norms()
        else:
            norms = [measure_update(u)[0] * float(c) for u, c in zip(stream.updates, stream.clip.tolist())]
        norms = [n if math.isfinite(n) else math.inf for n in norms]
        worst = max(range(len(norms)), key=lambda i: norms[i])
        return {worst: f"merging it overflows float32 in {bad[0]!r} (update norm {norms[worst]:.4g}, the round's largest)"}

    def _clip_factors(self, valid: list[ClientUpdate], rejected: list[RejectedUpdate]) -> tuple[list[ClientUpdate], list[float]]:
        cfg = self.config
        kept, norms = [], []
        for update in valid:
            norm, reason = measure_update(update)
            reason = reason or check_update_norm(norm, cfg.max_update_norm)
            if reason is not None:
                rejected.append(reject(update.client_id, reason))
                continue
            kept.append(update)
            norms.append(norm)
        require_min_clients(len(kept), rejected, cfg.min_clients)
        bound = cfg.clip_update_norm
        if cfg.norm_bound_factor is not None and norms:
            reference = median_norm(norms)
            if cfg.norm_bound_action == "reject":
                keep = [relative_norm_problem(n, reference, cfg.norm_bound_factor) for n in norms]
                rejected.extend(reject(u.client_id, r) for u, r in zip(kept, keep) if r is not None)
                kept = [u for u, r in zip(kept, keep) if r is None]
                norms = [n for n, r in zip(norms, keep) if r is None]
                require_min_clients(len(kept), rejected, cfg.min_clients)
            elif reference > 0:
                relative_bound = cfg.norm_bound_factor * reference
                bound = relative_bound if bound is None else min(bound, relative_bound)
        return kept, [clip_factor(n, bound) for n in norms]

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
