"""The in-process federation: [`FederatedSimulation`] (the loop), its checkpoints and its outputs."""

from .arguments import FederationArguments
from .checkpoints import LATEST_FILE, CheckpointStore
from .loop import FederatedSimulation

__all__ = ["LATEST_FILE", "CheckpointStore", "FederatedSimulation", "FederationArguments"]
