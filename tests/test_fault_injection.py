"""Fault injection: a tiny federation is killed with SIGKILL at random points (every file write, rename and deletion in
its run directory, every client's training, the merge and the evaluation are candidate points), resumed (and killed
again), and its final adapters, cards, checkpoint and logs must be bit-identical to an uninterrupted run's.

Each run is a process forked from a fork server that has imported everything (a fresh `spawn` would re-import torch
and transformers for every run); the process SIGKILLs itself at the chosen point, so nothing is cleaned up: files are
left truncated mid-write (half of their bytes), renames undone, deletions half done, the run directory's lock held by
a dead process.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import re
import signal
import traceback
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from .test_simulation import tiny_corpus

SEEDS = (0, 1, 2)
KILLS_PER_SEED = 3  # then resumed without a kill until done
NUM_ROUNDS = 2


def _simulation(run_dir: Path, resume: bool):
    from peft import get_peft_model
    from transformers import set_seed

    from fcmoe_hf import MoELoraConfig
    from fcmoe_hf.data import PartitionConfig, partition_dataset
    from fcmoe_hf.simulation import FederatedSimulation, FederationArguments
    from fcmoe_hf.trainer import FederatedMoETrainingArguments

    from .conftest import build_model, tiny_llama_config, tiny_tokenizer

    set_seed(0)
    splits = partition_dataset(tiny_corpus(per_class=8), PartitionConfig(num_clients=2, alpha=1.0, min_partition_size=4, partition_seed=0))
    model = get_peft_model(build_model(tiny_llama_config(), seed=0), MoELoraConfig(r=2, num_experts=2, top_k=1))
    args = FederationArguments(
        aggregator="fcmoe", num_rounds=NUM_ROUNDS, max_length=24, eval_batch_size=16, max_global_eval_samples=8,
        max_local_eval_samples=4, resume=resume, base_model_id="tiny-llama",
    )
    training_args = FederatedMoETrainingArguments(
        output_dir=str(run_dir), per_device_train_batch_size=8, num_train_epochs=1, learning_rate=5e-3, use_cpu=True,
        report_to=[], logging_steps=1, seed=3,
    )
    return FederatedSimulation(model, tiny_tokenizer(), splits, args, training_args)


class _Injector:
    """Counts the fault points of one run and SIGKILLs the process at the `kill_at`-th (never when it is 0)."""

    def __init__(self, run_dir: Path, kill_at: int, log: Path):
        self.run_dir, self.kill_at, self.log, self.count = str(run_dir), kill_at, log, 0

    def inside(self, path) -> bool:
        return isinstance(path, (str, os.PathLike)) and os.path.abspath(os.fspath(path)).startswith(self.run_dir)

    def hit(self, what: str) -> bool:
        self.count += 1
        if self.count != self.kill_at:
            return False
        fd = os.open(self.log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.write(fd, f"{self.count}: {what.replace(self.run_dir, '<run>')}".encode())
        os.close(fd)
        return True

    @staticmethod
    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    def install(self, simulation) -> None:
        import builtins
        import io
        import shutil

        import safetensors.torch as st

        injector, real_open, real_replace, real_rmtree = self, builtins.open, os.replace, shutil.rmtree
        real_serialize = st.serialize_file

        class Torn:  # a file killed halfway through its first write
            def __init__(self, f):
                self._f = f

            def write(self, data):
                self._f.write(data[: max(1, len(data) // 2)])
                self._f.flush()
                injector.die()

            def __getattr__(self, name):
                return getattr(self._f, name)

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                return self._f.__exit__(*exc)

        def open_(file, mode="r", *args, **kwargs):
            f = real_open(file, mode, *args, **kwargs)
            if any(c in mode for c in "wax+") and injector.inside(file) and injector.hit(f"open {mode} {file}"):
                return Torn(f)
            return f

        def replace(src, dst, *args, **kwargs):
            if injector.inside(dst) and injector.hit(f"rename {src} -> {dst}"):
                injector.die()
            return real_replace(src, dst, *args, **kwargs)

        def rmtree(path, *args, **kwargs):
            if injector.inside(path) and os.path.isdir(path):
                for root, _, files in sorted(os.walk(path)):
                    for name in sorted(files):
                        if injector.hit(f"delete {os.path.join(root, name)}"):
                            injector.die()
                        os.unlink(os.path.join(root, name))
            return real_rmtree(path, *args, **kwargs)

        def serialize_file(tensors, filename, *args, **kwargs):
            real_serialize(tensors, filename, *args, **kwargs)
            if injector.inside(filename) and injector.hit(f"safetensors {filename}"):
                os.truncate(filename, os.path.getsize(filename) // 2)
                injector.die()

        builtins.open = io.open = open_
        os.replace, shutil.rmtree, st.serialize_file = replace, rmtree, serialize_file
        for name in ("train_client", "evaluate"):
            method = getattr(simulation, name)
            setattr(simulation, name, self._before(method, name))
        simulation.aggregator.aggregate = self._before(simulation.aggregator.aggregate, "aggregate")

    def _before(self, method, name):
        def wrapped(*args, **kwargs):
            if self.hit(f"{name} {args[0] if args and isinstance(args[0], str) else ''}"):
                self.die()
            return method(*args, **kwargs)

        return wrapped


def _child(run_dir: str, resume: bool, kill_at: int, workdir: str) -> None:
    """One run in a forked process: killed at its `kill_at`-th fault point, or to the end (`count` written)."""
    workdir = Path(workdir)
    try:
        simulation = _simulation(Path(run_dir), resume)
        injector = _Injector(Path(run_dir), kill_at, workdir / "killed_at.txt")
        injector.install(simulation)
        simulation.run()
        (workdir / "count.txt").write_text(str(injector.count))
    except BaseException:
        (workdir / "error.txt").write_text(traceback.format_exc())
        raise


@pytest.fixture(scope="module")
def context():
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["tests.test_fault_injection"])
    return ctx


def _run(ctx, run_dir: Path, resume: bool, kill_at: int, workdir: Path) -> str:
    """`"killed at ..."` or `"finished"`; a run failing any other way fails the test with its traceback."""
    for name in ("killed_at.txt", "error.txt", "count.txt"):
        (workdir / name).unlink(missing_ok=True)
    process = ctx.Process(target=_child, args=(str(run_dir), resume, kill_at, str(workdir)))
    process.start()
    process.join(timeout=300)
    if process.exitcode == -signal.SIGKILL and (workdir / "killed_at.txt").exists():
        return "killed at " + (workdir / "killed_at.txt").read_text()
    error = (workdir / "error.txt").read_text() if (workdir / "error.txt").exists() else ""
    assert process.exitcode == 0, f"run failed (exit {process.exitcode}), not by the injected kill:\n{error}"
    return "finished"


@pytest.fixture(scope="module")
def reference(context, tmp_path_factory):
    """The uninterrupted run, and how many fault points it passes."""
    workdir = tmp_path_factory.mktemp("reference")
    assert _run(context, workdir / "run", False, 0, workdir) == "finished"
    return workdir / "run", int((workdir / "count.txt").read_text())


# Wall-clock times, and the bytes of the update files on disk (their JSON holds the clients' training runtimes), differ
# between any two runs, interrupted or not.
_UNSTABLE = re.compile(r"seconds|runtime|per_second|^bytes_")


def _normalized(run_dir: Path, relative: str) -> str:
    text = (run_dir / relative).read_text().replace(str(run_dir), "<run>")
    if relative.endswith(".json"):
        record = json.loads(text)
        for card in [record["cards"]["global"], *record["cards"]["clients"].values()]:
            card.pop("bytes_uploaded"), card.pop("bytes_downloaded")
        return json.dumps(record, sort_keys=True)
    return re.sub(r"[0-9.]+ (B|kB|MB|GB)\b", "<bytes>", text)


def _metrics(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if not _UNSTABLE.search(k)} for row in rows]


def assert_same_run(expected: Path, got: Path) -> None:
    adapters = sorted(p.relative_to(expected) for p in expected.rglob("adapter_model.safetensors"))
    assert adapters and adapters == sorted(p.relative_to(got) for p in got.rglob("adapter_model.safetensors"))
    latest = (expected / "latest_checkpoint").read_text()
    assert (got / "latest_checkpoint").read_text() == latest
    for relative in [*map(str, adapters), f"checkpoints/{latest}/global_state.safetensors"]:
        a, b = load_file(expected / relative), load_file(got / relative)
        assert a.keys() == b.keys(), relative
        for key in a:
            assert torch.equal(a[key], b[key]), f"{relative}: {key}"
    rows, expected_rows = _metrics(got), _metrics(expected)
    assert [r["round"] for r in rows] == [r["round"] for r in expected_rows]
    for row, expected_row in zip(rows, expected_rows):
        differing = {k: (expected_row.get(k), row.get(k)) for k in {*row, *expected_row} if row.get(k) != expected_row.get(k)}
        assert not differing, f"round {row['round']}: {differing}"
    for relative in ["outputs.json", "global_adapter/README.md", "clients/client_0/adapter/README.md"]:
        assert _normalized(got, relative) == _normalized(expected, relative), relative
    assert not (got / "run.lock").exists()


@pytest.mark.parametrize("seed", SEEDS)
def test_killed_at_random_points_resumes_bit_identical(context, reference, tmp_path, seed):
    expected, points = reference
    rng = random.Random(seed)
    run_dir, events = tmp_path / "run", []
    for attempt in range(KILLS_PER_SEED + 4):
        # A resume replays at most about one round and the outputs: about half of a whole run's points.
        kill_at = rng.randint(1, points if attempt == 0 else points // 2) if attempt < KILLS_PER_SEED else 0
        events.append(_run(context, run_dir, attempt > 0, kill_at, tmp_path))
        if events[-1] == "finished":
            break
    assert events[-1] == "finished" and any(e.startswith("killed") for e in events), events
    print(f"seed {seed}, {points} fault points:", *events, sep="\n  ")
    assert_same_run(expected, run_dir)
