"""Server merge at scale (issue 4): FC-MoE against a plain streaming weighted sum over the same saved client updates.

A 7B-shaped MoE-LoRA adapter (Llama-2-7B geometry: 32 layers, hidden 4096, intermediate 11008; E=8 experts of rank 8
on q/k/v/o/gate/up/down, plus a per-module router (E, in)) is written to disk once for the largest K as K client
updates (`ClientUpdate.save`: safetensors + JSON) and a global adapter. Each measurement then runs in a fresh
subprocess that opens the updates lazily and merges them; the parent reads the child's peak RSS from `os.wait4`.

Methods:
- `plain`: the floor, `Theta[key] + sum_i p_i Delta_i[key]`, key by key, one `add_` per client and tensor;
- `fedavg`: `FedAvgAggregator` (validation, streaming, same arithmetic as FC-MoE's ablated path);
- `fcmoe`: `FCMoEAggregator` with the paper's defaults (importance, consensus projection, retention coefficients).

Page cache: by default every file of the run is evicted from the page cache before each measurement
(`posix_fadvise(DONTNEED)` after an `fsync`), so each method starts cold and reads its first pass from disk.

Usage:
    python benchmarks/merge_scale.py                               # K = 8, 32, 64 at full size (~25 min here)
    python benchmarks/merge_scale.py --layers 2 --clients 2,4      # a quick run
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

MODULES = {  # name: (in_features, out_features) for the 7B geometry, filled in by `shapes()`
    "self_attn.q_proj": ("hidden", "hidden"),
    "self_attn.k_proj": ("hidden", "hidden"),
    "self_attn.v_proj": ("hidden", "hidden"),
    "self_attn.o_proj": ("hidden", "hidden"),
    "mlp.gate_proj": ("hidden", "intermediate"),
    "mlp.up_proj": ("hidden", "intermediate"),
    "mlp.down_proj": ("intermediate", "hidden"),
}


def shapes(args) -> dict[str, tuple[int, ...]]:
    """The adapter's tensor shapes, keyed as peft's checkpoint keys."""
    dims = {"hidden": args.hidden, "intermediate": args.intermediate}
    out = {}
    for layer in range(args.layers):
        for module, (i, o) in MODULES.items():
            prefix = f"base_model.model.model.layers.{layer}.{module}"
            din, dout = dims[i], dims[o]
            out[f"{prefix}.moe_lora_A"] = (args.experts, args.rank, din)
            out[f"{prefix}.moe_lora_B"] = (args.experts, dout, args.rank)
            out[f"{prefix}.moe_lora_router"] = (args.experts, din)
    return out


def generate(args, root: str, num_clients: int) -> None:
    """Write the global adapter (fp32) and `num_clients` client updates (`--update-dtype`) under `root`."""
    import torch
    from safetensors.torch import save_file

    from fcmoe_hf.federated import ClientUpdate
    from fcmoe_hf.federated.layout import expert_group_of

    torch.set_num_threads(args.threads)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.update_dtype]
    gen = torch.Generator().manual_seed(args.seed)
    spec = shapes(args)
    theta = {k: torch.randn(s, generator=gen) * 0.02 for k, s in spec.items()}
    os.makedirs(os.path.join(root, "global"), exist_ok=True)
    save_file(theta, os.path.join(root, "global", "adapter_model.safetensors"))
    del theta
    groups = sorted({g for g in map(expert_group_of, spec) if g is not None})
    # Updates = a shared direction + client noise, with each client flipping some experts: the merge sees real
    # agreement and real conflicts (timings do not depend on the values). The noise is a random window of a pool
    # of normals: generating 170M fresh normals per client would dominate the run.
    common = {k: torch.randn(s, generator=gen) for k, s in spec.items()}
    largest = max(math.prod(s) for s in spec.values())
    pool = torch.randn(4 * largest, generator=gen)
    for c in range(num_clients):
        flips = torch.where(torch.rand(args.experts, generator=gen) < 0.3, -1.0, 1.0)
        deltas = {}
        for key, s in spec.items():
            start = int(torch.randint(0, pool.numel() - math.prod(s) + 1, (1,), generator=gen))
            noise = pool[start : start + math.prod(s)].view(s)
            if expert_group_of(key) is not None:
                value = common[key] * flips.view(-1, *([1] * (len(s) - 1))) + noise
            else:
                value = common[key] + noise
            deltas[key] = (value * 1e-3).to(dtype)
        counts = {g: torch.randint(1, 5000, (args.experts,), generator=gen).double() for g in groups}
        ClientUpdate(f"client_{c:03d}", int(torch.randint(100, 1000, (1,), generator=gen)), deltas, counts).save(
            os.path.join(root, f"client_{c:03d}")
        )
        print(f"  wrote client {c + 1}/{num_clients}", end="\r", flush=True)
    print()


def files_of(root: str, k: int) -> list[str]:
    out = [os.path.join(root, "global", "adapter_model.safetensors")]
    for c in range(k):
        d = os.path.join(root, f"client_{c:03d}")
        out += [os.path.join(d, f) for f in sorted(os.listdir(d))]
    return out


def evict(paths: list[str]) -> None:
    """Drop these files' pages from the OS page cache (clean pages; they were fsync'ed after writing)."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def worker(method: str, root: str, k: int, threads: int) -> None:
    """Child process: merge the first `k` updates with `method`; print timings as JSON on the last line."""
    import torch

    from fcmoe_hf.federated import ClientUpdate, FCMoEAggregator, FedAvgAggregator
    from fcmoe_hf.federated.io import LazySafetensors

    torch.set_num_threads(threads)
    ready = resource.getrusage(resource.RUSAGE_SELF)
    rss_ready = ready.ru_maxrss
    start = time.perf_counter()
    global_state = LazySafetensors(os.path.join(root, "global", "adapter_model.safetensors"))
    updates = [ClientUpdate.load(os.path.join(root, f"client_{c:03d}")) for c in range(k)]
    if method == "plain":
        total = sum(u.num_samples for u in updates)
        weights = [u.num_samples / total for u in updates]
        merged = {}
        with torch.no_grad():
            for key in global_state:
                acc = global_state[key].to(torch.float32)
                for w, u in zip(weights, updates):
                    acc.add_(u.deltas[key], alpha=w)
                merged[key] = acc
    elif method == "fedavg":
        merged = FedAvgAggregator().aggregate(global_state, updates).global_state
    elif method == "fcmoe":
        merged = FCMoEAggregator().aggregate(global_state, updates).global_state
    elif method == "fcmoe-noretention":
        merged = FCMoEAggregator(use_retention=False).aggregate(global_state, updates).global_state
    else:
        raise ValueError(f"unknown method {method!r}")
    seconds = time.perf_counter() - start
    done = resource.getrusage(resource.RUSAGE_SELF)
    cpu = done.ru_utime + done.ru_stime - ready.ru_utime - ready.ru_stime  # all threads, merge only
    checksum = sum(float(t.double().sum()) for t in merged.values())
    print(json.dumps({"seconds": seconds, "cpu_seconds": cpu, "rss_ready_kb": rss_ready, "rss_merge_kb": done.ru_maxrss, "checksum": checksum}))


def measure(method: str, root: str, k: int, cold: bool, threads: int) -> dict:
    if cold:
        evict(files_of(root, k))
    load = os.getloadavg()[0]
    wall = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), "--worker", method, "--root", root, "--k", str(k), "--threads", str(threads)],
        stdout=subprocess.PIPE,
        text=True,
    )
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"{method} K={k} failed with exit code {proc.returncode}:\n{out}")
    result = json.loads(out.strip().splitlines()[-1])
    result.update(
        method=method,
        k=k,
        peak_rss_mb=usage.ru_maxrss / 1024,
        wall=time.perf_counter() - wall,
        load=load,
    )
    result["ready_rss_mb"] = result.pop("rss_ready_kb") / 1024
    result["merge_rss_mb"] = result.pop("rss_merge_kb") / 1024
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", default="8,32,64", help="comma-separated K values")
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--intermediate", type=int, default=11008)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--update-dtype", choices=["bf16", "fp32"], default="bf16", help="dtype of the saved updates")
    parser.add_argument("--methods", default="plain,fedavg,fcmoe")
    parser.add_argument("--warm", action="store_true", help="do not evict the page cache before each measurement")
    parser.add_argument("--workdir", default=None, help="parent directory of the temporary data (default: system temp)")
    parser.add_argument("--keep", action="store_true", help="keep the generated data")
    parser.add_argument(
        "--data", default=None, help="reuse (or generate once into) this directory instead of a temporary one; kept"
    )
    parser.add_argument("--json", default=None, help="write the results to this JSON file")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeat", type=int, default=1, help="runs per (K, method); the median run is reported")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch intra-op threads in the workers (1: the merge's per-tensor kernels are small)"
    )
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--root", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--k", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--generate", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.root, args.k, args.threads)
        return
    ks = sorted(int(k) for k in args.clients.split(","))
    if args.generate:
        generate(args, args.generate, ks[-1])
        return

    methods = args.methods.split(",")
    n_params = sum(math.prod(s) for s in shapes(args).values())
    adapter_mb = n_params * 4 / 2**20
    update_mb = n_params * (2 if args.update_dtype == "bf16" else 4) / 2**20
    need_gb = (update_mb * ks[-1] + adapter_mb) / 1024
    reuse = args.data is not None and os.path.exists(os.path.join(args.data, f"client_{ks[-1] - 1:03d}", "update.json"))
    if args.data is not None:
        os.makedirs(args.data, exist_ok=True)
        args.keep = True
    root = args.data or tempfile.mkdtemp(prefix="merge_scale_", dir=args.workdir)
    free_gb = shutil.disk_usage(root).free / 2**30
    print(f"adapter: {n_params / 1e6:.1f}M params, {adapter_mb:.0f} MiB fp32; one update {update_mb:.0f} MiB "
          f"({args.update_dtype}); data {need_gb:.1f} GiB in {root} ({free_gb:.0f} GiB free)")
    if not reuse and need_gb > free_gb * 0.9:
        shutil.rmtree(root)
        raise SystemExit(f"Not enough disk space for {need_gb:.1f} GiB of updates.")
    results = []
    try:
        t0 = time.perf_counter()
        if reuse:  # the same shapes and seed are the caller's responsibility
            print(f"reusing the updates in {root}")
        else:
            # In a subprocess: the parent must stay small (a child's ru_maxrss starts from the parent's RSS at fork).
            command = [sys.executable, os.path.abspath(__file__), "--generate", root] + sys.argv[1:]
            subprocess.run(command, check=True)
            os.sync()
            print(f"generated in {time.perf_counter() - t0:.0f} s")
        for k in ks:
            for method in methods:
                runs = [measure(method, root, k, cold=not args.warm, threads=args.threads) for _ in range(args.repeat)]
                r = sorted(runs, key=lambda x: x["seconds"])[(len(runs) - 1) // 2]  # the median (lower) run
                r["all_seconds"] = [x["seconds"] for x in runs]
                r["read_gb"] = (update_mb * k + adapter_mb) / 1024
                results.append(r)
                print(f"K={k:3d} {method:>8s}: {r['seconds']:7.1f} s {r['all_seconds']} ({r['cpu_seconds']:.1f} CPU s), peak RSS {r['peak_rss_mb']:6.0f} MiB "
                      f"(after imports {r['ready_rss_mb']:.0f}), load {r['load']:.1f}, checksum {r['checksum']:.6e}", flush=True)
    finally:
        if args.keep:
            print(f"data kept in {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)

    print(
        "\n| K | method | wall s | x plain | x fedavg | CPU s | CPU x plain | peak RSS (MiB) | peak RSS / adapter "
        "| RSS after imports (MiB) | load avg |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        ratios = []
        for base, field in (("plain", "seconds"), ("fedavg", "seconds"), ("plain", "cpu_seconds")):
            ref = next((p for p in results if p["k"] == r["k"] and p["method"] == base), None)
            ratios.append(f"{r[field] / ref[field]:.2f}" if ref else "-")
        print(f"| {r['k']} | {r['method']} | {r['seconds']:.1f} | {ratios[0]} | {ratios[1]} | {r['cpu_seconds']:.1f} | "
              f"{ratios[2]} | {r['peak_rss_mb']:.0f} | {r['peak_rss_mb'] / adapter_mb:.2f} | {r['ready_rss_mb']:.0f} | "
              f"{r['load']:.1f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"adapter_mib": adapter_mb, "update_mib": update_mb, "args": vars(args), "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
