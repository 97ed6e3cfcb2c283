"""fcmoe_hf: conflict-aware federated fine-tuning of LLMs with a Mixture of LoRA Experts (FC-MoE)."""

from . import _peft_compat  # noqa: F401  (registers MoE-LoRA with peft on import)
from .tuners.moe_lora import MoELoraConfig, MoELoraModel

__version__ = "0.1.0"

__all__ = ["MoELoraConfig", "MoELoraModel", "__version__"]
