"""The on-disk cache of dequantised GGUF models: `load_base_model` dequantises a packaged GGUF file once and loads
the cached directory afterwards; entries are complete only once their marker is written, and stale ones are pruned."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

#: Environment variable overriding the directory the dequantised GGUF models are cached in.
CACHE_ENV_VAR = "FCMOE_HF_CACHE"

# Written last into a cache entry; an entry without it is incomplete and never used.
_CACHE_MARKER = "fcmoe_hf_cache.json"


def default_cache_dir() -> Path:
    """Where dequantised GGUF models are cached: `$FCMOE_HF_CACHE`, else `$XDG_CACHE_HOME/fcmoe_hf`, else
    `~/.cache/fcmoe_hf`."""
    if os.environ.get(CACHE_ENV_VAR):
        return Path(os.environ[CACHE_ENV_VAR]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "fcmoe_hf"


def _cache_entry(cache_root: Path, gguf_path: str) -> tuple[Path, dict[str, Any]]:
    # The dequantised weights depend on the file and on transformers' GGUF conversion code (which e.g. un-permutes
    # q/k projections), so both are in the key; a changed file or a transformers upgrade gets a fresh entry.
    stat = os.stat(gguf_path)
    source = {
        "gguf_file": os.path.abspath(gguf_path),
        "size": stat.st_size,
        "mtime_ns": stat.st_mtime_ns,
        "transformers": transformers.__version__,
    }
    digest = hashlib.sha256(json.dumps(source, sort_keys=True).encode()).hexdigest()[:16]
    return cache_root / "gguf" / f"{Path(gguf_path).stem}-{digest}", source


def _dequantize_gguf(
    directory: str,
    gguf_file: str,
    model_kwargs: dict[str, Any],
    tokenizer_kwargs: dict[str, Any],
    auto_model_class: type = AutoModelForCausalLM,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    from transformers import GgufConfig

    # dequantize=True: with a GGUF matmul kernel available (the `kernels` package on a GPU) transformers would keep
    # the weights packed in GGUF modules, which are not nn.Linear and so cannot be adapted (or saved).
    model_kwargs = {"quantization_config": GgufConfig(dequantize=True), **model_kwargs}
    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=gguf_file, **tokenizer_kwargs)
    model = auto_model_class.from_pretrained(directory, gguf_file=gguf_file, **model_kwargs)
    logger.info("Dequantised %s in %.1f s.", os.path.join(directory, gguf_file), time.perf_counter() - start)
    _fix_tokenizer_max_length(tokenizer, model)
    return model, tokenizer


def _fix_tokenizer_max_length(tokenizer: PreTrainedTokenizerBase, model: PreTrainedModel) -> None:
    # GGUF (and some Hub) tokenizers carry no model_max_length; `truncation=True` would then never truncate.
    from transformers.tokenization_utils_base import VERY_LARGE_INTEGER

    max_positions = getattr(model.config, "max_position_embeddings", None)
    if tokenizer.model_max_length >= VERY_LARGE_INTEGER and isinstance(max_positions, int):
        tokenizer.model_max_length = max_positions


def _cached_gguf_dir(directory: str, gguf_file: str, cache_root: Path) -> Optional[Path]:
    """The directory of a `save_pretrained` copy of the dequantised GGUF model, creating it on a miss.

    Returns `None` when the cache cannot be written (the caller then loads the GGUF file directly).
    """
    gguf_path = os.path.join(directory, gguf_file)
    entry, source = _cache_entry(cache_root, gguf_path)
    if (entry / _CACHE_MARKER).is_file():
        try:
            os.utime(entry / _CACHE_MARKER)  # last use, for pruning
        except OSError:
            pass
        return entry
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{entry.name}.", dir=entry.parent))
    except OSError as error:
        logger.warning(
            "Cannot write the model cache under %s (%s); loading the GGUF file without it.", cache_root, error
        )
        return None
    try:
        logger.info("Dequantising %s once (about 20-30 s on 2 CPU cores); caching it in %s.", gguf_path, entry)
        # Always float32: the cache must hold the exact dequantised values; the caller's dtype is applied on load.
        model, tokenizer = _dequantize_gguf(directory, gguf_file, {"dtype": torch.float32}, {})
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        del model
        (staging / _CACHE_MARKER).write_text(json.dumps({**source, "created": time.time()}, indent=2))
        try:
            # Atomic publish: concurrent loaders (e.g. the ranks of `accelerate launch`) may all dequantise, but
            # only complete entries ever become visible, and the first rename wins.
            os.rename(staging, entry)
        except OSError:
            if not (entry / _CACHE_MARKER).is_file():
                raise
    except OSError as error:
        logger.warning(
            "Could not cache the dequantised model in %s (%s); loading the GGUF file without it.", entry, error
        )
        return None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    prune_stale_cache_entries(cache_root, source)
    return entry


#: Entries of the same GGUF file made by another transformers version are removed after this long unused.
STALE_CACHE_SECONDS = 30 * 24 * 3600


def prune_stale_cache_entries(cache_root: Path, source: dict[str, Any]) -> list[Path]:
    """Remove cache entries that a new entry for the GGUF file `source["gguf_file"]` supersedes; return them.

    An entry of the same file goes when the file has changed since (size or mtime), or when another transformers
    version made it and nothing used it for [`STALE_CACHE_SECONDS`] (another environment may still use it). Each
    entry holds a ~540 MB copy of the model, so without this every transformers upgrade would leave one behind.
    """
    removed = []
    now = time.time()
    for marker in (cache_root / "gguf").glob(f"*/{_CACHE_MARKER}"):
        try:
            recorded = json.loads(marker.read_text())
            unused_for = now - marker.stat().st_mtime
        except (OSError, ValueError):
            continue
        if recorded.get("gguf_file") != source["gguf_file"]:
            continue
        changed = (recorded.get("size"), recorded.get("mtime_ns")) != (source["size"], source["mtime_ns"])
        superseded = recorded.get("transformers") != source["transformers"] and unused_for > STALE_CACHE_SECONDS
        if changed or superseded:
            shutil.rmtree(marker.parent, ignore_errors=True)
            removed.append(marker.parent)
            logger.info("Removed the stale model cache entry %s.", marker.parent)
    return removed
