"""Reading updates from disk for a streaming merge (no math): lazy safetensors files ([`LazySafetensors`]) and the
recycled buffers a merge reads them into (`fcmoe_hf.federated.io.stream`)."""

from .safetensors import LazySafetensors, describe_tensor

__all__ = ["LazySafetensors", "describe_tensor"]
