"""FedTrimmedAvg: the coordinate-wise trimmed mean of the clients' updates, per expert over the clients that used it."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..functional.robust import trimmed_mean
from .fedmedian import CoordinateWiseAggregator, FedMedianConfig
from .registry import register_aggregator


@dataclass
class FedTrimmedAvgConfig(FedMedianConfig):
    """Coordinate-wise trimmed mean (Yin et al. 2018, arXiv:1803.01498).

    Args:
        beta (`float`): the fraction of the participating clients cut at each end of every coordinate, in `[0, 0.5)`
            (Flower's default, 0.2). `floor(beta * n)` values are cut at each end, so with fewer than `1 / beta`
            clients nothing is cut.
    """

    beta: float = field(default=0.2, metadata={"help": "Fraction of clients cut at each end of every coordinate, in [0, 0.5)."})

    def __post_init__(self):
        super().__post_init__()
        if not 0.0 <= self.beta < 0.5:
            raise ValueError(f"beta must be in [0, 0.5), got {self.beta}.")


@register_aggregator("fedtrimmedavg")
class FedTrimmedAvgAggregator(CoordinateWiseAggregator):
    """FedTrimmedAvg (Yin et al. 2018, arXiv:1803.01498; Flower's `FedTrimmedAvg`, SciPy's `trim_mean`): for every
    coordinate, of the `n` participating clients' updates the `floor(beta * n)` smallest and largest are dropped and
    the rest averaged, unweighted. Flower averages the parameters `Theta + Delta_i`; with one start `Theta` it is the
    same number (up to float32 rounding).

    Per expert, only the clients that activated the expert take part (`config.per_expert`). Shared tensors: every
    client.
    """

    config_class = FedTrimmedAvgConfig

    def _statistic(self, values, weights):
        return trimmed_mean(values, weights > 0, self.config.beta)
