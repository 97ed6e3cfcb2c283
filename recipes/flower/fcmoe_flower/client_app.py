"""The ClientApp: `FederatedMoETrainer` on this SuperNode's partition (`--node-config "partition-id=<i>"`)."""

import torch  # noqa: F401  (Flower converts ArrayRecords to torch only when torch is imported in the app's module)

from fcmoe_hf.flower import make_client_app

app = make_client_app()
