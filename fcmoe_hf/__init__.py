"""fcmoe_hf: conflict-aware federated fine-tuning of LLMs with a Mixture of LoRA Experts (FC-MoE, arXiv:2606.15625).

```python
import fcmoe_hf  # registers MoE-LoRA with peft
from fcmoe_hf import FederatedMoETrainer, MoELoraConfig, build_aggregator
```

Importing the package registers the MoE-LoRA method with peft and nothing more: the trainer, the server side, the
tasks and the simulation are imported when one of their names is first used (as TRL's top level does).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from . import _peft_compat  # noqa: F401  (registers MoE-LoRA with peft on import)
from .tuners.moe_lora import MoELoraConfig, MoELoraModel

__version__ = "0.1.0"

#: Public name -> the submodule that defines it, imported on first access.
_LAZY_IMPORTS = {
    "FederatedClientArguments": "trainer",
    "FederatedMoEMixin": "trainer",
    "FederatedMoETrainer": "trainer",
    "FederatedMoETrainingArguments": "trainer",
    "AggregationResult": "federated",
    "ClientConfig": "federated",
    "ClientUpdate": "federated",
    "FCMoEAggregator": "federated",
    "FCMoEConfig": "federated",
    "available_aggregators": "federated",
    "build_aggregator": "federated",
    "register_aggregator": "federated",
    "retained_start": "federated",
    "FederatedSimulation": "simulation",
    "FederationArguments": "simulation",
    "Task": "tasks",
    "available_tasks": "tasks",
    "build_task": "tasks",
}

__all__ = [
    "AggregationResult",
    "ClientConfig",
    "ClientUpdate",
    "FCMoEAggregator",
    "FCMoEConfig",
    "FederatedClientArguments",
    "FederatedMoEMixin",
    "FederatedMoETrainer",
    "FederatedMoETrainingArguments",
    "FederatedSimulation",
    "FederationArguments",
    "MoELoraConfig",
    "MoELoraModel",
    "Task",
    "__version__",
    "available_aggregators",
    "available_tasks",
    "build_aggregator",
    "build_task",
    "register_aggregator",
    "retained_start",
]


def __getattr__(name: str) -> Any:
    module = _LAZY_IMPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY_IMPORTS))


if TYPE_CHECKING:
    from .federated import (
        AggregationResult,
        ClientConfig,
        ClientUpdate,
        FCMoEAggregator,
        FCMoEConfig,
        available_aggregators,
        build_aggregator,
        register_aggregator,
        retained_start,
    )
    from .simulation import FederatedSimulation, FederationArguments
    from .tasks import Task, available_tasks, build_task
    from .trainer import (
        FederatedClientArguments,
        FederatedMoEMixin,
        FederatedMoETrainer,
        FederatedMoETrainingArguments,
    )
