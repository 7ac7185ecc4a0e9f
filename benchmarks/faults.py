"""Faults (issue 6): each one injected into a small synthetic run, and what the run made of it.

    python benchmarks/faults.py [--rows 2000] [--epochs 3] [--cpus 2] [--dir DIR] [--keep] [--json PATH | --out PATH]

One config (synthetic data with --rows training rows, 8 classes in 4 confusable groups; an MLP
teacher and a smaller student, --epochs each) runs uninterrupted once, in this process, as the
reference. Then each fault, measured from what the run wrote:

- a Ray Train worker killed mid-epoch: the teacher's training run again through `kdray.runtime.train.fit`
  with KDRAY_FAIL_AT_EPOCH=1 (rank 0 exits in the middle of epoch 2) and a callback that logs every
  report and failure Ray Train sees (kdray's runs poll their workers every
  `kdray.runtime.train.TRAIN_POLL_S`: at Ray Train's default 2 s the worker often dies before Ray Train has
  collected epoch 1's report, and the injected fault then strikes again on every retry);
- a specialist actor killed: one specialist (clustering on the reference's teacher) trained by
  `train_specialists` with KDRAY_FAIL_AT_EPOCH=1;
- the driver killed inside a stage and between stages: `kdray run` as a child process SIGKILLed
  once the teacher has checkpointed an epoch, run again and SIGKILLed once the transfer stage's
  manifest is written, run a third time to the end (`tests/fault_harness.py`'s `kill_inside_and_between`);
- a truncated shard: a copy of the dataset with 100 bytes cut off one shard, run through the data
  stage;
- an unwritable storage path: `kdray run` with a storage path under a regular file.

Columns: injected (what was done, and the evidence it happened), survived (the run finished; for
the last two: it refused before any work, naming the problem), rows lost (rows each training epoch,
the transfer set and the evaluation should have seen, less those they saw; target 0), work
recomputed (target: only the interrupted step), and whether the result equals the reference.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import ray
import torch
import yaml

from kdray.cli import main as kdray_main
from kdray.config import load_config
from kdray.data import read_manifest, read_split, sample_rows
from kdray.distill.teacher import member_name, member_spec
from kdray.evaluation.evaluate import RESULTS
from kdray.evaluation.inference import ModelRef
from kdray.pipeline import pipeline_stages, run_pipeline, stages_for
from kdray.runtime.artifacts import save_bundle
from kdray.runtime.stage import MANIFEST, read_stage_manifest
from kdray.runtime.storage import Storage
from kdray.runtime.train import fit
from kdray.specialists.actors import HISTORY, epoch_rows, specialist_jobs, train_specialists
from kdray.specialists.clustering import CLASS_INDEX, INDEX_MANIFEST, SUBSETS

# The fault and /proc harness is shared with the tests, which hold it (it ships in no package).
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from fault_harness import (  # noqa: E402
    differences,
    failing_at_epoch,
    kill_inside_and_between,
    read_events,
    stage_lines,
    train_event_recorder,
    weight_differences,
    without_timing,
)

FAULT_EPOCH = 1  # workers and actors die in the middle of their second epoch


def bench_config(rows: int, epochs: int, cpus: int) -> dict:
    train = {"epochs": epochs, "batch_size": 64, "lr": 0.01}
    return {
        "data": {"source": "synth", "synth": {"rows": rows, "validation_rows": rows // 5, "test_rows": rows // 5,
                                              "classes": 8, "groups": 4, "dim": 16, "shards": 2}},
        "teacher": {"model": {"name": "mlp", "hidden": [64]}, "train": train},
        "distill": {"student": {"name": "mlp", "hidden": [16]}, "train": train, "temperature": 2.0,
                    "baseline": False},
        # Enabled only for the specialist fault (in this process), so `kdray run` skips them.
        "clustering": {"num_specialists": 4, "min_size": 2, "max_size": 2},
        "specialists": {"train": {"epochs": 2, "batch_size": 64, "lr": 0.003}},
        # Every epoch streams (as data too big to cache would): the driver kill lands mid-stage.
        "resources": {"cpus_per_worker": 0.5, "local_num_cpus": cpus, "epoch_cache_mb": 0},
    }


def same_run(actual: Storage, expected: Storage, bundles: tuple[tuple[str, str], ...]) -> bool:
    """Bitwise equal weights and equal histories (less timings) of `bundles` (stage, name) in two
    runs, and, when both were evaluated, equal results."""
    for stage, bundle in bundles:
        if weight_differences(actual.child(stage), expected.child(stage), bundle) or differences(
                *(without_timing(run.read_json(stage, bundle, "history.json")) for run in (actual, expected))):
            return False
    if actual.exists(RESULTS) and expected.exists(RESULTS):
        return not differences(actual.read_json(RESULTS)["models"], expected.read_json(RESULTS)["models"])
    return True


def _epochs(first: int, last: int) -> str:
    return f"epoch {first}" if first == last else f"epochs {first}-{last}"


# ------------------------------------------------------------------------------------ worker killed
def worker_fault(config, clean: Storage, scratch: Path) -> dict:
    """The reference teacher's training again, its rank-0 worker killed mid-epoch 2."""
    dataset = Storage(read_stage_manifest(clean, "data")["outputs"]["dataset"])
    manifest = read_manifest(dataset)
    spec = member_spec(config, manifest.feature_shape, manifest.num_classes, 0)
    train = sample_rows(read_split(dataset, "train", manifest), config.teacher.member_data_fraction, seed=0)
    events_path = str(scratch / "train-events.jsonl")
    started = time.perf_counter()
    with failing_at_epoch(FAULT_EPOCH):
        result = fit(spec, {"train": train, "validation": read_split(dataset, "validation", manifest)},
                     config.resources, str(scratch / "train"), "worker-fault",
                     callbacks=[train_event_recorder(events_path)])
    seconds = time.perf_counter() - started
    events = read_events(events_path)
    failures = [index for index, event in enumerate(events) if event["event"] == "failure"]
    reports = [event["epoch"] for event in events if event["event"] == "report"]
    epochs = config.teacher.train.epochs
    # The epoch the worker died in restarts from the last checkpoint reported before the failure.
    before = events[:failures[0]] if failures else []
    restored = max((event["epoch"] for event in before if event["event"] == "report"), default=0)
    rerun = sorted(epoch for epoch in set(reports) if reports.count(epoch) > 1)
    resumed = Storage(str(scratch / "worker-fault"))
    save_bundle(resumed.child("teacher"), member_name(0), spec.model, result.state_dict)
    resumed.write_json(result.history, "teacher", member_name(0), "history.json")
    return {
        "fault": "Ray Train worker killed mid-epoch",
        "injected": f"rank 0 os._exit in epoch {FAULT_EPOCH + 1} of {epochs}; Ray Train saw "
                    f"{len(failures)} failure(s)" + (f" ({events[failures[0]]['error']})" if failures else ""),
        "survived": [h["epoch"] for h in result.history] == list(range(1, epochs + 1)),
        "rows_lost": manifest.rows("train") * epochs - int(sum(h["rows"] for h in result.history)),
        "recomputed": (f"epoch {restored + 1} of {epochs} restarted from the epoch-{restored} checkpoint; "
                       if failures else "no failure seen; ")
                      + (f"finished epochs reported again: {rerun}" if rerun else "no finished epoch re-ran")
                      + f" ({len(reports)} reports for {epochs} epochs)",
        "same_as_uninterrupted": same_run(resumed, clean, (("teacher", member_name(0)),)),
        "seconds": round(seconds, 1),
        "events": events,
    }


# ------------------------------------------------------------------------------------ specialist killed
def specialist_fault(config, clean: Storage, scratch: Path) -> dict:
    """One specialist over the first subset the clustering stage finds, its actor killed mid-epoch 2."""
    clustered = config.model_copy(update={"clustering": config.clustering.model_copy(update={"enabled": True})})
    outcomes = run_pipeline(stages_for("clustering"), clustered, clean, progress=False, log=lambda _: None)
    manifests = {o.name: o.manifest for o in outcomes}
    clustering = Storage(manifests["clustering"]["outputs"]["clustering"])
    subsets = clustering.read_json(SUBSETS)["subsets"]
    index = clustering.child(CLASS_INDEX)
    job = specialist_jobs(clustered, subsets[:1], index.read_json(INDEX_MANIFEST)["rows"], index.location,
                          ModelRef(**manifests["teacher"]["outputs"]["teacher"]),
                          manifests["data"]["outputs"]["dataset"], Storage(str(scratch / "specialists")),
                          Storage(str(scratch / "specialists-work")))[0]
    epochs = job.train.epochs
    started = time.perf_counter()
    with failing_at_epoch(FAULT_EPOCH):
        result = train_specialists([job], clustered.resources, max_concurrent=1)[job.name]
    seconds = time.perf_counter() - started
    history = Storage(job.output).read_json(job.name, HISTORY)
    expected = sum(epoch_rows(job, epoch).count() for epoch in range(epochs))  # (its seed only orders rows)
    resumed = result.get("resumed_from_epoch")  # above 0 only after a restart: a first attempt starts at 0
    return {
        "fault": "specialist actor killed",
        "injected": f"actor os._exit in epoch {FAULT_EPOCH + 1} of {epochs} (classes {list(job.classes)}); "
                    + ("it resumed from its checkpoint, so it died" if resumed else "it did NOT die"),
        "survived": Storage(job.output).exists(job.name, "model.json")
        and [h["epoch"] for h in history] == list(range(1, epochs + 1)),
        "rows_lost": expected - int(sum(h["rows"] for h in history)),
        "recomputed": f"restarted actor resumed after epoch {resumed} of {epochs} (its checkpoint); "
                      f"{_epochs(resumed + 1, epochs)} trained after the restart",
        "same_as_uninterrupted": None,
        "seconds": round(seconds, 1),
    }


# ------------------------------------------------------------------------------------ driver killed
def rows_short(run: Storage) -> dict[str, int]:
    """Rows each step of a finished run should have seen, less those it saw (0 everywhere: none lost)."""
    data = run.read_json("data", MANIFEST)["summary"]["rows"]
    transfer = run.read_json("transfer", MANIFEST)["summary"]["rows"]
    short = {"transfer set": data["train"] - transfer}
    for stage, bundle, expected in (("teacher", "member-00", data["train"]), ("student", "student", transfer)):
        for entry in run.read_json(stage, bundle, "history.json"):
            short[f"{stage} epoch {int(entry['epoch'])}"] = expected - int(entry["rows"])
    for name, model in run.read_json(RESULTS)["models"].items():
        short[f"evaluate {name}"] = data["test"] - model["test"]["rows"]
    return short


def driver_faults(config_path: str, storage: str, clean: Storage, scratch: Path, epochs: int) -> list[dict]:
    started = time.perf_counter()
    sequence = kill_inside_and_between(config_path, storage, "killed", scratch, timeout=900)
    seconds = time.perf_counter() - started
    killed = Storage(storage).child("killed")
    inside, between = sequence.kills
    history = killed.read_json("teacher", "member-00", "history.json")
    restored = len(inside.restorable or [])
    kept = history[:restored] == inside.restorable  # their timings too: not trained again
    same = same_run(killed, clean, (("teacher", "member-00"), ("student", "student")))
    short = rows_short(killed)
    lost = sum(short.values())

    def ray_left(kill) -> str:
        lingering = sorted(set(kill.report.lingering.values()))
        return (f"{len(kill.report.session)} processes of its Ray; " +
                (f"{', '.join(lingering)} outlived it (killed)" if lingering else "all went with it"))

    said_2, said_3 = stage_lines(between.output), stage_lines(sequence.output)
    skipped_2 = [s for s, state in said_2.items() if state == "up to date"]
    skipped_3 = [s for s, state in said_3.items() if state == "up to date"]
    rerun_3 = [s for s in said_3 if s in between.manifests and said_3[s] != "up to date"]
    student_started = said_2.get("student") == "running"
    finished = set(sequence.manifests) >= {"evaluate", "report"}  # (a failed run raised RunFailed)
    return [{
        "fault": "driver killed inside a stage",
        "injected": f"SIGKILL {inside.seconds:.0f}s in, teacher at epoch {restored + 1} of {epochs} "
                    f"({restored} checkpointed); {ray_left(inside)}",
        "survived": finished and "teacher" not in inside.manifests,
        "rows_lost": lost,
        "recomputed": f"re-run skipped {', '.join(skipped_2) or 'nothing'}; the teacher restored "
                      f"{_epochs(1, restored)} from its checkpoint ({'kept as trained' if kept else 'CHANGED'}) "
                      f"and trained {_epochs(restored + 1, epochs)}",
        "same_as_uninterrupted": same,
        "seconds": inside.seconds,
        "sequence_seconds": round(seconds, 1),
        "rows_short": short,
        "kill": vars(inside.report),
    }, {
        "fault": "driver killed between stages",
        "injected": f"SIGKILL once transfer's manifest was written ({between.seconds:.0f}s in"
                    + (", student just started" if student_started else "") + f"); {ray_left(between)}",
        "survived": finished,
        "rows_lost": lost,
        "recomputed": f"re-run skipped {', '.join(skipped_3)}; finished stages run again: {rerun_3 or 'none'}"
                      + ("; the student stage, started, ran again from its start" if student_started else ""),
        "same_as_uninterrupted": same,
        "seconds": between.seconds,
        "sequence_seconds": round(seconds, 1),
        "kill": vars(between.report),
    }]


# ------------------------------------------------------------------------------------ refused faults
def truncated_shard(config_path: str, clean: Storage, scratch: Path) -> dict:
    """A dataset copy with 100 bytes cut off one training shard, run through the data stage."""
    dataset = Storage(read_stage_manifest(clean, "data")["outputs"]["dataset"])
    copy = scratch / "truncated-dataset"
    shutil.copytree(dataset.location, copy)
    shard = next(s for s in read_manifest(Storage(str(copy))).shards if s.split == "train")
    path = copy / shard.file
    path.write_bytes(path.read_bytes()[:-100])
    config = load_config(config_path, {"data": {"source": "parquet", "path": str(copy)},
                                       "storage": {"storage_path": str(scratch / "runs"), "run_name": "truncated"}})
    run = Storage(str(scratch / "runs")).child("truncated")
    started = time.perf_counter()
    try:
        run_pipeline(pipeline_stages(), config, run, progress=False, log=lambda _: None)
        error = None
    except Exception as caught:  # noqa: BLE001 - reported: a DatasetError naming the shard is the target
        error = f"{type(caught).__name__}: {caught}"
    seconds = time.perf_counter() - started
    manifests = [name for name in run.list() if run.exists(name, MANIFEST)]
    return {
        "fault": "truncated shard",
        "injected": f"{shard.file} cut by 100 bytes ({shard.rows} rows)",
        "survived": f"refused: {error}" if error else "NOT detected: the run went on",
        "rows_lost": 0 if error else shard.rows,
        "recomputed": f"nothing ran: stopped in the data stage after {seconds:.1f}s; stage manifests written: "
                      f"{manifests or 'none'}",
        "same_as_uninterrupted": None,
        "seconds": round(seconds, 1),
    }


def unwritable_storage(config_path: str, scratch: Path) -> dict:
    blocker = scratch / "a-file"
    blocker.write_text("")
    stderr = io.StringIO()
    started = time.perf_counter()
    with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
        code = kdray_main(["run", config_path, "--storage-path", str(blocker / "runs"), "--run-name", "x",
                           "--no-progress"])
    seconds = time.perf_counter() - started
    message = stderr.getvalue().strip().splitlines()[-1] if stderr.getvalue().strip() else ""
    return {
        "fault": "unwritable storage path",
        "injected": f"--storage-path under a regular file ({blocker / 'runs'})",
        "survived": f"refused: exit {code}, {message!r}",
        "rows_lost": 0,
        "recomputed": f"nothing ran: refused after {seconds:.2f}s, before Ray started; nothing written "
                      f"({'the file is unchanged' if blocker.read_text() == '' else 'the file CHANGED'})",
        "same_as_uninterrupted": None,
        "seconds": round(seconds, 2),
    }


# ------------------------------------------------------------------------------------ report
def print_table(rows: list[dict]) -> None:
    def text(value) -> str:
        return {True: "yes", False: "NO", None: "-"}.get(value, str(value)) if isinstance(value, (bool, type(None))) \
            else str(value)

    columns = ("fault", "injected", "survived", "rows_lost", "recomputed", "same_as_uninterrupted")
    print("\n| " + " | ".join(c.replace("_", " ") for c in columns) + " |")
    print("|" + "---|" * len(columns))
    for row in rows:
        print("| " + " | ".join(text(row[c]) for c in columns) + " |")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=2000, help="synthetic training rows (validation, test: a fifth)")
    parser.add_argument("--epochs", type=int, default=3, help="teacher and student epochs (at least 2)")
    parser.add_argument("--cpus", type=int, default=2, help="logical CPUs of each local Ray")
    parser.add_argument("--dir", help="working directory (default: a temporary one, deleted unless --keep)")
    parser.add_argument("--keep", action="store_true", help="keep the working directory")
    parser.add_argument("--json", "--out", dest="json", metavar="PATH", help="write the figures as JSON")
    args = parser.parse_args(argv)
    if args.epochs < 2:
        parser.error("--epochs must be at least 2: the faults strike in epoch 2")
    return args


def measured(name: str, measure) -> dict:
    """One fault's row; a measurement that fails becomes a row saying so (the others still run)."""
    import traceback

    started = time.perf_counter()
    try:
        rows = measure()
    except Exception as error:  # noqa: BLE001
        traceback.print_exc()
        failed = f"MEASUREMENT FAILED: {type(error).__name__}: {(str(error).strip().splitlines() or [''])[0]}"
        rows = [{"fault": name, "injected": "?", "survived": failed, "rows_lost": "?", "recomputed": "?",
                 "same_as_uninterrupted": None}]
    rows = rows if isinstance(rows, list) else [rows]
    print(f"[faults] {name}: {time.perf_counter() - started:.0f}s", flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    root = Path(args.dir or tempfile.mkdtemp(prefix="kdray-faults-")).resolve()
    root.mkdir(parents=True, exist_ok=True)
    config_path = str(root / "config.yaml")
    Path(config_path).write_text(yaml.safe_dump(bench_config(args.rows, args.epochs, args.cpus)))
    storage = str(root / "runs")
    config = load_config(config_path, {"storage": {"storage_path": storage, "run_name": "clean"}})
    clean = Storage(storage).child("clean")
    started = time.perf_counter()
    try:
        ray.init(address="local", num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
        try:
            ray.data.DataContext.get_current().enable_progress_bars = False
            logging.getLogger("ray.data").setLevel(logging.WARNING)
            run_pipeline(pipeline_stages(), config, clean, progress=False, log=lambda _: None)
            reference_seconds = time.perf_counter() - started
            print(f"[faults] reference run: {reference_seconds:.0f}s", flush=True)
            worker = measured("worker", lambda: worker_fault(config, clean, root))
            specialist = measured("specialist", lambda: specialist_fault(config, clean, root))
            shard = measured("truncated shard", lambda: truncated_shard(config_path, clean, root))
        finally:
            ray.shutdown()
        storage_row = measured("unwritable storage", lambda: unwritable_storage(config_path, root))
        # After this process's Ray is down: the three `kdray run` processes start their own.
        driver = measured("driver", lambda: driver_faults(config_path, storage, clean, root, args.epochs))
        rows = worker + specialist + driver + shard + storage_row
        figures = {
            "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                        "ray_cpus": args.cpus, "torch": torch.__version__, "ray": ray.__version__},
            "config": {"rows": args.rows, "epochs": args.epochs, "storage": storage},
            "reference_seconds": round(reference_seconds, 1),
            "wall_seconds": round(time.perf_counter() - started, 1),
            "load_average_end": [round(x, 1) for x in os.getloadavg()],
            "faults": rows,
        }
        print_table(rows)
        print(f"\nwall time {figures['wall_seconds']:.0f}s, the uninterrupted reference run {reference_seconds:.0f}s; "
              f"load average at the end {', '.join(map(str, figures['load_average_end']))}")
        if args.json:
            Path(args.json).write_text(json.dumps(figures, indent=2, default=str) + "\n")
            print(f"wrote {args.json}")
    finally:
        if not args.keep and not args.dir:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
