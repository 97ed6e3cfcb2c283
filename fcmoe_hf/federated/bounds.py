"""What the server can verify about a client's self-reported numbers, and strict parsing of update metadata.

A client reports its sample count (`num_samples`, the FedAvg weight) and its expert activation counts (FC-MoE's `f`).
Unchecked, one client can claim `10**12` samples or `1e30` activations and take the whole weight of a merge. Two
layers of checks bound them:

- static checks, always on: exact non-negative integers (no `bool`, no `3.7`, no `"12"`), at most
  [`MAX_COUNT`] (`2**53`, the largest integer float64 holds exactly, so weights never overflow);
- round checks, when the transport knows more ([`UpdateBounds`]): the ids it assigned to the round, each client's
  partition size, and how many expert activations one sample can produce in local training (tokens per sample x
  passes over the data x `top_k`). A number beyond a bound the server can verify is proof of a broken or lying client:
  the update is *rejected*, not capped (a capped liar would still be merged).

The simulation ([`~fcmoe_hf.simulation.FederatedSimulation`]) and a Flower strategy build an [`UpdateBounds`] per
round and pass it to [`~fcmoe_hf.federated.Aggregator.aggregate`].
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

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
            larger `num_samples` is rejected. `None`: unknown (only the static bound applies).
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
            data (epochs) x top_k`. A client's `sum(activation_counts[group])` above `num_samples x` this is rejected.
        top_k (`int`, *optional*): experts per token. A token routes to an expert at most once per pass, so one
            expert's count above `num_samples x max_activations_per_sample / top_k` is rejected too.
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

    def check(self, client_id: str, num_samples: int, activation_counts: Mapping[str, torch.Tensor]) -> Optional[str]:
        """`None` if a (structurally valid) update is within these bounds, else the reason naming the field."""
        if self.clients is not None:
            if client_id not in self.clients:
                return f"client_id {client_id!r} was not assigned to this round"
            limit = self.clients[client_id].max_num_samples
            if limit is not None and num_samples > limit:
                return f"num_samples {num_samples} exceeds the client's assigned partition size {limit}"
        if self.max_activations_per_sample is None:
            return None
        total_limit = num_samples * self.max_activations_per_sample
        for group, counts in activation_counts.items():
            counts = counts.double()
            total = float(counts.sum())
            if total > total_limit:
                return (
                    f"activation_counts[{group!r}] sums to {total:.6g}, more than num_samples x "
                    f"max_activations_per_sample = {total_limit:.6g}"
                )
            if self.top_k is not None and counts.numel() and float(counts.max()) > total_limit / self.top_k:
                return (
                    f"activation_counts[{group!r}] has an expert with {float(counts.max()):.6g} activations, more than "
                    f"num_samples x max_activations_per_sample / top_k = {total_limit / self.top_k:.6g}"
                )
        return None


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

