"""Configuration of the MoE-LoRA adapter (a Mixture of LoRA Experts with a token-level top-k router).

MoE-LoRA's `peft_type` is a [`PeftTypeName`]: peft's `PeftType` is a closed `str` enum, and peft's own code reads
`config.peft_type.value` (error messages of `PeftModel`, `PeftMixedModel` and the hotswap checks), which a bare string
lacks. Adding a member to `PeftType` at runtime would need Python's private enum internals
(`_member_map_`, `_value2member_map_`, ...), which change between Python versions, and would alter a third-party
enum for every user of the process. A `str` subclass with the two attributes an enum member has (`value`, `name`)
needs neither: it compares and hashes as the plain string, so peft's mappings (keyed by `PeftType` members, themselves
`str`) and JSON files see "MOE_LORA" exactly as before.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional, Union

from peft.config import PeftConfig


class PeftTypeName(str):
    """A peft type name outside peft's `PeftType` enum that reads like one of its members.

    Equal to, hashed as and serialised as the plain string; `value` and `name` return that plain string, as
    `PeftType.LORA.value` / `.name` return `"LORA"`.
    """

    __slots__ = ()

    @property
    def value(self) -> str:
        return str.__str__(self)

    @property
    def name(self) -> str:
        return str.__str__(self)


#: The peft type name this method is registered under (see `fcmoe_hf._peft_compat`). Stable: it is written into
#: every saved `adapter_config.json`.
MOE_LORA_PEFT_TYPE = PeftTypeName("MOE_LORA")

_DENSE = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# On MoE bases the FFN experts are fused 3-D parameters (transformers >= 5) and `mlp.gate` is the base's own router:
# MoE-LoRA adapts the attention projections only and leaves the base's routing untouched.
_ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
_BERT = ["query", "key", "value", "dense"]

#: Default `target_modules` per `model_type`, used when the config leaves `target_modules=None`.
TRANSFORMERS_MODELS_TO_MOE_LORA_TARGET_MODULES_MAPPING: dict[str, list[str]] = {
    "llama": _DENSE,
    "mistral": _DENSE,
    "qwen2": _DENSE,
    "qwen3": _DENSE,
    "gemma": _DENSE,
    "gemma2": _DENSE,
    "olmo": _DENSE,
    "olmo2": _DENSE,
    "phi3": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
    "mixtral": _ATTENTION,
    "qwen2_moe": _ATTENTION,
    "qwen3_moe": _ATTENTION,
    "olmoe": _ATTENTION,
    # Encoders: attention projections and every `dense` (attention output, FFN in/out, pooler). A SEQ_CLS head is in
    # `modules_to_save`, which peft keeps out of the targets even when it holds a `dense` (RoBERTa, ELECTRA).
    "bert": _BERT,
    "roberta": _BERT,
    "xlm-roberta": _BERT,
    "xlm-roberta-xl": _BERT,
    "roberta-prelayernorm": _BERT,
    "camembert": _BERT,
    "data2vec-text": _BERT,
    "electra": _BERT,
    "ernie": _BERT,
    "megatron-bert": _BERT,
    "albert": ["query", "key", "value", "dense", "ffn", "ffn_output"],
    "deberta-v2": ["query_proj", "key_proj", "value_proj", "dense"],
    "distilbert": ["q_lin", "k_lin", "v_lin", "out_lin", "lin1", "lin2"],
    "mpnet": ["q", "k", "v", "o", "dense"],
    "modernbert": ["Wqkv", "Wo", "Wi"],
}


@dataclass
class MoELoraConfig(PeftConfig):
    """Configuration of a [`MoELoraModel`]: each targeted `nn.Linear` gets `num_experts` LoRA experts and a router.

    For a token `x`, the router computes fp32 logits `W_r x`, a softmax over experts, keeps the `top_k` most probable
    experts and (by default when `top_k > 1`) renormalises their probabilities to sum to one. The layer output is
    `base(x) + scaling * sum_{e in top-k} gate_e * B_e A_e dropout(x)` with `scaling = lora_alpha / r`.

    Args:
        r (`int`): LoRA rank of every expert.
        lora_alpha (`int`): LoRA scaling numerator; the adapter output is scaled by `lora_alpha / r`.
        lora_dropout (`float`): dropout applied to the adapter input.
        num_experts (`int`): number of LoRA experts per targeted module (E).
        top_k (`int`): experts used per token, from 1 (Switch-style) to `num_experts`.
        normalize_top_k (`bool`, *optional*): renormalise the kept probabilities to sum to one. `None` (default)
            renormalises when `top_k > 1` and keeps the raw probability when `top_k == 1`, as the Switch Transformer
            does: a renormalised top-1 gate is constant 1 and the router would get no gradient from the task loss.
        target_modules (`list[str]` or `str`, *optional*): module names (or a regex) to adapt. `None` uses the default
            for the model's architecture (`TRANSFORMERS_MODELS_TO_MOE_LORA_TARGET_MODULES_MAPPING`).
        exclude_modules (`list[str]` or `str`, *optional*): module names (or a regex) not to adapt.
        router_aux_loss_coef (`float`): weight of the Switch/Mixtral load-balancing loss added by the trainer.
        router_z_loss_coef (`float`): weight of the router z-loss (ST-MoE) added by the trainer.
        router_jitter_noise (`float`): multiplicative uniform noise `U(1-eps, 1+eps)` on the router input during
            training (Switch Transformer); 0 disables it.
        init_lora_weights (`bool` or `"gaussian"`): `True` initialises A like peft's LoRA (Kaiming-uniform) and B to
            zero, so the adapted model starts equal to the base model; `"gaussian"` draws A from N(0, 1/r);
            `False` also draws B at random (a non-identity start, for tests).
        router_init_std (`float`): standard deviation of the router weight initialisation.
        modules_to_save (`list[str]`, *optional*): other modules to train and save in full (e.g. a new head).
        layers_to_transform (`list[int]` or `int`, *optional*): only adapt these layer indices.
        layers_pattern (`list[str]` or `str`, *optional*): name of the layer list, used with `layers_to_transform`.
    """

    r: int = field(default=8, metadata={"help": "LoRA rank of every expert."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA alpha; the adapter output is scaled by lora_alpha / r."})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout probability on the adapter input."})
    num_experts: int = field(default=8, metadata={"help": "Number of LoRA experts per targeted module."})
    top_k: int = field(default=2, metadata={"help": "Number of experts each token is routed to (1 = Switch-style)."})
    normalize_top_k: Optional[bool] = field(
        default=None,
        metadata={
            "help": "Renormalise the top-k gate values to sum to one. None: renormalise when top_k > 1, keep the raw "
            "probability for top_k == 1 (Switch Transformer), so the router still gets a task gradient."
        },
    )
    target_modules: Optional[Union[list[str], str]] = field(
        default=None,
        metadata={
            "help": "Module names or a regex of the modules to adapt. None uses the architecture default "
            "(attention + MLP projections on dense models, attention projections on MoE models)."
        },
    )
    exclude_modules: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Module names or a regex of modules not to adapt."}
    )
    router_aux_loss_coef: float = field(
        default=0.01, metadata={"help": "Weight of the router load-balancing loss (Switch / Mixtral form)."}
    )
    router_z_loss_coef: float = field(default=0.001, metadata={"help": "Weight of the router z-loss (ST-MoE)."})
    router_jitter_noise: float = field(
        default=0.0, metadata={"help": "Multiplicative jitter U(1-eps, 1+eps) on the router input in training."}
    )
    init_lora_weights: Union[bool, Literal["gaussian"]] = field(
        default=True,
        metadata={
            "help": "True: A Kaiming-uniform, B zero (identity start). 'gaussian': A ~ N(0, 1/r), B zero. "
            "False: B random too (non-identity start, for tests)."
        },
    )
    router_init_std: float = field(default=0.02, metadata={"help": "Std of the router weight initialisation."})
    modules_to_save: Optional[list[str]] = field(
        default=None, metadata={"help": "Modules besides the adapter layers to train and save in full."}
    )
    layers_to_transform: Optional[Union[list[int], int]] = field(
        default=None, metadata={"help": "Adapt only these layer indices."}
    )
    layers_pattern: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Name of the layer list, used together with layers_to_transform."}
    )

    def __setattr__(self, name, value):
        # Keep `peft_type` a PeftTypeName when a plain "MOE_LORA" is assigned (a config edited by hand or by a tool
        # that sets attributes from a loaded JSON dict), so `.value` keeps working.
        if name == "peft_type" and value == MOE_LORA_PEFT_TYPE:
            value = MOE_LORA_PEFT_TYPE
        super().__setattr__(name, value)

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = MOE_LORA_PEFT_TYPE
        if isinstance(self.target_modules, list):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, list):
            self.exclude_modules = set(self.exclude_modules)
        if self.r <= 0:
            raise ValueError(f"MoELoraConfig.r must be a positive integer, got r={self.r}.")
        if self.num_experts < 1:
            raise ValueError(f"MoELoraConfig.num_experts must be >= 1, got num_experts={self.num_experts}.")
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(
                f"MoELoraConfig.top_k must be between 1 and num_experts={self.num_experts}, got top_k={self.top_k}."
            )
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"MoELoraConfig.lora_dropout must be in [0, 1), got lora_dropout={self.lora_dropout}.")
        if self.router_jitter_noise < 0:
            raise ValueError(
                f"MoELoraConfig.router_jitter_noise must be >= 0, got router_jitter_noise={self.router_jitter_noise}."
            )
        for name in ("router_aux_loss_coef", "router_z_loss_coef", "router_init_std"):
            if getattr(self, name) < 0:
                raise ValueError(f"MoELoraConfig.{name} must be >= 0, got {name}={getattr(self, name)}.")
        if self.init_lora_weights not in (True, False, "gaussian"):
            raise ValueError(
                f"MoELoraConfig.init_lora_weights must be True, False or 'gaussian', got {self.init_lora_weights!r}."
            )
        if isinstance(self.target_modules, str) and self.layers_to_transform is not None:
            raise ValueError("MoELoraConfig.layers_to_transform cannot be used when target_modules is a regex str.")

    def to_dict(self) -> dict:
        """The config as a dictionary, with `peft_type` as a plain `str` (what any serialiser can write)."""
        output = super().to_dict()
        output["peft_type"] = str.__str__(output["peft_type"])
        return output

    @property
    def renormalize(self) -> bool:
        """Whether the kept top-k gate values are renormalised (resolves `normalize_top_k=None`)."""
        return self.top_k > 1 if self.normalize_top_k is None else self.normalize_top_k
