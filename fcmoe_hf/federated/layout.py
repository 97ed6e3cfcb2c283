"""Which tensors of a federated state are experts, of which module: the key conventions, written once.

Keys are the adapter's checkpoint keys (as `get_peft_model_state_dict` / `adapter_model.safetensors` name them, e.g.
`base_model.model.model.layers.3.self_attn.q_proj.moe_lora_A`) or, when a client trains an MoE base model's own
experts, the base model's parameter names (e.g. `model.layers.3.mlp.experts.gate_up_proj`).

An *expert group* is the set of tensors whose dimension 0 indexes the same experts: `moe_lora_A` and `moe_lora_B` of
one adapted module, or the fused expert parameters of one MoE block. Expert `k` of a group is the concatenation of
`tensor[k]` over the group's tensors (the paper's `Delta[i,k]` is "the flattened vector of all of expert k's
parameters"). Every other tensor (routers, norms, classification heads) is a *shared* tensor, averaged FedAvg-style.

A state's layout is parsed once ([`expert_layout`] caches it by key set): a merge, its validation and the clients'
retention all ask for the same few layouts every round.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import NamedTuple, Optional

#: Prefix peft puts before a module's name in adapter checkpoint keys (`PeftModel` -> `base_model` (the tuner) ->
#: `model` (the wrapped transformers model)).
PEFT_KEY_PREFIX = "base_model.model."

_MOE_LORA_EXPERT = re.compile(r"^(?P<group>.+)\.(?P<param>moe_lora_A|moe_lora_B)$")
_BASE_EXPERT = re.compile(r"^(?P<group>.+\.experts)\.(?P<param>[^.]+)$")
_LAYER_INDEX = re.compile(r"\.(?:layers|h|blocks|block)\.(\d+)\.")


def expert_group_key(module_name: str) -> str:
    """The expert group (key prefix) of the MoE-LoRA layer at `module_name` (a name inside the tuner's model)."""
    return PEFT_KEY_PREFIX + module_name


def adapter_state_key(parameter_name: str, adapter_name: str) -> str:
    """A `PeftModel` parameter name as its adapter checkpoint key: the adapter name removed, as peft saves it."""
    name = parameter_name.replace(f".modules_to_save.{adapter_name}.", ".")
    return re.sub(rf"\.{re.escape(adapter_name)}(?=\.|$)", "", name)


class ExpertKey(NamedTuple):
    """A parsed expert tensor key: its group, the layer index (or -1), the adapted module, the parameter name."""

    group: str
    layer: int
    module: str
    param: str


def parse_expert_key(key: str) -> Optional[ExpertKey]:
    """Parse `key` into an [`ExpertKey`] if it names an expert tensor, else return `None` (a shared tensor).

    Example: `base_model.model.model.layers.3.self_attn.q_proj.moe_lora_A` ->
    `ExpertKey(group='base_model.model.model.layers.3.self_attn.q_proj', layer=3, module='self_attn.q_proj',
    param='moe_lora_A')`.
    """
    match = _MOE_LORA_EXPERT.match(key) or _BASE_EXPERT.match(key)
    if match is None:
        return None
    group = match["group"]
    layer_match = list(_LAYER_INDEX.finditer(group + "."))
    if layer_match:
        last = layer_match[-1]
        layer, module = int(last.group(1)), (group + ".")[last.end() :].rstrip(".")
    else:
        layer, module = -1, group
    return ExpertKey(group=group, layer=layer, module=module, param=match["param"])


def expert_group_of(key: str) -> Optional[str]:
    """The expert group `key` belongs to, or `None` for a shared (non-expert) tensor."""
    parsed = parse_expert_key(key)
    return parsed.group if parsed is not None else None


@dataclass(frozen=True)
class ExpertLayout:
    """The split of a state's keys into expert groups and shared tensors, order preserved.

    Args:
        groups (`dict[str, tuple[str, ...]]`): `{group: expert tensor keys}`.
        shared (`tuple[str, ...]`): the keys of the non-expert tensors.
    """

    groups: dict[str, tuple[str, ...]]
    shared: tuple[str, ...]


@functools.lru_cache(maxsize=64)
def _layout(keys: tuple[str, ...]) -> ExpertLayout:
    groups: dict[str, list[str]] = {}
    shared: list[str] = []
    for key in keys:
        parsed = parse_expert_key(key)
        if parsed is None:
            shared.append(key)
        else:
            groups.setdefault(parsed.group, []).append(key)
    return ExpertLayout(groups={g: tuple(k) for g, k in groups.items()}, shared=tuple(shared))


def expert_layout(keys: Iterable[str]) -> ExpertLayout:
    """The [`ExpertLayout`] of a state with keys `keys` (parsed once per distinct key sequence, then cached)."""
    return _layout(tuple(keys))


def group_keys(keys: Iterable[str]) -> tuple[dict[str, list[str]], list[str]]:
    """Split tensor keys into `({group: [expert tensor keys]}, [shared tensor keys])`, order preserved."""
    layout = expert_layout(keys)
    return {g: list(k) for g, k in layout.groups.items()}, list(layout.shared)
