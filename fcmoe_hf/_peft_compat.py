"""The one place that registers MoE-LoRA with peft.

`peft.utils.register_peft_method` only accepts names from peft's closed `PeftType` enum, so the method is registered by
writing its stable key, `MOE_LORA_PEFT_TYPE` (a `str` subclass with the `value` / `name` of an enum member, see
`fcmoe_hf.tuners.moe_lora.config`), into peft's mappings directly. `PeftType` is a `str` enum and the key hashes and
compares as the plain string "MOE_LORA", so peft's own lookups (by `config.peft_type`, or by the string read from
`adapter_config.json`) hit these entries, and a saved adapter round-trips through `PeftModel.from_pretrained` with no
fcmoe_hf-specific loading code, once `fcmoe_hf` is imported.
"""

from __future__ import annotations

from peft.mapping import (
    PEFT_TYPE_TO_CONFIG_MAPPING,
    PEFT_TYPE_TO_PREFIX_MAPPING,
    PEFT_TYPE_TO_TUNER_MAPPING,
)

from .tuners.moe_lora import MOE_LORA_PEFT_TYPE, MoELoraConfig, MoELoraModel


def register_moe_lora() -> None:
    """Register MoE-LoRA under `MOE_LORA_PEFT_TYPE`. Idempotent; refuses to overwrite another method's entry."""
    for mapping, value in (
        (PEFT_TYPE_TO_CONFIG_MAPPING, MoELoraConfig),
        (PEFT_TYPE_TO_TUNER_MAPPING, MoELoraModel),
        (PEFT_TYPE_TO_PREFIX_MAPPING, MoELoraModel.prefix),
    ):
        existing = mapping.get(MOE_LORA_PEFT_TYPE)
        if existing is not None and existing is not value and existing != value:
            raise RuntimeError(f"peft already has a method registered as {MOE_LORA_PEFT_TYPE!r}: {existing!r}.")
        mapping[MOE_LORA_PEFT_TYPE] = value


register_moe_lora()
