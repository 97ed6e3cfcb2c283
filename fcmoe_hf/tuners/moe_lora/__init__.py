from .config import (
    MOE_LORA_PEFT_TYPE,
    TRANSFORMERS_MODELS_TO_MOE_LORA_TARGET_MODULES_MAPPING,
    MoELoraConfig,
    PeftTypeName,
)
from .layer import Linear, MoELoraLayer, RoutingContext, RoutingStatistics
from .model import MoELoraModel
from .router import RouterOutput, dispatch_statistics, load_balancing_loss, route, route_logits, router_z_loss

__all__ = [
    "MOE_LORA_PEFT_TYPE",
    "TRANSFORMERS_MODELS_TO_MOE_LORA_TARGET_MODULES_MAPPING",
    "Linear",
    "MoELoraConfig",
    "MoELoraLayer",
    "MoELoraModel",
    "PeftTypeName",
    "RouterOutput",
    "RoutingContext",
    "RoutingStatistics",
    "dispatch_statistics",
    "load_balancing_loss",
    "route",
    "route_logits",
    "router_z_loss",
]
