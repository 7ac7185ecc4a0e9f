"""Sweep throughput and Ray Tune's overhead: the same student trials run through Tune (ASHA, event
files, checkpoints) and directly (`kdray.runtime.train.fit`, one after another), in one run.

    python benchmarks/sweep_overhead.py [--rows 24000] [--temperatures 2 4] [--hard-weights 0.1 0.5]
                                        [--epochs 3] [--concurrent 2] [--json PATH]

Steps: the embedded default config (synthetic data, shrunk with --rows) runs data -> teacher ->
transfer once; then
1. Tune, one trial at a time, with ASHA's grace period equal to the budget (so it stops no trial
   and both ways do identical work): Tune's overhead = Tune wall time / direct wall time;
2. the same trials called directly, one after another;
3. Tune with --concurrent trials at once and ASHA at its configured grace period: trials per hour,
   the figure a user of this machine sees for a sweep of this size.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import tempfile
import time

import ray
import torch

from kdray.config import load_config
from kdray.data import read_manifest
from kdray.pipeline import run_pipeline, stages_for
from kdray.runtime.stage import read_stage_manifest
from kdray.runtime.storage import Storage
from kdray.runtime.train import fit
from kdray.sweep import TRIAL_WORKER_CPUS, TrialSetup, run_tune, sweep_spec, trial_datasets, trial_spec


def prepared_run(root: str, rows: int):
    """Data, teacher and transfer of the default config with `rows` training rows, all of them in
    the transfer set (the default's 5% would leave trials too little to time)."""
    config = load_config(overrides={"data": {"synth": {"rows": rows}}, "distill": {"transfer": {"fraction": 1.0}},
                                    "storage": {"storage_path": root, "run_name": "bench"}})
    run = Storage(root).child("bench")
    run_pipeline(stages_for("transfer"), config, run, progress=False, log=lambda _: None)
    return config, run


def trial_setup(config, run: Storage, epochs: int, storage: str) -> TrialSetup:
    dataset = read_stage_manifest(run, "data")["outputs"]["dataset"]
    manifest = read_manifest(Storage(dataset))
    config = config.model_copy(update={"sweep": config.sweep.model_copy(update={"max_epochs": epochs})})
    return TrialSetup(sweep_spec(config, manifest.feature_shape, manifest.num_classes),
                      read_stage_manifest(run, "transfer")["outputs"]["transfer"], dataset,
                      config.resources.model_copy(update={"cpus_per_worker": TRIAL_WORKER_CPUS}), storage)


def timed(function) -> float:
    started = time.perf_counter()
    function()
    return time.perf_counter() - started


def direct_trials(setup: TrialSetup, grid: list[dict]) -> None:
    for index, params in enumerate(grid):
        fit(trial_spec(setup.base, params), trial_datasets(setup), setup.resources, setup.storage, f"direct-{index}",
            num_workers=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=24_000)
    parser.add_argument("--temperatures", type=float, nargs="+", default=[2.0, 4.0])
    parser.add_argument("--hard-weights", type=float, nargs="+", default=[0.1, 0.5])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--grace-period", type=int, default=1)
    parser.add_argument("--concurrent", type=int, default=2)
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args()

    ray.init(address="local", include_dashboard=True, dashboard_host="127.0.0.1", log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    grid = [{"temperature": t, "hard_weight": w} for t, w in itertools.product(args.temperatures, args.hard_weights)]
    with tempfile.TemporaryDirectory() as root:
        config, run = prepared_run(root, args.rows)
        setup = trial_setup(config, run, args.epochs, os.path.join(root, "trials"))
        sweep = config.sweep.model_copy(update={"temperatures": args.temperatures, "hard_weights": args.hard_weights,
                                                "max_epochs": args.epochs, "grace_period": args.epochs})
        tune_serial = timed(lambda: run_tune(setup, sweep, 1, run.child("tune-serial")))
        direct = timed(lambda: direct_trials(setup, grid))
        asha = sweep.model_copy(update={"grace_period": min(args.grace_period, args.epochs)})
        tune_concurrent = timed(lambda: run_tune(setup, asha, args.concurrent, run.child("tune-concurrent")))
    ray.shutdown()
    figures = {"trials": len(grid), "epochs": args.epochs, "rows": args.rows,
               "direct_seconds": round(direct, 1), "tune_serial_seconds": round(tune_serial, 1),
               "tune_overhead": round(tune_serial / direct, 3), "tune_concurrent_seconds": round(tune_concurrent, 1),
               "concurrent": args.concurrent, "trials_per_hour": round(len(grid) * 3600 / tune_concurrent, 1),
               "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                          f"torch {torch.__version__}, ray {ray.__version__}"}
    print(f"machine: {figures['machine']}")
    print(f"{len(grid)} trials x {args.epochs} epochs on {args.rows} rows (default student)")
    print(f"direct, one after another : {direct:8.1f} s")
    print(f"Tune, one at a time       : {tune_serial:8.1f} s  overhead x{tune_serial / direct:.3f}")
    print(f"Tune, {args.concurrent} at once + ASHA   : {tune_concurrent:8.1f} s  {figures['trials_per_hour']} trials/hour")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(figures, handle, indent=2)


if __name__ == "__main__":
    main()
