"""Loading published adapters: the global one (by repo id or `round-<N>` tag) and a client's personalized one."""

from __future__ import annotations

from typing import Any, Optional, Union

from huggingface_hub import file_exists
from peft import PeftModel
from transformers import PreTrainedModel

from .push import clients_repo_for


def _base(base_model: Union[str, PreTrainedModel]) -> PreTrainedModel:
    if isinstance(base_model, str):
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(base_model)
    return base_model


def load_global_adapter(
    base_model: Union[str, PreTrainedModel], repo_id: str, revision: Optional[str] = None, **kwargs: Any
) -> PeftModel:
    """The global MoE-LoRA adapter published at the root of `repo_id`.

    Args:
        base_model (`str` or `PreTrainedModel`): the base model (an id or path is loaded as a causal LM).
        repo_id (`str`): the global adapter's repository (or a local directory).
        revision (`str`, *optional*): a branch, commit or round tag (`"round-3"` loads round 3's global adapter).
        kwargs: passed to `PeftModel.from_pretrained` (`token`, `is_trainable`, ...).

    Returns:
        `PeftModel`: the base model with the adapter.
    """
    import fcmoe_hf  # noqa: F401  (registers MoE-LoRA with peft)

    return PeftModel.from_pretrained(_base(base_model), repo_id, revision=revision, **kwargs)


def load_client_adapter(
    base_model: Union[str, PreTrainedModel], repo_id: str, client_id: str, revision: Optional[str] = None, **kwargs: Any
) -> PeftModel:
    """Client `client_id`'s personalized adapter (global + its retained residual), from its subfolder of the clients'
    repository.

    Args:
        base_model (`str` or `PreTrainedModel`): the base model (an id or path is loaded as a causal LM).
        repo_id (`str`): the clients' repository, or the global one (then its `<repo_id>-clients` is used). The
            clients' repository is private by default: pass `token=` (or be logged in) with read access.
        client_id (`str`): the client's subfolder, e.g. `"client_3"`.
        revision (`str`, *optional*): a branch, commit or round tag (`"round-3"`).
        kwargs: passed to `PeftModel.from_pretrained`.

    Returns:
        `PeftModel`: the base model with the client's adapter.
    """
    import fcmoe_hf  # noqa: F401

    token = kwargs.get("token")
    if not file_exists(repo_id, f"{client_id}/adapter_config.json", revision=revision, token=token):
        candidate = clients_repo_for(repo_id)
        if file_exists(candidate, f"{client_id}/adapter_config.json", revision=revision, token=token):
            repo_id = candidate
    return PeftModel.from_pretrained(_base(base_model), repo_id, subfolder=client_id, revision=revision, **kwargs)
