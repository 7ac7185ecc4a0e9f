"""Generalist + specialists (paper, section 5): the issue's figures for one run config.

    python benchmarks/specialists.py [CONFIG] [--set KEY=VALUE ...] [--rows N] [--classes C]
        [--specialists S] [--epochs E] [--storage-path DIR] [--run-name NAME] [--json PATH]

Runs data -> teacher (the generalist) -> clustering -> specialists of CONFIG (default
jobs/specialists.yaml) through kdray's runner, reusing stages already up to date in the run
directory, then reports:

- accuracy, read from what the stages wrote: the relative top-1 change of generalist +
  specialists over the generalist on the test split, overall and by the number of specialists
  covering the true class (the specialists stage's tables.json, the paper's Tables 3 and 4;
  target >= +4.4%), and the adjusted Rand index of the subsets found against the planted groups
  (the clustering stage's summary; target >= 0.95);
- parallel efficiency: the same S specialists trained again from the same clustering output into
  scratch directories, once one at a time and once as many at once as the cluster holds:
  serial wall time / (concurrent wall time x cores used); target >= 0.8 (--timed-specialists N
  times the first N only). A specialist's Ray Data reads run in tasks beside its actor, so even
  the serial run keeps a second core busy while it reads: on a small machine the figure
  understates how well the training itself parallelises;
- combination cost, in this process with --threads torch threads on test rows: ms per 1,000
  examples for the generalist alone, for the KL combination alone (kdray.specialists.combine.combine) and for
  the whole combined prediction (generalist + active specialists + combination).

--rows, --classes, --specialists and --epochs shrink a run (validation and test rows shrink with
--rows; on synthetic data --specialists also sets the planted groups, one per specialist); --set
takes any config key, as `kdray run` does, and wins over the flags.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import ray
import torch

from kdray.config import Config, load_config, parse_overrides
from kdray.data import read_split
from kdray.evaluation.inference import LogitsPredictor, ModelRef, features
from kdray.pipeline import run_pipeline, stages_for
from kdray.preflight import check_config
from kdray.runtime.session import ray_session
from kdray.runtime.storage import Storage
from kdray.runtime.train import use_gpu
from kdray.specialists.actors import concurrent_specialists, specialist_jobs, train_specialists
from kdray.specialists.clustering import CLASS_INDEX, INDEX_MANIFEST, SUBSETS
from kdray.specialists.combine import combine, select_active_specialists
from kdray.specialists.combined import COMBINED, CombinedModel, SpecialistCombiner
from kdray.specialists.tables import TABLES, format_tables

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "jobs" / "specialists.yaml"
SCRATCH = "_benchmark-specialists"  # under the run directory; deleted after timing
TARGETS = {"relative_change": 0.044, "ari": 0.95, "parallel_efficiency": 0.8}


# ------------------------------------------------------------------------------------ config
def shrink_overrides(args: argparse.Namespace, base: Config) -> list[str]:
    """The size flags as `key=value` overrides of `base`."""
    pairs = []
    synth = base.data.synth
    if (args.rows or args.classes) and base.data.source != "synth":
        raise SystemExit(f"--rows and --classes size synthetic data; {args.config} reads {base.data.source!r}")
    if args.rows:
        scale = args.rows / synth.rows
        pairs += [f"data.synth.rows={args.rows}",
                  f"data.synth.validation_rows={max(1, round(synth.validation_rows * scale))}",
                  f"data.synth.test_rows={max(1, round(synth.test_rows * scale))}",
                  f"data.synth.shards={min(synth.shards, args.rows)}"]
    if args.classes:
        pairs.append(f"data.synth.classes={args.classes}")
    if args.specialists:
        pairs.append(f"clustering.num_specialists={args.specialists}")
        if base.data.source == "synth":
            pairs.append(f"data.synth.groups={args.specialists}")
    if synth.bridges and (args.classes or args.specialists):
        # As many bridges per group as the job has, while every group keeps a class of its own.
        classes, groups = args.classes or synth.classes, args.specialists or synth.groups
        pairs.append(f"data.synth.bridges={max(0, min(round(synth.bridges * groups / synth.groups), classes - groups))}")
    if args.epochs:
        pairs += [f"{key}.epochs={args.epochs}" for key in ("teacher.train", "specialists.train",
                                                             "specialists.distill_train")]
    return pairs


def benchmark_config(args: argparse.Namespace) -> Config:
    base = load_config(args.config)
    pairs = shrink_overrides(args, base) + (args.set or [])
    pairs += [f"storage.{key}={value}" for key, value in (("storage_path", args.storage_path),
                                                          ("run_name", args.run_name)) if value]
    config = load_config(args.config, parse_overrides(pairs))
    if not config.clustering.enabled:
        raise SystemExit(f"{args.config}: clustering.enabled is false, so no specialists would be trained")
    return config


# ------------------------------------------------------------------------------------ the run
def run_stages(config: Config, run: Storage, progress: bool) -> dict[str, dict]:
    """data -> teacher -> clustering -> specialists through the runner; their manifests by name."""
    outcomes = run_pipeline(stages_for("specialists"), config, run, progress=progress)
    return {outcome.name: outcome.manifest for outcome in outcomes}


def accuracy_figures(run: Storage, manifests: dict[str, dict]) -> dict:
    tables = run.read_json("specialists", TABLES)
    overall = tables["overall"]
    return {"relative_change": overall["relative_change"],
            "generalist_accuracy": overall["generalist_accuracy"],
            "combined_accuracy": overall["combined_accuracy"],
            "distilled_accuracy": overall.get("distilled_accuracy"),
            "gain_kept": overall.get("gain_kept"),
            "by_covering": {str(row["covering"]): {"rows": row["rows"], "relative_change": row["relative_change"]}
                            for row in tables["by_covering"]},
            "ari": manifests["clustering"]["summary"]["ari"],
            "subset_sizes": manifests["clustering"]["summary"]["sizes"],
            "tables": tables}


# ------------------------------------------------------------------------------------ parallel efficiency
def threads_per_specialist(config: Config) -> int:
    """Torch threads in one specialist actor: Ray sets OMP_NUM_THREADS to its whole CPUs, at least 1."""
    return max(1, math.floor(config.resources.specialist_cpus))


def cores_used(specialists: int, threads: int, local: bool) -> int:
    """Cores `specialists` actors of `threads` threads each can keep busy: bounded by the cluster's
    CPUs and, on a local Ray, by the machine's cores (its logical CPUs may be set above them)."""
    bounds = [specialists * threads, int(ray.cluster_resources().get("CPU", 1))]
    if local:
        bounds.append(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count())
    return max(1, min(bounds))


def timed_training(config: Config, manifests: dict[str, dict], subsets: list[list[int]], scratch: Storage,
                   max_concurrent: int | None) -> float:
    """Wall seconds to train `subsets`' specialists from scratch into `scratch`."""
    clustering = Storage(manifests["clustering"]["outputs"]["clustering"])
    index = clustering.child(CLASS_INDEX)
    scratch.delete()
    jobs = specialist_jobs(config, subsets, index.read_json(INDEX_MANIFEST)["rows"], index.location,
                           ModelRef(**manifests["teacher"]["outputs"]["teacher"]),
                           manifests["data"]["outputs"]["dataset"], scratch.child("output"), scratch.child("work"))
    started = time.perf_counter()
    train_specialists(jobs, config.resources, max_concurrent)
    return time.perf_counter() - started


def parallel_efficiency(config: Config, manifests: dict[str, dict], scratch: Storage, count: int | None,
                        local: bool) -> dict:
    subsets = Storage(manifests["clustering"]["outputs"]["clustering"]).read_json(SUBSETS)["subsets"][:count]
    limit = config.specialists.max_concurrent
    gpus = config.resources.specialist_gpus if use_gpu(config.resources) else 0
    width = concurrent_specialists(config.resources, gpus, limit)
    serial = timed_training(config, manifests, subsets, scratch.child("serial"), 1)
    concurrent = timed_training(config, manifests, subsets, scratch.child("concurrent"), limit)
    scratch.delete()
    at_once, threads = min(width, len(subsets)), threads_per_specialist(config)
    # Cores relative to the serial run's (one specialist's threads): 1 for fractional specialist_cpus.
    cores = cores_used(at_once, threads, local) / cores_used(1, threads, local)
    return {"specialists": len(subsets), "at_once": at_once, "cores": cores,
            "serial_seconds": serial, "concurrent_seconds": concurrent,
            "parallel_efficiency": serial / (concurrent * cores)}


# ------------------------------------------------------------------------------------ combination cost
def test_features(dataset: str, rows: int) -> torch.Tensor:
    batch = read_split(Storage(dataset), "test").select_columns(["x"]).take_batch(rows, batch_format="pyarrow")
    return torch.from_numpy(features(batch).copy())


@torch.no_grad()
def combination_inputs(combiner: SpecialistCombiner, generalist: LogitsPredictor, x: torch.Tensor) -> tuple:
    """The arguments of kdray.specialists.combine.combine for the rows x, built densely: every specialist runs on
    every row, and the columns of specialists active on no row are dropped (combine weighs each
    specialist by `active`, so the values of inactive ones never count)."""
    p_g = torch.softmax(torch.from_numpy(generalist.logits(x.numpy())).double(), -1)
    active = select_active_specialists(p_g, combiner.membership, combiner.top_n)
    probs = [torch.softmax(net(x).double(), -1) for net in combiner.specialists]
    specialist_in = torch.zeros(len(x), len(probs), p_g.shape[1], dtype=torch.float64)
    for m, (p, classes) in enumerate(zip(probs, combiner.classes)):
        specialist_in[:, m, classes] = p[:, :-1]
    dustbin = torch.stack([p[:, -1] for p in probs], 1)
    used = active.any(0)
    return p_g, specialist_in[:, used], dustbin[:, used], combiner.membership[used], active[:, used]


def best_ms_per_1000(step, batches: list, rows: int, repeats: int) -> float:
    """Fastest of `repeats` passes of step over batches (after one warm-up batch), ms per 1,000 rows:
    the least disturbed pass on a shared machine."""
    step(batches[0])
    best = math.inf
    for _ in range(repeats):
        started = time.perf_counter()
        for batch in batches:
            step(batch)
        best = min(best, time.perf_counter() - started)
    return best / rows * 1e6


def combination_cost(manifests: dict[str, dict], rows: int, batch_size: int, repeats: int) -> dict:
    model = CombinedModel.from_entry(manifests["specialists"]["outputs"]["models"][COMBINED])
    combiner, generalist = SpecialistCombiner(model), LogitsPredictor(model.generalist)
    x = test_features(manifests["data"]["outputs"]["dataset"], rows)
    batches = list(x.split(batch_size))
    inputs = [combination_inputs(combiner, generalist, batch) for batch in batches]
    # The dense inputs must give the combiner's own answer, or the timing below measures something else.
    log_q = combiner.combined(batches[0])[0]
    gap = (combine(*inputs[0]).clamp(min=np.finfo(np.float32).tiny).log().float() - log_q).abs().max().item()
    if gap > 1e-3:
        raise RuntimeError(f"dense combination inputs disagree with SpecialistCombiner (max |log q| gap {gap:.2e})")
    timings = {"generalist_ms": best_ms_per_1000(lambda b: generalist.logits(b.numpy()), batches, len(x), repeats),
               "combine_ms": best_ms_per_1000(lambda a: combine(*a), inputs, len(x), repeats),
               "combined_ms": best_ms_per_1000(combiner.combined, batches, len(x), repeats)}
    active = sum(int(a[4].sum()) for a in inputs) / len(x)
    return {**timings, "overhead": timings["combined_ms"] / timings["generalist_ms"], "rows": len(x),
            "batch_size": batch_size, "active_per_row": active, "threads": torch.get_num_threads()}


# ------------------------------------------------------------------------------------ output
def machine_info() -> dict:
    try:
        with open("/proc/cpuinfo") as handle:
            cpu = next((line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")), None)
    except OSError:
        cpu = None
    return {"cpu": cpu or platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "ray_cpus": ray.cluster_resources().get("CPU"), "ray_gpus": ray.cluster_resources().get("GPU", 0),
            "torch": torch.__version__, "ray": ray.__version__, "python": platform.python_version()}


def _signed(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:+.2f}%"


def _target_row(name: str, value: float | None, text: str, key: str) -> tuple[str, str, str, str]:
    """A figure with its issue target: (name, value, ">= target", "yes"/"NO"/"n/a")."""
    target = TARGETS[key]
    shown = _signed(target) if key == "relative_change" else f"{target:g}"
    met = "n/a" if value is None else ("yes" if value >= target else "NO")
    return name, text, f">= {shown}", met


def figure_rows(figures: dict) -> list[tuple[str, str, str, str]]:
    accuracy, parallel, cost = figures["accuracy"], figures["parallel"], figures["combination"]
    change, ari, efficiency = accuracy["relative_change"], accuracy["ari"], parallel["parallel_efficiency"]
    rows = [_target_row("relative top-1 change, all test rows", change, _signed(change), "relative_change")]
    rows += [(f"  true class covered by {k} specialist(s) ({row['rows']} rows)", _signed(row["relative_change"]),
              "", "") for k, row in accuracy["by_covering"].items()]
    rows.append(_target_row("adjusted Rand index, subsets vs planted groups", ari,
                            "n/a" if ari is None else f"{ari:.4f}", "ari"))
    timing = (f"{parallel['specialists']} specialists, {parallel['at_once']} at once, {parallel['cores']:g} cores; "
              f"{parallel['serial_seconds']:.1f} s serial, {parallel['concurrent_seconds']:.1f} s concurrent")
    rows.append(_target_row(f"parallel efficiency ({timing})", efficiency, f"{efficiency:.3f}", "parallel_efficiency"))
    active = f"{cost['active_per_row']:.2f} active/row"
    rows += [("generalist alone, ms per 1,000 examples", f"{cost['generalist_ms']:.2f}", "", ""),
             ("KL combination alone, ms per 1,000 examples", f"{cost['combine_ms']:.2f}", "", ""),
             (f"generalist + specialists + combination, ms per 1,000 ({active})", f"{cost['combined_ms']:.2f}", "", ""),
             ("overhead over the generalist alone", f"{cost['overhead']:.2f}x", "", "")]
    return rows


def print_report(figures: dict) -> None:
    machine = figures["machine"]
    print(f"\nmachine: {machine['cpu']}, {machine['cores']} cores (Ray: {machine['ray_cpus']:g} CPUs, "
          f"{machine['ray_gpus']:g} GPUs), torch {machine['torch']}, ray {machine['ray']}, python {machine['python']}")
    print(f"run: {figures['run']}\n")
    print(format_tables(figures["accuracy"]["tables"]))
    rows = figure_rows(figures)
    width = max(len(row[0]) for row in rows) + 2
    print(f"{'figure':<{width}}{'value':>10}{'target':>12}{'met':>6}")
    print("-" * (width + 28))
    for name, value, target, met in rows:
        print(f"{name:<{width}}{value:>10}{target:>12}{met:>6}")


# ------------------------------------------------------------------------------------ main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", nargs="?", default=str(DEFAULT_CONFIG), help="run config (default: %(default)s)")
    parser.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config value (repeatable)")
    parser.add_argument("--rows", type=int, help="training rows of synthetic data (validation and test in proportion)")
    parser.add_argument("--classes", type=int, help="classes of synthetic data")
    parser.add_argument("--specialists", type=int, help="clustering.num_specialists (and synthetic groups)")
    parser.add_argument("--epochs", type=int, help="epochs of the generalist, the specialists and distill_back")
    parser.add_argument("--storage-path", help="where the run is stored (default: the config's)")
    parser.add_argument("--run-name", help="the run's directory under the storage path (default: the config's)")
    parser.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a local in-process Ray)")
    parser.add_argument("--timed-specialists", type=int, help="time only the first N specialists (default: all)")
    parser.add_argument("--combine-rows", type=int, default=8192, help="test rows timed in process")
    parser.add_argument("--batch-size", type=int, default=2048, help="rows per combined batch (the stage's)")
    parser.add_argument("--repeats", type=int, default=5, help="timed passes; the fastest counts")
    parser.add_argument("--threads", type=int, default=1, help="torch threads for the in-process timing")
    parser.add_argument("--progress", action="store_true", help="progress bars")
    parser.add_argument("--json", metavar="PATH", help="write the figures as JSON")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    config = benchmark_config(args)
    check_config(config)
    run = Storage(config.storage.storage_path).child(config.storage.run_name)
    run.check_writable()
    torch.set_num_threads(args.threads)
    local = not (args.address or os.environ.get("RAY_ADDRESS"))
    with ray_session(args.address, config.resources.local_num_cpus, progress=args.progress):
        manifests = run_stages(config, run, args.progress)
        figures = {"run": run.location, "config": args.config, "overrides": args.set or [],
                   "accuracy": accuracy_figures(run, manifests),
                   "parallel": parallel_efficiency(config, manifests, run.child(SCRATCH), args.timed_specialists,
                                                   local),
                   "combination": combination_cost(manifests, args.combine_rows, args.batch_size, args.repeats),
                   "machine": machine_info(), "targets": TARGETS}
    print_report(figures)
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
