"""Cached teacher logits vs recomputing the teacher at every step: the time of E epochs of student
training each way, side by side in one run, and the one-off cost of the cache.

    python benchmarks/logit_cache.py [--rows 200000] [--epochs 3] [--teacher-hidden 1200 1200] \
        [--hidden 128 128] [--kdray] [--json logit_cache.json]

Plain PyTorch, in this process: the cache is one no-grad teacher pass over the training rows (its
one-off cost), then each step reads its rows' logits; recomputing runs the teacher's no-grad forward
inside every step. With --kdray, also through kdray: the cache is kdray's transfer stage (a Ray
Data actor pool writing Parquet shards, timed end to end), the cached student trains on those
shards; kdray's loop has no teacher inside its step, so the recomputing student trains on the
uncached pipeline instead: the same rows streamed through the teacher's actor (`map_logits`) every
epoch, on a CPU of its own. Both ways use the same untrained teacher (its cost does not depend on its
weights), the same student and initial weights, the same loss, batch size and torch threads (those
of a Ray Train worker holding 1 CPU).
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch

# The sibling benchmarks (this script's directory is on sys.path when it runs).
from data_throughput import load_arrays
from student_throughput import (
    add_common_arguments,
    benchmark_config,
    build_teacher,
    epoch_figures,
    machine,
    plain_history,
    prepare_dataset,
    run_and_report,
    run_transfer_stage,
    save_teacher,
    setup_figures,
    teacher_outputs,
    timed_fit,
    worker_torch_threads,
)
from torch import nn

from kdray.config import Config
from kdray.data import read_split
from kdray.data.shards import DatasetManifest
from kdray.distill.student import student_loss, student_spec
from kdray.distill.transfer import read_transfer, transfer_rows
from kdray.evaluation.inference import ModelRef, map_logits
from kdray.runtime.storage import Storage
from kdray.runtime.train import TEACHER_LOGITS, FitSpec


def comparison(cache_seconds: float, cached_seconds: float, recomputed_seconds: float) -> dict[str, float]:
    """The speedup of caching, with and without its one-off cost counted."""
    return {"cache_seconds": cache_seconds, "cached_seconds": cached_seconds,
            "recomputed_seconds": recomputed_seconds, "speedup": recomputed_seconds / cached_seconds,
            "speedup_with_cache": recomputed_seconds / (cached_seconds + cache_seconds)}


def plain_comparison(spec: FitSpec, teacher: nn.Module, dataset: str) -> dict[str, Any]:
    """Both ways as plain in-process loops over the training rows held in memory."""
    x, y = load_arrays(Storage(dataset))
    started = time.perf_counter()
    logits = teacher_outputs(teacher, x)
    cache_seconds = time.perf_counter() - started
    cached = epoch_figures(plain_history(spec, {"x": x, "y": y, TEACHER_LOGITS: logits}))
    recomputed = epoch_figures(plain_history(spec, {"x": x, "y": y}, teacher))
    return {**comparison(cache_seconds, cached["epoch_seconds"], recomputed["epoch_seconds"]),
            "cached_rows_per_second": cached["rows_per_second"],
            "recomputed_rows_per_second": recomputed["rows_per_second"]}


def kdray_comparison(config: Config, run: Storage, spec: FitSpec, teacher: ModelRef, dataset: str,
                     manifest: DatasetManifest) -> dict[str, Any]:
    """Both ways through `kdray.runtime.train.fit`: cached transfer shards, or the teacher streamed each epoch."""
    transfer, cache_seconds = run_transfer_stage(config, run, dataset, teacher)
    validation = read_split(Storage(dataset), "validation", manifest)
    cached, cached_wall = timed_fit(spec, read_transfer(transfer), validation, config, run, "cached")
    # What the transfer stage writes, left lazy: Ray Data re-runs the teacher in every epoch.
    streamed = map_logits(transfer_rows(config.distill.transfer, dataset), teacher, output_column=TEACHER_LOGITS)
    recomputed, recomputed_wall = timed_fit(spec, streamed, validation, config, run, "recomputed")
    figures = comparison(cache_seconds, epoch_figures(cached.history)["epoch_seconds"],
                         epoch_figures(recomputed.history)["epoch_seconds"])
    return {**figures, "cached_wall_seconds": cached_wall, "recomputed_wall_seconds": recomputed_wall}


def measure(config: Config, run: Storage, through_kdray: bool) -> dict[str, Any]:
    threads = worker_torch_threads(config.resources.cpus_per_worker)
    torch.set_num_threads(threads)
    dataset, manifest = prepare_dataset(config, run)
    teacher, teacher_spec = build_teacher(config, manifest)
    spec = student_spec(config, manifest.feature_shape, manifest.num_classes, student_loss(config))
    figures = {"benchmark": "logit_cache", "machine": machine(),
               "setup": setup_figures(config, spec, teacher_spec, threads),
               "plain": plain_comparison(spec, teacher, dataset)}
    if through_kdray:
        figures["kdray"] = kdray_comparison(config, run, spec, save_teacher(run, teacher, teacher_spec), dataset,
                                            manifest)
    return figures


def print_results(figures: dict[str, Any]) -> None:
    epochs = figures["setup"]["epochs"]
    print(f"\n{'':24}{'cache (once)':>14}{f'{epochs} ep. cached':>16}{f'{epochs} ep. recomputed':>20}"
          f"{'speedup':>10}{'incl. cache':>13}")
    for name, label in (("plain", "plain PyTorch"), ("kdray", "kdray fit")):
        if name in figures:
            f = figures[name]
            print(f"{label:24}{f['cache_seconds']:>12.1f} s{f['cached_seconds']:>14.1f} s"
                  f"{f['recomputed_seconds']:>18.1f} s{f['speedup']:>9.2f}x{f['speedup_with_cache']:>12.2f}x")
    if "kdray" in figures:
        k = figures["kdray"]
        print(f"\nkdray wall time with Ray Train start-up: cached {k['cached_wall_seconds']:.1f} s, "
              f"recomputed {k['recomputed_wall_seconds']:.1f} s; kdray's cache is the transfer stage (Parquet), "
              f"its recomputing run streams the teacher's actor on a CPU of its own")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_arguments(parser)
    parser.add_argument("--kdray", action="store_true", help="also compare both ways through kdray.runtime.train.fit")
    args = parser.parse_args()
    # With --kdray the recomputing run holds the worker's CPU and the teacher actor's at once, plus Ray Data's reads.
    config = benchmark_config(args, ray_cpus=3 if args.kdray else 2)
    run_and_report(config, lambda config, run: measure(config, run, args.kdray), print_results, args.json)


if __name__ == "__main__":
    main()
