"""The server side of a federation: client updates, their validation, the aggregators, and retention.

```python
from fcmoe_hf.federated import ClientUpdate, build_aggregator

aggregator = build_aggregator("fcmoe")          # or "fedavg", "fedprox", "fedadam", "ties", "fedmoe", "fedmedian", ...
client_config = aggregator.configure_client(1)  # what the clients' local training needs this round
result = aggregator.aggregate(global_state, [ClientUpdate.load(d) for d in update_dirs])
```

Layout: [`update`] (what crosses the network), [`layout`] (which tensors are experts), [`validation`] (every check of
an update), [`functional`] (the math over tensors: importance, consensus projection, retention), [`io`] (reading
updates from disk), [`aggregators`] (one module per strategy).
"""

from .aggregators import (
    AggregationResult,
    Aggregator,
    AggregatorConfig,
    FCMoEAggregator,
    FCMoEConfig,
    FedAdagradAggregator,
    FedAdagradConfig,
    FedAdamAggregator,
    FedAdamConfig,
    FedAlignMoEAggregator,
    FedAlignMoEConfig,
    FedAvgAggregator,
    FedAvgConfig,
    FedAvgMAggregator,
    FedAvgMConfig,
    FedMedianAggregator,
    FedMedianConfig,
    FedMoEAggregator,
    FedMoEConfig,
    FedOptAggregator,
    FedOptConfig,
    FedProxAggregator,
    FedProxConfig,
    FedTrimmedAvgAggregator,
    FedTrimmedAvgConfig,
    FedYogiAggregator,
    FedYogiConfig,
    PFLMoEAggregator,
    PFLMoEConfig,
    TiesAggregator,
    TiesConfig,
    aggregator_config_class,
    available_aggregators,
    build_aggregator,
    register_aggregator,
)
from .bounds import CappedUpdate, ClientExpectation, UpdateBounds
from .client_config import ClientConfig
from .functional.retention import retained_start
from .update import ClientUpdate
from .validation import RejectedUpdate, load_update

__all__ = [
    "AggregationResult",
    "Aggregator",
    "AggregatorConfig",
    "ClientConfig",
    "CappedUpdate",
    "ClientExpectation",
    "ClientUpdate",
    "FCMoEAggregator",
    "FCMoEConfig",
    "FedAdagradAggregator",
    "FedAdagradConfig",
    "FedAdamAggregator",
    "FedAdamConfig",
    "FedAlignMoEAggregator",
    "FedAlignMoEConfig",
    "FedAvgAggregator",
    "FedAvgConfig",
    "FedAvgMAggregator",
    "FedAvgMConfig",
    "FedMedianAggregator",
    "FedMedianConfig",
    "FedMoEAggregator",
    "FedMoEConfig",
    "FedOptAggregator",
    "FedOptConfig",
    "FedProxAggregator",
    "FedProxConfig",
    "FedTrimmedAvgAggregator",
    "FedTrimmedAvgConfig",
    "FedYogiAggregator",
    "FedYogiConfig",
    "PFLMoEAggregator",
    "PFLMoEConfig",
    "RejectedUpdate",
    "TiesAggregator",
    "TiesConfig",
    "UpdateBounds",
    "aggregator_config_class",
    "available_aggregators",
    "build_aggregator",
    "load_update",
    "register_aggregator",
    "retained_start",
]
