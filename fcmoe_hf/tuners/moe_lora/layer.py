"""MoE-LoRA tuner layer: `E` LoRA experts stored stacked (expert on dimension 0) and a token-level top-k router."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.nn.functional as F
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from .config import MoELoraConfig
from .router import dispatch_statistics, load_balancing_loss, route, route_logits, router_z_loss


def _in_backward_pass() -> bool:
    # Non-reentrant gradient checkpointing re-runs the forward inside backward: statistics and router losses must be
    # recorded by the first forward only, or they would be counted twice.
    current_task = getattr(torch._C, "_current_graph_task_id", None)
    return current_task is not None and current_task() != -1


@dataclass
class RoutingContext:
    """State shared by all MoE-LoRA layers of one model, written by the model before each forward.

    Attributes:
        attention_mask (`torch.Tensor`, *optional*): the `(batch, seq)` attention mask of the current forward; padding
            tokens are kept out of the routing statistics and of the router losses.
        track_statistics (`bool`): accumulate routing statistics (activation counts, gate probabilities).
        collect_router_losses (`bool`): compute the router losses in training forwards and keep them for
            [`MoELoraModel.router_losses`]. On by default, so custom loops that call `router_losses()` work as they
            are; losses nobody read are dropped when the next training forward starts, so at most one forward's
            worth (and the part of its autograd graph only they use) is ever held. Turn it off (through
            [`MoELoraModel.set_router_loss_collection`]) when nothing adds them to the loss, e.g. a plain
            `transformers.Trainer`: the losses are then not even computed. Change it between steps, not between a
            forward and its backward: with gradient checkpointing, the recomputed forward must compute the same ops.
        has_unread_router_losses (`bool`): some layer holds losses that `router_losses()` has not read yet; lets the
            model skip the walk over its layers before a forward when there is nothing to drop.
    """

    attention_mask: Optional[torch.Tensor] = None
    track_statistics: bool = True
    collect_router_losses: bool = True
    has_unread_router_losses: bool = False


@dataclass
class RoutingStatistics:
    """Routing statistics of one MoE-LoRA layer, accumulated on device over forwards since the last reset.

    Attributes:
        activation_counts (`torch.Tensor`): `(E,)` number of tokens routed to each expert (a token counts once for
            each of its top-k experts). FC-MoE's importance `c = f * ||Delta||` uses these as `f`.
        probability_sum (`torch.Tensor`): `(E,)` sum over tokens of each expert's router probability.
        num_tokens (`torch.Tensor`): scalar, number of (non-padding) tokens routed.
    """

    activation_counts: torch.Tensor
    probability_sum: torch.Tensor
    num_tokens: torch.Tensor = field(default_factory=lambda: torch.zeros((), dtype=torch.long))

    @property
    def mean_probability(self) -> torch.Tensor:
        """`(E,)` mean router probability of each expert over the routed tokens."""
        return self.probability_sum / self.num_tokens.clamp_min(1)

    @property
    def mean_gate(self) -> torch.Tensor:
        """Alias of `mean_probability` (the "mean gate value" of usage-thresholded expert averaging)."""
        return self.mean_probability


class MoELoraLayer(BaseTunerLayer):
    """Adapter state of a MoE-LoRA layer, one entry per adapter name.

    Per adapter: `moe_lora_A` `(E, r, in_features)`, `moe_lora_B` `(E, out_features, r)` and the router weight
    `moe_lora_router` `(E, in_features)`. Expert `e` of the layer is `(moe_lora_A[e], moe_lora_B[e])`.
    """

    adapter_layer_names = ("moe_lora_A", "moe_lora_B", "moe_lora_router")
    other_param_names = ("r", "lora_alpha", "scaling", "num_experts", "top_k", "renormalize", "jitter_noise", "moe_lora_dropout")

    def __init__(self, base_layer: nn.Module, routing_context: Optional[RoutingContext] = None, **kwargs) -> None:
        self.base_layer = base_layer
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.num_experts: dict[str, int] = {}
        self.top_k: dict[str, int] = {}
        self.renormalize: dict[str, bool] = {}
        self.jitter_noise: dict[str, float] = {}
        self.moe_lora_dropout = nn.ModuleDict({})
        self.moe_lora_A = nn.ParameterDict({})
        self.moe_lora_B = nn.ParameterDict({})
        self.moe_lora_router = nn.ParameterDict({})
        self.routing_context = routing_context if routing_context is not None else RoutingContext()
        # Plain attributes, not buffers: statistics and losses are never part of a checkpoint.
        self.routing_statistics: dict[str, RoutingStatistics] = {}
        self.router_losses: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._disable_adapters = False
        self.merged_adapters = []
        self.kwargs = kwargs

        base = self.get_base_layer()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"MoE-LoRA supports torch.nn.Linear target modules only, got {type(base).__name__}.")
        self.in_features, self.out_features = base.in_features, base.out_features

    def update_layer(self, adapter_name: str, config: MoELoraConfig, inference_mode: bool = False) -> None:
        """Create (or re-create) the experts and router of `adapter_name` from `config`."""
        r, num_experts = config.r, config.num_experts
        self.r[adapter_name] = r
        self.lora_alpha[adapter_name] = config.lora_alpha
        self.scaling[adapter_name] = config.lora_alpha / r
        self.num_experts[adapter_name] = num_experts
        self.top_k[adapter_name] = config.top_k
        self.renormalize[adapter_name] = config.renormalize
        self.jitter_noise[adapter_name] = config.router_jitter_noise
        self.moe_lora_dropout[adapter_name] = nn.Dropout(config.lora_dropout) if config.lora_dropout > 0 else nn.Identity()
        self.moe_lora_A[adapter_name] = nn.Parameter(torch.empty(num_experts, r, self.in_features))
        self.moe_lora_B[adapter_name] = nn.Parameter(torch.empty(num_experts, self.out_features, r))
        self.moe_lora_router[adapter_name] = nn.Parameter(torch.empty(num_experts, self.in_features))
        self.reset_moe_lora_parameters(adapter_name, config.init_lora_weights, config.router_init_std)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    @torch.no_grad()
    def reset_moe_lora_parameters(self, adapter_name: str, init_lora_weights, router_init_std: float) -> None:
        A, B = self.moe_lora_A[adapter_name], self.moe_lora_B[adapter_name]
        if init_lora_weights == "gaussian":
            nn.init.normal_(A, std=1 / self.r[adapter_name])
        else:
            # Same bound as nn.init.kaiming_uniform_(a=sqrt(5)) on each expert's (r, in) matrix, as peft's LoRA does.
            bound = 1.0 / math.sqrt(self.in_features)
            nn.init.uniform_(A, -bound, bound)
        if init_lora_weights is False:
            nn.init.uniform_(B, -1.0 / math.sqrt(self.r[adapter_name]), 1.0 / math.sqrt(self.r[adapter_name]))
        else:
            nn.init.zeros_(B)
        nn.init.normal_(self.moe_lora_router[adapter_name], std=router_init_std)

    def reset_routing_statistics(self) -> None:
        """Forget the accumulated routing statistics of every adapter."""
        self.routing_statistics.clear()

    def _token_mask(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        """`(N,)` mask of the tokens of `x` (`(batch, seq, in)`) that are not padding, or `None` if unknown."""
        mask = self.routing_context.attention_mask
        if mask is None or x.dim() != 3 or mask.dim() != 2 or mask.shape[0] != x.shape[0] or mask.shape[1] < x.shape[1]:
            return None
        # During cached generation the mask covers past + current tokens: the current ones are the last columns.
        return mask[:, -x.shape[1] :].reshape(-1).to(device=x.device)

    def _record(self, adapter_name: str, routing, token_mask: Optional[torch.Tensor]) -> None:
        recomputing = _in_backward_pass()
        context = self.routing_context
        if context.collect_router_losses and self.training and torch.is_grad_enabled():
            # Computed in the checkpoint recompute too (it must save the same tensors as the first forward), but only
            # the first forward's losses are kept: those are the ones the trainer adds to the loss.
            losses = (
                load_balancing_loss(routing.probs, routing.expert_index, token_mask),
                router_z_loss(routing.logits, token_mask),
            )
            if not recomputing:
                self.router_losses[adapter_name] = losses
                context.has_unread_router_losses = True
        if recomputing or not self.routing_context.track_statistics:
            return
        counts, probability_sum, num_tokens = dispatch_statistics(routing.probs, routing.expert_index, token_mask)
        stats = self.routing_statistics.get(adapter_name)
        if stats is None:
            self.routing_statistics[adapter_name] = RoutingStatistics(counts, probability_sum, num_tokens)
        else:
            stats.activation_counts += counts
            stats.probability_sum += probability_sum
            stats.num_tokens += num_tokens

    def moe_lora_delta(self, x: torch.Tensor, adapter_name: str) -> torch.Tensor:
        """The adapter's contribution for input `x` (`(..., in_features)`), in the dtype of the adapter weights.

        Routes `x` like a forward does: routing statistics and (in training) router losses are recorded.
        """
        delta = self._moe_lora(x.reshape(-1, self.in_features), adapter_name, self._token_mask(x))
        return delta.view(*x.shape[:-1], self.out_features)

    def _can_fuse_router(self, adapter_name: str) -> bool:
        # The fused GEMM feeds the router and the experts the same input: not possible when dropout or jitter noise
        # perturbs one of them, and the router must stay in fp32, so the experts must be fp32 too.
        return (
            not torch.is_autocast_enabled(self.moe_lora_A[adapter_name].device.type)  # would make the router GEMM bf16
            and isinstance(self.moe_lora_dropout[adapter_name], nn.Identity)
            and not (self.training and self.jitter_noise[adapter_name] > 0)
            and self.moe_lora_A[adapter_name].dtype == self.moe_lora_router[adapter_name].dtype == torch.float32
        )

    def _moe_lora(
        self,
        flat: torch.Tensor,
        adapter_name: str,
        token_mask: Optional[torch.Tensor],
        result: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """`delta(flat)`, or `result + delta(flat)` when `result` is given, as an `(N, out_features)` tensor.

        Args:
            flat (`torch.Tensor`): `(N, in_features)` input tokens.
            adapter_name (`str`): the adapter to apply.
            token_mask (`torch.Tensor`, *optional*): `(N,)`, 1 for real tokens, 0 for padding.
            result (`torch.Tensor`, *optional*): the base layer's output for `flat`, `N * out_features` elements.
        """
        A, B = self.moe_lora_A[adapter_name], self.moe_lora_B[adapter_name]
        router_weight = self.moe_lora_router[adapter_name]
        num_experts, r = A.shape[0], A.shape[1]
        top_k, renormalize = self.top_k[adapter_name], self.renormalize[adapter_name]
        if self._can_fuse_router(adapter_name):
            # Router logits and all experts' down-projections from one GEMM: x is read once, and backward gets the
            # input gradient from one GEMM instead of two GEMMs and an (N, in) add.
            fused = F.linear(flat.float(), torch.cat([A.reshape(num_experts * r, -1), router_weight]))
            hidden, logits = fused.split([num_experts * r, num_experts], dim=1)
            routing = route_logits(logits, top_k, renormalize)
        else:
            jitter = self.jitter_noise[adapter_name] if self.training else 0.0
            routing = route(flat, router_weight, top_k, renormalize, jitter)
            hidden = F.linear(self.moe_lora_dropout[adapter_name](flat.to(A.dtype)), A.reshape(num_experts * r, -1))
        self._record(adapter_name, routing, token_mask)
        # All experts' rank-r projections (N, E*r), gated per token, then one matmul back: a rank-E*r LoRA whose
        # unselected experts get gate 0 (so exactly zero output and zero gradient), with no per-expert or per-token
        # Python loop. The LoRA scaling rides on the (N, E) gates, not on the (N, out) output.
        gates = routing.gates.to(A.dtype) * self.scaling[adapter_name]
        hidden = (hidden.reshape(-1, num_experts, r) * gates.unsqueeze(-1)).reshape(-1, num_experts * r)
        B_flat = B.permute(1, 0, 2).reshape(self.out_features, -1)
        if result is None:
            return F.linear(hidden, B_flat)
        result = result.reshape(-1, self.out_features)
        if result.dtype == hidden.dtype:
            # The up-projection accumulates into the base output inside the GEMM: no separate (N, out) add.
            return torch.addmm(result, hidden, B_flat.t())
        return result + F.linear(hidden, B_flat).to(result.dtype)

    def _mixed_batch_forward(self, x: torch.Tensor, result: torch.Tensor, adapter_names: list[str]) -> torch.Tensor:
        """`result` plus, on each row of the batch, the contribution of the adapter `adapter_names` names for it.

        peft's mixed-adapter batch inference: `"__base__"` rows, and rows naming an adapter this layer does not have,
        keep the base output. Each adapter's routing statistics count its own rows only.
        """
        if len(adapter_names) != x.shape[0]:
            raise ValueError(
                "Length of `adapter_names` should be the same as the number of inputs, but got "
                f"{len(adapter_names)} and {x.shape[0]} respectively."
            )
        rows_of: dict[str, list[int]] = {}
        for row, name in enumerate(adapter_names):
            rows_of.setdefault(name, []).append(row)
        token_mask = self._token_mask(x)
        row_mask = token_mask.view(x.shape[0], -1) if token_mask is not None else None
        for adapter_name, rows in rows_of.items():
            if adapter_name == "__base__" or adapter_name not in self.moe_lora_A:
                continue
            index = torch.tensor(rows, device=x.device)
            sub = x.index_select(0, index)
            sub_mask = row_mask.index_select(0, index).reshape(-1) if row_mask is not None else None
            delta = self._moe_lora(sub.reshape(-1, self.in_features), adapter_name, sub_mask)
            # Rows are disjoint across adapters: each output row gets exactly one addition.
            result = result.index_add(0, index, delta.view(*sub.shape[:-1], self.out_features).to(result.dtype))
        return result


class Linear(nn.Module, MoELoraLayer):
    """MoE-LoRA wrapped around an `nn.Linear`."""

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str,
        config: MoELoraConfig,
        routing_context: Optional[RoutingContext] = None,
        **kwargs,
    ) -> None:
        super().__init__()
        MoELoraLayer.__init__(self, base_layer, routing_context=routing_context, **kwargs)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config, inference_mode=config.inference_mode)

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        raise NotImplementedError(
            "MoE-LoRA cannot be merged into the base weights: its expert mixture depends on each token's routing."
        )

    def unmerge(self) -> None:
        warnings.warn("MoE-LoRA layers are never merged; nothing to unmerge.", stacklevel=2)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Base output plus the active adapters' contributions.

        `adapter_names` (keyword, one adapter name per batch row, `"__base__"` for none) applies a different adapter
        to each row instead of the active ones: peft's mixed-adapter batch inference, injected by
        `MoELoraModel._enable_peft_forward_hooks` when the user calls `peft_model(..., adapter_names=[...])`.
        """
        adapter_names = kwargs.pop("adapter_names", None)
        result = self.base_layer(x, *args, **kwargs)
        if self.disable_adapters:
            return result
        if adapter_names is not None:
            return self._mixed_batch_forward(x, result, adapter_names)
        shape, token_mask = result.shape, self._token_mask(x)
        for adapter_name in self.active_adapters:
            if adapter_name in self.moe_lora_A:
                result = self._moe_lora(x.reshape(-1, self.in_features), adapter_name, token_mask, result)
        return result.view(shape)

    def __repr__(self) -> str:
        return "moe_lora." + super().__repr__()
