"""Server strategies, one module each, behind one interface ([`Aggregator`]).

Adding one: a module with a config dataclass (a subclass of [`AggregatorConfig`]) beside an [`Aggregator`]
subclass decorated with `@register_aggregator("name")`, which implements `_aggregate` with the shared kernels of
[`kernels`] (and `configure_client` if clients must train differently); import it below so that `build_aggregator`
finds it by name.
"""

from .base import Aggregator, AggregatorConfig
from .fcmoe import FCMoEAggregator, FCMoEConfig
from .fedadagrad import FedAdagradAggregator, FedAdagradConfig
from .fedadam import FedAdamAggregator, FedAdamConfig
from .fedalign_moe import FedAlignMoEAggregator, FedAlignMoEConfig
from .fedavg import FedAvgAggregator, FedAvgConfig
from .fedavgm import FedAvgMAggregator, FedAvgMConfig
from .fedmedian import FedMedianAggregator, FedMedianConfig
from .fedmoe import FedMoEAggregator, FedMoEConfig
from .fedopt import FedOptAggregator, FedOptConfig
from .fedprox import FedProxAggregator, FedProxConfig
from .fedtrimmedavg import FedTrimmedAvgAggregator, FedTrimmedAvgConfig
from .fedyogi import FedYogiAggregator, FedYogiConfig
from .pfl_moe import PFLMoEAggregator, PFLMoEConfig
from .registry import (
    AGGREGATORS,
    aggregator_config_class,
    available_aggregators,
    build_aggregator,
    register_aggregator,
)
from .result import AggregationResult, ResidualCoefficients
from .ties import TiesAggregator, TiesConfig

__all__ = [
    "AGGREGATORS",
    "AggregationResult",
    "Aggregator",
    "AggregatorConfig",
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
    "ResidualCoefficients",
    "TiesAggregator",
    "TiesConfig",
    "aggregator_config_class",
    "available_aggregators",
    "build_aggregator",
    "register_aggregator",
]
