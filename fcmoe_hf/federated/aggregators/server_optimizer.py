"""A server optimizer over FedAvg's step (the shared base of FedAvgM and FedOpt)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar, Optional

import torch

from ..io.stream import ACCUMULATE_DTYPE
from .base import Aggregator
from .kernels import fedavg_steps
from .result import AggregationResult


class ServerOptimizerAggregator(Aggregator):
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
        for key, theta, d in fedavg_steps(stream, global_state):
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
