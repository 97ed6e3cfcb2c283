"""Aggregators by name: `register_aggregator` (a class decorator) and `build_aggregator`."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Union

if TYPE_CHECKING:
    from .base import Aggregator, AggregatorConfig


AGGREGATORS: dict[str, type[Aggregator]] = {}


def register_aggregator(name: str):
    """Class decorator: make an [`Aggregator`] subclass buildable by `name` with [`build_aggregator`]."""

    def decorator(cls: type[Aggregator]) -> type[Aggregator]:
        if name in AGGREGATORS:
            raise ValueError(f"An aggregator named {name!r} is already registered ({AGGREGATORS[name].__name__}).")
        cls.name = name
        AGGREGATORS[name] = cls
        return cls

    return decorator


def available_aggregators() -> list[str]:
    """The registered aggregator names."""
    return sorted(AGGREGATORS)


def aggregator_config_class(name: str) -> type[AggregatorConfig]:
    """The config dataclass of aggregator `name` (e.g. to parse it with `HfArgumentParser`)."""
    return _lookup(name).config_class


def build_aggregator(name: str, config: Union[AggregatorConfig, Mapping[str, Any], None] = None, **kwargs: Any) -> Aggregator:
    """Build a registered aggregator by name, e.g. `build_aggregator("fcmoe", use_projection=False)`.

    Args:
        name (`str`): one of [`available_aggregators`].
        config ([`AggregatorConfig`] or `dict`, *optional*): its configuration.
        **kwargs: overrides of single config fields.
    """
    return _lookup(name)(config, **kwargs)


def _lookup(name: str) -> type[Aggregator]:
    try:
        return AGGREGATORS[name]
    except KeyError:
        raise ValueError(f"Unknown aggregator {name!r}; available: {available_aggregators()}.") from None
