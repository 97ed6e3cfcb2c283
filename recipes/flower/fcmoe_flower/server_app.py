"""The ServerApp: the fcmoe_hf aggregator (or Flower's strategy) named by the run config's `aggregator`."""

import torch  # noqa: F401

from fcmoe_hf.flower import make_server_app

app = make_server_app()
