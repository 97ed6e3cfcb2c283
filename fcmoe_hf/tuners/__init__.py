from .moe_lora import MoELoraConfig, MoELoraModel

__all__ = ["MoELoraConfig", "MoELoraModel"]
