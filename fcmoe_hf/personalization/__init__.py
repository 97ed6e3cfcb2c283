"""Client-side personalization next to the federated adapter, switched on by the aggregator's
[`~fcmoe_hf.federated.ClientConfig`] (`personalization`).

`"pfl_moe"`: PFL-MoE (arXiv:2012.15589). Each client keeps a personal MoE-LoRA adapter and a gate that mixes it with
the global adapter; both stay on the client.

```python
from fcmoe_hf.personalization import PFLMoEModel, train_pfl_moe_client

personal, losses = train_pfl_moe_client(peft_model, client_features, training_args, collator, personal)
with PFLMoEModel(peft_model, personal) as mixture:  # g * f_global + (1 - g) * f_personal, on the logits
    task.evaluate(mixture, local_test)
```
"""

from .pfl_moe import (
    GATE_FRACTION,
    PERSONAL_ADAPTER,
    PersonalState,
    PFLMoEGate,
    PFLMoEModel,
    PFLMoEOutput,
    PFLMoETrainer,
    logits_loss,
    split_local_data,
    train_pfl_moe_client,
)
from .store import PersonalStateStore

__all__ = [
    "GATE_FRACTION",
    "PERSONAL_ADAPTER",
    "PFLMoEGate",
    "PFLMoEModel",
    "PFLMoEOutput",
    "PFLMoETrainer",
    "PersonalState",
    "PersonalStateStore",
    "logits_loss",
    "split_local_data",
    "train_pfl_moe_client",
]
