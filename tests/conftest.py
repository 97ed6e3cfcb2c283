"""Tiny models built from configs in code, shared by the tests."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import fcmoe_hf  # noqa: E402,F401  (registers MoE-LoRA with peft)

# Tiny models: one thread avoids thread-sync overhead that dominates their microsecond-sized matmuls.
torch.set_num_threads(1)

VOCAB = 64


def tiny_llama_config(**overrides):
    from transformers import LlamaConfig

    kwargs = dict(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    kwargs.update(overrides)
    return LlamaConfig(**kwargs)


def tiny_moe_config(model_type: str, **overrides):
    from transformers import MixtralConfig, OlmoeConfig, Qwen2MoeConfig

    common = dict(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    if model_type == "mixtral":
        cfg = MixtralConfig(num_local_experts=4, num_experts_per_tok=2, **common)
    elif model_type == "qwen2_moe":
        cfg = Qwen2MoeConfig(
            num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, shared_expert_intermediate_size=32, **common
        )
    elif model_type == "olmoe":
        cfg = OlmoeConfig(num_experts=4, num_experts_per_tok=2, **common)
    else:
        raise ValueError(model_type)
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


def build_model(config, seed: int = 0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config).eval()


@pytest.fixture
def tiny_llama():
    return build_model(tiny_llama_config())


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(1)
    input_ids = torch.randint(3, VOCAB, (2, 7), generator=g)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, :3] = 0  # left padding on the second row
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def token_dataset(num_samples: int = 16, seed: int = 0, min_len: int = 4, max_len: int = 10):
    """A `datasets.Dataset` of random token sequences of varying length (so padding and num_items_in_batch matter)."""
    from datasets import Dataset

    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(num_samples):
        length = int(torch.randint(min_len, max_len + 1, (1,), generator=g))
        rows.append(torch.randint(3, VOCAB, (length,), generator=g).tolist())
    return Dataset.from_dict({"input_ids": rows})


def pad_collator(features):
    """Right-pads `input_ids` with 0, masks padding in `attention_mask` and with -100 in `labels`."""
    longest = max(len(f["input_ids"]) for f in features)
    ids = torch.zeros(len(features), longest, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, f in enumerate(features):
        ids[i, : len(f["input_ids"])] = torch.tensor(f["input_ids"])
        mask[i, : len(f["input_ids"])] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


WORDS = [f"w{i}" for i in range(VOCAB - 4)]


def tiny_tokenizer():
    """A word-level fast tokenizer over `w0 .. w59` built in code (ids 0-3: pad, bos, eos, unk)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, **{w: i + 4 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
