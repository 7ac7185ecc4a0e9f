"""Student training throughput: kdray's Ray Train loop over cached transfer shards (x, y, t),
relative to a plain in-memory PyTorch loop with the same student, loss, batch size and torch threads.

    python benchmarks/student_throughput.py [--rows 200000] [--epochs 3] [--batch-size 256] \
        [--hidden 128 128] [--classes 40] [--json student_throughput.json]

The transfer shards are written by kdray's own transfer stage (`run_transfer`) from a synthetic
dataset and an untrained teacher: the teacher's weights change neither the shards' size nor the
student's cost. kdray trains with `kdray.runtime.train.fit` on one Ray Train worker holding 1 CPU; Ray sets
OMP_NUM_THREADS to a worker's whole CPUs, so that worker runs 1 torch thread, and the baseline runs
with the threads a Ray task holding the same CPUs reports. Both figures are rows/s over the epochs
after the first (start-up excluded), kdray's from the per-epoch `rows_per_second` in
`FitResult.history`; the figure is kdray ÷ plain (issue target: >= 0.85). The end-to-end wall time of
`fit`, Ray Train start-up, validation and checkpoints included, is reported separately.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pyarrow as pa
import pyarrow.dataset as pads
import ray
import ray.data
import torch
from torch import nn

from kdray.config import Config, config_from_dict
from kdray.data import read_split
from kdray.data.shards import DatasetManifest
from kdray.data.synth import write_synthetic_dataset
from kdray.distill.losses import distillation_loss
from kdray.distill.student import student_loss, student_spec
from kdray.distill.teacher import member_spec
from kdray.distill.transfer import read_transfer, run_transfer
from kdray.evaluation.inference import ModelRef, features
from kdray.runtime.artifacts import ModelSpec, save_bundle
from kdray.runtime.stage import StageContext
from kdray.runtime.storage import Storage
from kdray.runtime.train import TEACHER_LOGITS, FitResult, FitSpec, LossSpec, fit, make_optimizer

TARGET_RATIO = 0.85
TEACHER_BATCH = 2048  # rows per teacher forward when caching in memory (map_logits' batch size)
DATASET_DIR, TEACHER_DIR, WORK_DIR = "data", "teacher", "_work"


# ------------------------------------------------------------------------------------ set-up
def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """The data, models and schedule both student benchmarks share."""
    parser.add_argument("--rows", type=int, default=200_000, help="training (= transfer) rows")
    parser.add_argument("--validation-rows", type=int, default=2_000)
    parser.add_argument("--dim", type=int, default=32)
    parser.add_argument("--classes", type=int, default=40)
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--hidden", type=int, nargs="+", default=[128, 128], help="student MLP widths")
    parser.add_argument("--teacher-hidden", type=int, nargs="+", default=[1200, 1200], help="teacher MLP widths")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--json", metavar="PATH", help="also write the figures as JSON to PATH")


def benchmark_config(args: argparse.Namespace, ray_cpus: int) -> Config:
    """The kdray config the benchmark runs: one CPU-only worker, the arguments' data and models."""
    synth = {"rows": args.rows, "validation_rows": args.validation_rows, "test_rows": args.validation_rows,
             "classes": args.classes, "groups": max(1, args.classes // 5), "dim": args.dim, "shards": args.shards}
    return config_from_dict({
        "data": {"source": "synth", "synth": synth},
        "teacher": {"model": {"name": "mlp", "hidden": args.teacher_hidden}},
        "distill": {"student": {"name": "mlp", "hidden": args.hidden}, "baseline": False,
                    "train": {"epochs": args.epochs, "batch_size": args.batch_size}},
        # The CPU count of this machine, and at least what the run holds at once plus one CPU for
        # Ray Data's reads (with none left, a read waits forever).
        "resources": {"num_workers": 1, "cpus_per_worker": 1.0, "use_gpu": False,
                      "local_num_cpus": max(ray_cpus, os.cpu_count() or 1)},
    }, source="benchmark arguments")


@contextmanager
def local_ray(num_cpus: int) -> Iterator[None]:
    """A fresh in-process Ray with `num_cpus` logical CPUs, started as `kdray run` starts one (dashboard
    on 127.0.0.1, worker logs off), even where another Ray runs on this machine: sharing it would
    share its CPUs."""
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=True, dashboard_host="127.0.0.1",
             log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    try:
        yield
    finally:
        ray.shutdown()


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict[str, Any]:
    return {"cpu": cpu_model(), "cores": os.cpu_count(), "torch": torch.__version__, "ray": ray.__version__,
            "python": platform.python_version()}


def _torch_threads() -> int:
    return torch.get_num_threads()


def worker_torch_threads(cpus: float) -> int:
    """torch threads in a Ray worker holding `cpus` CPUs (Ray sets OMP_NUM_THREADS to their floor)."""
    return ray.get(ray.remote(num_cpus=cpus)(_torch_threads).remote())


def mlp_name(spec: ModelSpec) -> str:
    widths = [spec.input_shape[0], *spec.options["hidden"], spec.num_outputs]
    return "MLP " + "-".join(str(width) for width in widths)


# ------------------------------------------------------------------------------------ data
def prepare_dataset(config: Config, run: Storage) -> tuple[str, DatasetManifest]:
    storage = run.child(DATASET_DIR)
    return storage.location, write_synthetic_dataset(storage, config.data.synth)


def build_teacher(config: Config, manifest: DatasetManifest) -> tuple[nn.Module, ModelSpec]:
    """The teacher, untrained (its cost does not depend on its weights), in eval mode."""
    spec = member_spec(config, manifest.feature_shape, manifest.num_classes, 0).model
    torch.manual_seed(config.teacher.train.seed)
    return spec.build().eval(), spec


def save_teacher(run: Storage, model: nn.Module, spec: ModelSpec) -> ModelRef:
    save_bundle(run, TEACHER_DIR, spec, model.state_dict())
    return ModelRef(run.location, (TEACHER_DIR,))


def run_transfer_stage(config: Config, run: Storage, dataset: str, teacher: ModelRef) -> tuple[str, float]:
    """kdray's transfer stage on `dataset` with `teacher`; -> (shards location, seconds)."""
    inputs = {"data": {"outputs": {"dataset": dataset}},
              "teacher": {"outputs": {"teacher": {"location": teacher.location, "bundles": teacher.bundles}}}}
    context = StageContext(config, run, run.child("transfer"), run.child(WORK_DIR, "transfer"), inputs, progress=False)
    started = time.perf_counter()
    result = run_transfer(context)
    return result.outputs["transfer"], time.perf_counter() - started


def load_columns(location: str, columns: list[str]) -> dict[str, torch.Tensor]:
    """Parquet files under `location` as in-memory tensors: vectors [N, K] float32, the rest [N]."""
    storage = Storage(location)
    table = pads.dataset(storage.path(), filesystem=storage.filesystem, format="parquet").to_table(columns=columns)
    vectors = {name for name in columns if pa.types.is_fixed_size_list(table.schema.field(name).type)}
    # torch.tensor copies: Arrow's buffers are read-only.
    return {name: torch.tensor(features(table, name) if name in vectors else table.column(name).to_numpy())
            for name in columns}


def in_memory_batches(columns: dict[str, torch.Tensor], batch_size: int, seed: int):
    size = len(next(iter(columns.values())))
    order = torch.randperm(size, generator=torch.Generator().manual_seed(seed))
    for start in range(0, size, batch_size):
        index = order[start:start + batch_size]
        yield {name: column[index] for name, column in columns.items()}


# ------------------------------------------------------------------------------------ plain PyTorch
@torch.no_grad()
def teacher_outputs(teacher: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Teacher logits [N, C] for x [N, D], in chunks of TEACHER_BATCH rows."""
    return torch.cat([teacher(x[start:start + TEACHER_BATCH]) for start in range(0, len(x), TEACHER_BATCH)])


def distill_epoch(model: nn.Module, optimizer: torch.optim.Optimizer, batches, loss: LossSpec,
                  teacher: nn.Module | None = None) -> int:
    """Plain distillation steps; targets from the batch's cached `t`, or from `teacher` run inside
    each step. Returns the rows seen."""
    model.train()
    rows = 0
    for batch in batches:
        targets = batch[TEACHER_LOGITS] if teacher is None else teacher_outputs(teacher, batch["x"])
        terms = distillation_loss(model(batch["x"]), targets, batch["y"], loss.temperature, loss.hard_weight)
        optimizer.zero_grad(set_to_none=True)
        terms.total.backward()
        optimizer.step()
        rows += len(batch["y"])
    return rows


def timed_epochs(run_epoch: Callable[[int], int], epochs: int) -> list[dict[str, float]]:
    """Per-epoch rows, seconds and rows_per_second, with the keys of kdray's training history."""
    history = []
    for epoch in range(epochs):
        started = time.perf_counter()
        rows = run_epoch(epoch)
        seconds = time.perf_counter() - started
        history.append({"rows": rows, "seconds": seconds, "rows_per_second": rows / seconds})
    return history


def plain_history(spec: FitSpec, columns: dict[str, torch.Tensor], teacher: nn.Module | None = None):
    """Train `spec`'s student in this process for its epochs, from the weights a kdray worker starts with."""
    torch.manual_seed(spec.train.seed)
    model = spec.model.build()
    optimizer = make_optimizer(model.parameters(), spec.train)

    def run_epoch(epoch: int) -> int:
        batches = in_memory_batches(columns, spec.train.batch_size, seed=epoch)
        return distill_epoch(model, optimizer, batches, spec.loss, teacher)

    return timed_epochs(run_epoch, spec.train.epochs)


# ------------------------------------------------------------------------------------ kdray
def timed_fit(spec: FitSpec, train, validation, config: Config, run: Storage, name: str) -> tuple[FitResult, float]:
    """`kdray.runtime.train.fit` and its end-to-end wall time (Ray Train start-up and shutdown included)."""
    started = time.perf_counter()
    result = fit(spec, {"train": train, "validation": validation}, config.resources, run.child(WORK_DIR).uri(), name)
    return result, time.perf_counter() - started


# ------------------------------------------------------------------------------------ figures
def epoch_figures(history: list[dict[str, float]]) -> dict[str, Any]:
    """Per-epoch rows/s, rows/s over the epochs after the first, and the seconds of all epochs."""
    steady = history[1:]
    return {"rows_per_second": [h["rows_per_second"] for h in history],
            "steady_rows_per_second": sum(h["rows"] for h in steady) / sum(h["seconds"] for h in steady),
            "epoch_seconds": sum(h["seconds"] for h in history)}


def write_json(path: str, figures: dict[str, Any]) -> None:
    with open(path, "w") as handle:
        json.dump(figures, handle, indent=2)
        handle.write("\n")
    print(f"figures written to {path}")


def print_setup(figures: dict[str, Any]) -> None:
    m, s = figures["machine"], figures["setup"]
    print(f"machine : {m['cpu']}, {m['cores']} cores, torch {m['torch']}, ray {m['ray']}, python {m['python']}")
    print(f"data    : {s['rows']:,} rows x {s['dim']} features, {s['classes']} classes; batch {s['batch_size']}, "
          f"{s['epochs']} epochs, {s['optimizer']}, T={s['temperature']:g}, hard weight {s['hard_weight']:g}")
    print(f"models  : student {s['student']}, teacher {s['teacher']} (untrained: its cost is the same)")
    print(f"threads : {s['torch_threads']} torch thread(s) in every loop (what a Ray worker with "
          f"{s['cpus_per_worker']:g} CPU gets: Ray sets OMP_NUM_THREADS to its whole CPUs)")


def print_results(figures: dict[str, Any]) -> None:
    plain, kdray, epochs = figures["plain"], figures["kdray"], figures["setup"]["epochs"]
    per_epoch = lambda values: ", ".join(f"{v:,.0f}" for v in values)
    steady = f"epochs 2-{epochs}" if epochs > 2 else "epoch 2"
    print(f"\n{'':34}{f'rows/s, {steady}':>22}   per epoch")
    print(f"{'plain PyTorch, in memory':34}{plain['steady_rows_per_second']:>22,.0f}   {per_epoch(plain['rows_per_second'])}")
    print(f"{'kdray fit, streamed shards':34}{kdray['steady_rows_per_second']:>22,.0f}   {per_epoch(kdray['rows_per_second'])}")
    print(f"{'ratio kdray / plain':34}{figures['ratio']:>22.3f}   (target >= {figures['target']})")
    outside = kdray["wall_seconds"] - kdray["epoch_seconds"]
    print(f"\nwall time, {epochs} epochs: kdray fit {kdray['wall_seconds']:.1f} s ({outside:.1f} s outside the epochs: "
          f"Ray Train start-up, validation, checkpoints), plain loop {plain['epoch_seconds']:.1f} s")
    print(f"transfer stage (one-off, teacher logits cached as Parquet): {figures['transfer_seconds']:.1f} s")


# ------------------------------------------------------------------------------------ main
def setup_figures(config: Config, spec: FitSpec, teacher: ModelSpec, threads: int) -> dict[str, Any]:
    synth, train = config.data.synth, spec.train
    return {"rows": synth.rows, "dim": synth.dim, "classes": synth.classes, "batch_size": train.batch_size,
            "epochs": train.epochs, "optimizer": train.optimizer, "lr": train.lr,
            "temperature": spec.loss.temperature, "hard_weight": spec.loss.hard_weight,
            "student": mlp_name(spec.model), "teacher": mlp_name(teacher), "torch_threads": threads,
            "cpus_per_worker": config.resources.cpus_per_worker}


def measure(config: Config, run: Storage) -> dict[str, Any]:
    threads = worker_torch_threads(config.resources.cpus_per_worker)
    torch.set_num_threads(threads)
    dataset, manifest = prepare_dataset(config, run)
    teacher, teacher_spec = build_teacher(config, manifest)
    transfer, transfer_seconds = run_transfer_stage(config, run, dataset, save_teacher(run, teacher, teacher_spec))
    spec = student_spec(config, manifest.feature_shape, manifest.num_classes, student_loss(config))
    plain = plain_history(spec, load_columns(transfer, ["x", "y", TEACHER_LOGITS]))
    validation = read_split(Storage(dataset), "validation", manifest)
    result, wall = timed_fit(spec, read_transfer(transfer), validation, config, run, "student")
    plain, kdray = epoch_figures(plain), {**epoch_figures(result.history), "wall_seconds": wall}
    return {"benchmark": "student_throughput", "machine": machine(),
            "setup": setup_figures(config, spec, teacher_spec, threads), "transfer_seconds": transfer_seconds,
            "plain": plain, "kdray": kdray, "target": TARGET_RATIO,
            "ratio": kdray["steady_rows_per_second"] / plain["steady_rows_per_second"]}


def run_and_report(config: Config, measure_figures: Callable[[Config, Storage], dict[str, Any]],
                   print_figures: Callable[[dict[str, Any]], None], json_path: str | None) -> None:
    """Measure in a scratch directory on a fresh local Ray, then print (and write) the figures."""
    with tempfile.TemporaryDirectory() as directory, local_ray(config.resources.local_num_cpus):
        figures = measure_figures(config, Storage(directory))
    print_setup(figures)
    print_figures(figures)
    if json_path:
        write_json(json_path, figures)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_arguments(parser)
    args = parser.parse_args()
    if args.epochs < 2:
        parser.error("--epochs must be at least 2: the figure leaves the first epoch out")
    config = benchmark_config(args, ray_cpus=2)  # the worker, and Ray Data's reads
    run_and_report(config, measure, print_results, args.json)


if __name__ == "__main__":
    main()
