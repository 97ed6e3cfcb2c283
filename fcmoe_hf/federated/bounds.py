"""What the server can verify about a client's self-reported numbers, and strict parsing of update metadata.

A client reports its sample count (`num_samples`, the FedAvg weight) and its expert activation counts (FC-MoE's `f`).
Unchecked, one client can claim `10**12` samples or `1e30` activations and take the whole weight of a merge. Two
layers of checks bound them:

- static checks, always on: exact non-negative integers (no `bool`, no `3.7`, no `"12"`), at most
  [`MAX_COUNT`] (`2**53`, the largest integer float64 holds exactly, so weights never overflow);
- round checks, when the transport knows more ([`UpdateBounds`]): the ids it assigned to the round, each client's
  partition size, and how many expert activations one sample can produce in local training (tokens per sample x
  passes over the data x `top_k`). An id outside the round is always rejected. A count beyond a verifiable bound is,
  by default, *capped* ([`cap_counts`]): `num_samples` to the assigned partition size, and the activation counts to
  what a typical client of the round reports per sample, so the lie buys no weight while the client's deltas (honest
  data, possibly) still count; the deltas themselves face the norm bound like any other. `bounds_action="reject"`
  leaves such a client out instead, which also drops whatever honest data it trained on.

The simulation ([`~fcmoe_hf.simulation.FederatedSimulation`]) and a Flower strategy build an [`UpdateBounds`] per
round and pass it to [`~fcmoe_hf.federated.Aggregator.aggregate`].
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional

import torch

if TYPE_CHECKING:
    from .update import ClientUpdate

logger = logging.getLogger(__name__)

#: Largest sample or activation count accepted anywhere (`2**53`: exact in float64, the dtype weights are computed in).
MAX_COUNT = 2**53


def describe_value(value: Any) -> str:
    """A short, safe description of an untrusted value for an error message (huge integers are not printed)."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 64:
        return f"an integer of {value.bit_length()} bits"
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 40 else text[:37] + '...'}"


def count_problem(value: Any, field_name: str, *, minimum: int = 0, maximum: int = MAX_COUNT) -> Optional[str]:
    """`None` if `value` is an exact integer in `[minimum, maximum]`, else the reason naming `field_name`.

    `bool` is rejected although Python counts it as an `int`; so are floats (even `12.0`) and strings (even `"12"`).
    """
    if isinstance(value, bool) or not isinstance(value, int):
        return f"{field_name} must be an integer, got {describe_value(value)}"
    if value < minimum or value > maximum:
        return f"{field_name} must be in [{minimum}, {maximum}], got {describe_value(value) if value > maximum else value}"
    return None


def parse_count(value: Any, field_name: str, source: str, *, minimum: int = 0, maximum: int = MAX_COUNT) -> int:
    """`value` if it is an exact integer in `[minimum, maximum]`.

    Raises:
        `ValueError`: naming `source` (a file or a client) and `field_name`.
    """
    problem = count_problem(value, field_name, minimum=minimum, maximum=maximum)
    if problem is not None:
        raise ValueError(f"{source}: {problem}.")
    return value


def counts_problem(name: str, values: torch.Tensor) -> Optional[str]:
    """`None` if a tensor of activation counts holds whole numbers within [`MAX_COUNT`] (each and in total)."""
    values = values.double()
    if not bool((values == values.round()).all()):
        return f"{name} has non-integer values (counts of tokens must be whole numbers)"
    if values.numel() and (float(values.max()) > MAX_COUNT or float(values.sum()) > MAX_COUNT):
        return f"{name} exceeds the largest accepted count {MAX_COUNT}"
    return None


@dataclass(frozen=True)
class ClientExpectation:
    """What the server knows about one client it assigned to a round.

    Args:
        max_num_samples (`int`, *optional*): the size of the data partition the server assigned to the client: a
            larger `num_samples` breaks the bounds (capped or rejected, see `bounds_action`). `None`: unknown (only
            the static bound applies).
    """

    max_num_samples: Optional[int] = None

    def __post_init__(self):
        if self.max_num_samples is not None:
            parse_count(self.max_num_samples, "max_num_samples", "ClientExpectation", minimum=1)


@dataclass(frozen=True)
class UpdateBounds:
    """What the transport (simulation loop, Flower strategy) knows about a round, for the aggregator to enforce.

    Every field is optional; with none set only the static checks apply (the behaviour of `aggregate` without bounds).

    Args:
        clients (`Mapping[str, ClientExpectation]`, *optional*): the client ids assigned to this round. An update from
            any other id is rejected. `None`: ids are not checked (beyond duplicates).
        max_activations_per_sample (`float`, *optional*): the most expert activations one training sample can produce
            in one expert group during a client's local training: `tokens per sample (max_length) x passes over the
            data (epochs) x top_k`. A client's `sum(activation_counts[group])` above `num_samples x` this breaks the
            bounds (capped or rejected, see `bounds_action`).
        top_k (`int`, *optional*): experts per token. A token routes to an expert at most once per pass, so one
            expert's count above `num_samples x max_activations_per_sample / top_k` breaks them too.
    """

    clients: Optional[Mapping[str, ClientExpectation]] = None
    max_activations_per_sample: Optional[float] = None
    top_k: Optional[int] = field(default=None)

    def __post_init__(self):
        value = self.max_activations_per_sample
        if value is not None and not (isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0 and math.isfinite(value)):
            raise ValueError(f"UpdateBounds.max_activations_per_sample must be a positive number, got {value!r}.")
        if self.top_k is not None:
            parse_count(self.top_k, "top_k", "UpdateBounds", minimum=1)
        if self.clients is not None:
            for cid, expectation in self.clients.items():
                if not isinstance(expectation, ClientExpectation):
                    raise TypeError(f"UpdateBounds.clients[{cid!r}] must be a ClientExpectation, got {type(expectation).__name__}.")

    @classmethod
    def for_round(
        cls,
        partition_sizes: Mapping[str, Optional[int]],
        *,
        max_length: Optional[int] = None,
        passes: float = 1.0,
        top_k: Optional[int] = None,
        slack: float = 2.0,
    ) -> UpdateBounds:
        """The bounds of a round from what a simulation knows: the sampled clients' partition sizes, the tokenizer's
        `max_length`, the local passes over the data (`num_train_epochs`, rounded up) and the router's `top_k`.

        `slack` (2 by default) multiplies the activation bound: a forward pass recomputed under gradient
        checkpointing routes its tokens again. An honest client stays within it; an inflating one gains at most that
        factor. Without `max_length` the activation counts are not bounded (beyond the static check).
        """
        if not (isinstance(passes, (int, float)) and passes > 0 and math.isfinite(passes)):
            raise ValueError(f"passes must be a positive number, got {passes!r}.")
        per_sample = None
        if max_length is not None:
            per_sample = float(max_length) * math.ceil(passes) * (top_k or 1) * slack
        clients = {cid: ClientExpectation(max_num_samples=size) for cid, size in partition_sizes.items()}
        return cls(clients=clients, max_activations_per_sample=per_sample, top_k=top_k)

    def assignment_problem(self, client_id: str) -> Optional[str]:
        """`None` if `client_id` was assigned to this round (or ids are not known), else the reason."""
        if self.clients is not None and client_id not in self.clients:
            return f"client_id {client_id!r} was not assigned to this round"
        return None

    def assignment_only(self) -> UpdateBounds:
        """These bounds without the count limits: only the round's ids are checked."""
        clients = None if self.clients is None else {cid: ClientExpectation() for cid in self.clients}
        return UpdateBounds(clients=clients)

    def max_num_samples(self, client_id: str) -> Optional[int]:
        """The partition size the server assigned to `client_id` (`None`: unknown)."""
        expectation = None if self.clients is None else self.clients.get(client_id)
        return None if expectation is None else expectation.max_num_samples

    def check(self, client_id: str, num_samples: int, activation_counts: Mapping[str, torch.Tensor]) -> Optional[str]:
        """`None` if a (structurally valid) update is within these bounds, else the reason naming the field."""
        problem = self.assignment_problem(client_id)
        if problem is not None:
            return problem
        if self.clients is not None:
            limit = self.max_num_samples(client_id)
            if limit is not None and num_samples > limit:
                return f"num_samples {num_samples} exceeds the client's assigned partition size {limit}"
        for group, counts in activation_counts.items():
            problem = self.counts_problem(group, counts, num_samples)
            if problem is not None:
                return problem
        return None

    def counts_problem(self, group: str, counts: torch.Tensor, num_samples: int) -> Optional[str]:
        """`None` if one group's activation counts are within what `num_samples` samples can produce, else the reason."""
        limits = self.activation_limits(num_samples)
        if limits is None:
            return None
        total_limit, expert_limit = limits
        counts = counts.double()
        total = float(counts.sum())
        if total > total_limit:
            return (
                f"activation_counts[{group!r}] sums to {total:.6g}, more than num_samples x "
                f"max_activations_per_sample = {total_limit:.6g}"
            )
        if counts.numel() and float(counts.max()) > expert_limit:
            return (
                f"activation_counts[{group!r}] has an expert with {float(counts.max()):.6g} activations, more than "
                f"num_samples x max_activations_per_sample / top_k = {expert_limit:.6g}"
            )
        return None

    def activation_limits(self, num_samples: int) -> Optional[tuple[float, float]]:
        """The most activations `num_samples` samples can produce in one expert group, in total and in one expert
        (`None`: not bounded)."""
        if self.max_activations_per_sample is None:
            return None
        total = num_samples * self.max_activations_per_sample
        return total, total / (self.top_k or 1)


@dataclass(frozen=True)
class CappedUpdate:
    """An update merged with self-reported counts brought within the round's bounds, and what was capped.

    Args:
        client_id (`str`): the client that sent it.
        reason (`str`): what was capped, from what to what.
    """

    client_id: str
    reason: str


def cap_counts(updates: Sequence[ClientUpdate], bounds: UpdateBounds) -> tuple[list[ClientUpdate], list[CappedUpdate]]:
    """`updates` (order kept) with the self-reported counts that break `bounds` brought within them.

    - `num_samples` above the client's assigned partition size becomes that size (the server knows it exactly).
    - A group's activation counts beyond what its `num_samples` samples can produce (in total, or in one expert) are
      scaled, keeping their shape over the experts, to the *typical* rate of the round: the median, over the clients
      within bounds in that group, of activations per sample (the bound itself if none is) times the client's
      `num_samples`, rounded down and each expert clamped at its bound. A client caught inflating its counts thus gets
      no more total activations than a typical client of its size, whatever it claimed.

    What this does not cover: counts just under the bound are not capped (the bound leaves room for padding-free
    texts and recomputed forwards, so it sits above an honest client's rate, by 2 x max_length / mean tokens per
    text), and the shape over the experts is the client's own claim, capped or not (all of a group's activations on
    one expert is possible for an honest top-1 client). Within those limits a liar can still gain weight in FC-MoE's
    importance; robust aggregation (`fedmedian`, `FCMoEConfig(robust=...)`) is the defence there.

    Deltas are untouched (the norm bound judges them), and so is every update within bounds. Ids are not checked here
    (see [`UpdateBounds.assignment_problem`]). Each capped update is logged (WARNING) and listed as a [`CappedUpdate`].
    """
    samples: list[int] = []
    notes: list[list[str]] = [[] for _ in updates]
    for i, update in enumerate(updates):
        n, limit = update.num_samples, bounds.max_num_samples(update.client_id)
        if limit is not None and n > limit:
            notes[i].append(f"num_samples {n} capped to the assigned partition size {limit}")
            n = limit
        samples.append(n)
    counts = [dict(update.activation_counts) for update in updates]
    scaled_groups: list[list[str]] = [[] for _ in updates]  # one note per group; summarised below (a model has dozens)
    for group in sorted({g for update in updates for g in update.activation_counts}):
        rates: list[float] = []
        over: list[int] = []
        for i in range(len(updates)):
            if group in counts[i]:
                if bounds.counts_problem(group, counts[i][group], samples[i]) is None:
                    rates.append(float(counts[i][group].double().sum()) / max(samples[i], 1))
                else:
                    over.append(i)
        if not over:
            continue
        rate = float(torch.tensor(rates, dtype=torch.float64).median()) if rates else bounds.max_activations_per_sample
        for i in over:
            values = counts[i][group].double()
            total_limit, expert_limit = bounds.activation_limits(samples[i])
            target = min(rate * samples[i], total_limit, float(values.sum()))  # a cap never raises a count
            scaled = (values * (target / float(values.sum()))).floor().clamp(max=math.floor(expert_limit))
            counts[i][group] = scaled.to(counts[i][group].dtype)
            scaled_groups[i].append(
                f"[{group!r}] scaled from {float(values.sum()):.6g} to {float(scaled.sum()):.6g} in total (the round's "
                f"median {rate:.6g} activations per sample)"
            )
    for i, groups in enumerate(scaled_groups):
        if len(groups) == 1:
            notes[i].append(f"activation_counts{groups[0]}")
        elif groups:
            notes[i].append(f"activation_counts of {len(groups)} expert groups scaled to the round's median rate, the first: {groups[0]}")
    out: list[ClientUpdate] = []
    capped: list[CappedUpdate] = []
    for i, update in enumerate(updates):
        if notes[i]:
            update = dataclasses.replace(update, num_samples=samples[i], activation_counts=counts[i])
            capped.append(CappedUpdate(update.client_id, "; ".join(notes[i])))
            logger.warning("Capped the counts of client %r: %s", update.client_id, capped[-1].reason)
        out.append(update)
    return out, capped


def local_passes(training_args: Any, partition_sizes: Mapping[str, int], num_processes: int = 1) -> float:
    """How many times a client's local training goes over its data: `num_train_epochs`, or with `max_steps` the
    samples those steps see (over `num_processes` data-parallel ranks) divided by the smallest partition."""
    t = training_args
    if t.max_steps and t.max_steps > 0:
        seen = t.max_steps * t.per_device_train_batch_size * t.gradient_accumulation_steps * num_processes
        return max(seen / max(size, 1) for size in partition_sizes.values())
    return t.num_train_epochs


def routing_top_k(model: Any) -> int:
    """Experts per token of `model`: its active MoE-LoRA adapter's `top_k` or its base's `num_experts_per_tok`
    (the larger), 1 for a dense model."""
    peft_config = getattr(model, "peft_config", {}).get(getattr(model, "active_adapter", None))
    return max(getattr(peft_config, "top_k", 1) or 1, getattr(model.config, "num_experts_per_tok", 1) or 1)
