"""fcmoe_hf on Flower: the same clients and server beyond one machine (install with `pip install fcmoe_hf[flower]`).

- [`FCMoEStrategy`]: any fcmoe_hf aggregator as a Flower Message-API strategy (a `flwr.serverapp.strategy.FedAvg`);
- [`make_client_app`]: a `ClientApp` that trains with `FederatedMoETrainer` on its node's partition and replies with its
  update; its retained residual and personalized adapter stay on the node;
- [`make_server_app`] / [`FlowerServer`]: a `ServerApp` that evaluates, checkpoints, resumes and writes the same outputs
  as the in-process [`~fcmoe_hf.simulation.FederatedSimulation`];
- [`run_flower_simulation`]: a whole run as a Flower simulation (clients as parallel Ray actors);
- [`FlowerRunConfig`]: the run config both sides read (`flwr run --run-config "..."`).

The Flower app users run with `flwr run` is `recipes/flower/`.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "FCMoEStrategy": "strategy",
    "RoundFailedError": "strategy",
    "FlowerRunConfig": "config",
    "FederationComponents": "components",
    "build_components": "components",
    "FlowerClient": "client",
    "make_client_app": "client",
    "push_client_adapter": "client",
    "FlowerServer": "server",
    "build_strategy": "server",
    "make_server_app": "server",
    "run_flower_simulation": "server",
}


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        try:
            module = importlib.import_module(f".{_EXPORTS[name]}", __name__)
        except ImportError as err:
            if "flwr" in str(err):
                raise ImportError("fcmoe_hf.flower needs Flower: pip install 'fcmoe_hf[flower]'.") from err
            raise
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = sorted(_EXPORTS)
