"""Train one client for one round on a tiny Llama with MoE-LoRA and save its ClientUpdate (rank 0 only).

Used by the tests to compare single-process, DDP (`accelerate launch --multi_gpu --num_processes 2`) and DeepSpeed
runs: `python tests/scripts/train_client.py OUTPUT_DIR [--per-device-batch N] [--deepspeed CONFIG]`.
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import torch  # noqa: E402
from peft import get_peft_model  # noqa: E402

from fcmoe_hf import MoELoraConfig  # noqa: E402
from fcmoe_hf.trainer import FederatedMoETrainer, FederatedMoETrainingArguments  # noqa: E402
from tests.conftest import build_model, pad_collator, tiny_llama_config, token_dataset  # noqa: E402


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("output_dir")
    parser.add_argument("--per-device-batch", type=int, default=4)
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--deepspeed", default=None)
    args = parser.parse_args()

    model = get_peft_model(
        build_model(tiny_llama_config(), seed=0), MoELoraConfig(r=4, num_experts=4, top_k=2, init_lora_weights=False)
    )
    training_args = FederatedMoETrainingArguments(
        output_dir=os.path.join(args.output_dir, "trainer"),
        client_id="client_7",
        per_device_train_batch_size=args.per_device_batch,
        gradient_accumulation_steps=args.grad_accum,
        num_train_epochs=1,
        learning_rate=1e-2,
        optim="sgd",
        lr_scheduler_type="constant",
        train_sampling_strategy="sequential",
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,  # without it a CPU launch is N lone processes, not data parallel
        seed=0,
        deepspeed=args.deepspeed,
        moe_lora_aux_loss_coef=0.01,
    )
    trainer = FederatedMoETrainer(
        model=model, args=training_args, train_dataset=token_dataset(16), data_collator=pad_collator
    )
    trainer.train()
    update = trainer.client_update()
    if update is not None:
        update.save(args.output_dir)
        with open(os.path.join(args.output_dir, "world.json"), "w") as f:
            json.dump({"world_size": trainer.args.world_size, "wrapped": type(trainer.model_wrapped).__name__}, f)
    torch.distributed.barrier() if torch.distributed.is_initialized() else None


if __name__ == "__main__":
    main()
