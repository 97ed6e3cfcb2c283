"""fcmoe_hf's Flower app: the `ServerApp` and `ClientApp` of `fcmoe_hf.flower`, configured by the run config."""
