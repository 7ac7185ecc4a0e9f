"""The sweep stage: Ray Tune over the student's temperature, hard-target weight and (optionally) the
width of a 2-layer student, each trial one student trained by the shared loop on the cached transfer
shards (a trial never runs the teacher).

Layout, under the run directory:

- ``sweep/tune/``: Tune's experiment, one directory per trial with ``progress.csv``, ``result.json``
  and TensorBoard event files (``tensorboard --logdir RUN/sweep/tune``). If it exists when the stage
  starts (an interrupted sweep), Tune restores it: finished trials are kept, unfinished and errored
  ones resume, and each trial's TorchTrainer resumes from its own checkpoint in the work directory.
- ``sweep/trials.csv`` and ``sweep/trials.json``: one row per trial (its parameters, the epochs it
  trained before ASHA stopped it or its budget ran out, its last validation figures).
- ``sweep/best/``: the best finished trial's configuration trained again to the sweep's budget and
  exported (``model.pt2``); published as the model "student-swept" for the evaluate stage.

ASHA compares trials at the epochs it reaches (``time_attr="epoch"``, the epoch the trial's own loop
reports), so a trial resumed from a checkpoint keeps its place in the schedule.

Resources: a trial reserves TRIAL_CPUS through Tune and its trainer's single worker a token
TRIAL_WORKER_CPUS; how many run at once is ``resources.max_concurrent_trials``. When ASHA stops a
trial, Tune ends the trial's actor and with it the trainer's controller, but not the worker
placement group (see `release_trial_worker_reservations`, which removes those when Tune is done).
Trials that reach the budget are not stopped by ASHA (``stop_last_trials=False``): they end on their
own and release everything.
"""

from __future__ import annotations

import csv
import io
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from kdray.config import Config, ResourcesConfig, SweepConfig, kept_classes
from kdray.runtime.artifacts import ModelSpec, export_program, load_bundle, save_bundle
from kdray.runtime.stage import StageContext, StageResult
from kdray.runtime.storage import Storage
from kdray.runtime.train import FitSpec, LossSpec, final_metrics, fit

EXPERIMENT = "tune"
BEST = "best"
TRIALS_CSV, TRIALS_JSON = "trials.csv", "trials.json"
SWEPT = "student-swept"
PARAMETERS = ("temperature", "hard_weight", "width")
TRIAL_CPUS = 0.1  # the trial function only waits on its trainer, which holds the CPUs it trains on
TRIAL_WORKER_CPUS = 0.001  # logical only: torch in a worker with < 1 CPU runs one thread either way
# Every trial reaches ASHA's first rung (its grace period); later epochs only the promoted ones,
# and the first trials to reach a rung are promoted before any rival has been seen. Errors at the
# rung compare every trial at the same budget; the final ones do not.
RUNG_METRICS = ("val_error", "test_error")
COLUMNS = ("trial", *PARAMETERS, "epochs", "val_error", "val_nll", "test_error",
           *(f"rung_{name}" for name in RUNG_METRICS), "seconds", "status")


# ------------------------------------------------------------------------------------ the search
def search_space(sweep: SweepConfig) -> dict[str, Any]:
    """Tune's param_space: a grid over every value list, or random draws from them (`num_samples`
    each). Random search draws from the same lists, so every trial lies on the grid the heatmaps use."""
    from ray import tune

    values: dict[str, list] = {"temperature": list(sweep.temperatures), "hard_weight": list(sweep.hard_weights)}
    if sweep.widths:
        values["width"] = list(sweep.widths)
    pick = tune.grid_search if sweep.search == "grid" else tune.choice
    return {name: pick(options) for name, options in values.items()}


def trial_spec(base: FitSpec, params: dict[str, Any]) -> FitSpec:
    """The student `base` with a trial's temperature, hard weight and (if swept) width."""
    loss = replace(base.loss, temperature=float(params["temperature"]), hard_weight=float(params["hard_weight"]))
    model = base.model
    if params.get("width") is not None:
        width = int(params["width"])
        model = replace(model, options={**model.options, "hidden": [width, width]})
    return replace(base, model=model, loss=loss)


@dataclass(frozen=True)
class TrialSetup:
    """What every trial needs, as plain values (pickled once into Ray's object store)."""

    base: FitSpec  # the student at the sweep's epoch budget
    transfer: str  # the transfer stage's cached shards
    dataset: str  # the dataset (its validation split; its test split for the heatmaps)
    resources: ResourcesConfig
    storage: str  # where the trials' TorchTrainer runs keep their checkpoints


def trial_datasets(setup: TrialSetup) -> dict[str, Any]:
    from kdray.data import read_split
    from kdray.distill.transfer import read_transfer

    dataset = Storage(setup.dataset)
    # Test error is recorded per trial for the report's heatmaps (the paper's figure is in test
    # error); the best trial is chosen on validation error only.
    return {"train": read_transfer(setup.transfer), "validation": read_split(dataset, "validation"),
            "test": read_split(dataset, "test")}


def run_trial(params: dict[str, Any], setup: TrialSetup) -> None:
    """One Tune trial: one TorchTrainer run whose per-epoch reports reach Tune (and ASHA)."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    trial = tune.get_context().get_trial_id()
    fit(trial_spec(setup.base, params), trial_datasets(setup), setup.resources, setup.storage, f"trial-{trial}",
        callbacks=[TuneReportCallback()], num_workers=1)


def trial_dirname(trial) -> str:
    """`T4-hw0.1-w300-<id>`: readable run names in TensorBoard."""
    params = trial.config
    width = f"-w{params['width']}" if params.get("width") is not None else ""
    return f"T{params['temperature']:g}-hw{params['hard_weight']:g}{width}-{trial.trial_id}"


def run_tune(setup: TrialSetup, sweep: SweepConfig, concurrent_trials: int, storage: Storage,
             name: str = EXPERIMENT, verbose: int = 0):
    """Run (or restore and finish) the Tune experiment `storage/name`; returns Tune's ResultGrid."""
    from ray import tune

    trainable = tune.with_resources(tune.with_parameters(run_trial, setup=setup), {"CPU": TRIAL_CPUS})
    before = set(trial_worker_reservations())
    try:
        return _tuner(trainable, sweep, concurrent_trials, storage, name, verbose).fit()
    finally:
        release_trial_worker_reservations(exclude=before)


def _tuner(trainable, sweep: SweepConfig, concurrent_trials: int, storage: Storage, name: str,
           verbose: int):
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.basic_variant import BasicVariantGenerator

    if tune.Tuner.can_restore(storage.uri(name)):
        tuner = tune.Tuner.restore(storage.uri(name), trainable=trainable, resume_errored=True)
    else:
        tuner = tune.Tuner(
            trainable,
            param_space=search_space(sweep),
            tune_config=tune.TuneConfig(
                metric=sweep.metric, mode="min", num_samples=sweep.num_samples,
                scheduler=ASHAScheduler(time_attr="epoch", max_t=sweep.max_epochs, grace_period=sweep.grace_period,
                                        stop_last_trials=False),
                # The generator limits concurrency itself: TuneConfig.max_concurrent_trials is
                # ignored (with a warning) when a search algorithm is given.
                search_alg=BasicVariantGenerator(max_concurrent=concurrent_trials, random_state=sweep.seed),
                trial_dirname_creator=trial_dirname),
            run_config=tune.RunConfig(name=name, storage_path=storage.uri(), verbose=verbose))
    return tuner


# A stopped trial's controller dies asynchronously after Tune returns, and may still be creating
# its worker group's placement group: the release keeps sweeping for this long.
RELEASE_SETTLE_SECONDS, RELEASE_POLL_SECONDS = 5.0, 0.5


def trial_worker_reservations() -> list[str]:
    """Ids of placement groups not yet removed (pending, created or rescheduling) shaped like a
    trial's trainer worker: one {CPU: TRIAL_WORKER_CPUS} bundle."""
    from ray.util import placement_group_table

    return [pg_id for pg_id, info in placement_group_table().items()
            if info["state"] != "REMOVED" and list(info["bundles"].values()) == [{"CPU": TRIAL_WORKER_CPUS}]]


def release_trial_worker_reservations(exclude: set[str]) -> None:
    """Remove the worker reservations that trials stopped by ASHA left behind.

    Tune kills a stopped trial's actor, and with it the trial's TrainController, but the worker
    group's placement group belongs to the job: Ray Train's detached cleaner removes it only when
    the State API answers, which fails whenever another Ray instance runs on the machine (it cannot
    tell which to ask). Left in place, each one keeps a sliver of a CPU, so a later 1-CPU Ray Data
    task next to a 1-CPU actor never fits on a 2-CPU machine. Called when no trial of this sweep is
    running; `exclude` holds the reservations that existed before it started. One still pending
    when Tune returns (its controller not yet dead) was once left to be created later, and the
    evaluate stage's Ray Data job then waited forever (CI): pending ones are removed too, and the
    sweep repeats for RELEASE_SETTLE_SECONDS.
    """
    import ray
    from ray.util import remove_placement_group
    from ray.util.placement_group import PlacementGroup

    deadline = time.monotonic() + RELEASE_SETTLE_SECONDS
    while True:
        for pg_id in set(trial_worker_reservations()) - exclude:
            remove_placement_group(PlacementGroup(ray.PlacementGroupID(bytes.fromhex(pg_id))))
        if time.monotonic() >= deadline:
            return
        time.sleep(RELEASE_POLL_SECONDS)


# ------------------------------------------------------------------------------------ the trials table
def trial_rows(results, max_epochs: int, rung_epoch: int | None = None) -> list[dict[str, Any]]:
    """One row per trial of a ResultGrid; status "finished" (trained `max_epochs`), "stopped"
    (by ASHA) or "error"; `rung_*` the trial's RUNG_METRICS at epoch `rung_epoch` (None where it
    did not get there)."""
    rows = []
    for result in results:
        metrics = result.metrics or {}
        epochs = int(metrics.get("epoch", 0))
        status = "error" if result.error else ("finished" if epochs >= max_epochs else "stopped")
        # A trial that failed before its first report has no metrics: its id ends its directory name.
        row = {"trial": metrics.get("trial_id") or result.path.rstrip("/").rsplit("-", 1)[-1],
               **{name: result.config.get(name) for name in PARAMETERS},
               "epochs": epochs, **{name: metrics.get(name) for name in ("val_error", "val_nll", "test_error")},
               **{f"rung_{name}": value for name, value in metrics_at_epoch(result, rung_epoch).items()},
               "seconds": round(float(metrics.get("time_total_s", 0.0)), 2), "status": status}
        rows.append(row)
    return sorted(rows, key=lambda row: row["trial"])


def metrics_at_epoch(result, epoch: int | None) -> dict[str, float | None]:
    """RUNG_METRICS of a Tune Result as reported at `epoch` (None each where it was not)."""
    frame = result.metrics_dataframe if epoch is not None else None
    reported = frame[frame["epoch"] == epoch] if frame is not None and "epoch" in frame else []
    if len(reported) == 0:
        return dict.fromkeys(RUNG_METRICS)
    last = reported.iloc[-1]  # a restored trial may have reported its epoch again
    values = {name: last.get(name) for name in RUNG_METRICS}
    return {name: None if value is None or math.isnan(value) else float(value) for name, value in values.items()}


def best_trial(rows: Sequence[dict[str, Any]], metric: str) -> dict[str, Any]:
    """The finished trial with the lowest `metric` (ASHA-stopped trials stopped early for a reason,
    and their figures come from fewer epochs). Ties go to the earlier trial."""
    finished = [row for row in rows if row["status"] == "finished" and row.get(metric) is not None]
    if not finished:
        raise RuntimeError(f"no sweep trial finished with a {metric}; statuses: "
                           f"{sorted({row['status'] for row in rows})}")
    return min(finished, key=lambda row: row[metric])


def trials_csv(rows: Sequence[dict[str, Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows({name: ("" if row.get(name) is None else row[name]) for name in COLUMNS} for row in rows)
    return buffer.getvalue()


def format_trials_table(rows: Sequence[dict[str, Any]], metric: str, best: str | None = None) -> str:
    """Fixed-width text, best `metric` first; the best trial marked with '*'."""
    order = sorted(rows, key=lambda row: (row.get(metric) is None, row.get(metric) or 0.0))
    show_width = any(row.get("width") is not None for row in rows)
    header = f"  {'trial':<14}{'T':>7}{'hard w':>8}" + (f"{'width':>7}" if show_width else "") + \
        f"{'epochs':>8}{'val error %':>13}{'val NLL':>9}{'test error %':>14}{'seconds':>9}  status"
    lines = [header, "-" * len(header)]
    for row in order:
        mark = "*" if row["trial"] == best else " "
        width = f"{row['width'] if row.get('width') is not None else '':>7}" if show_width else ""
        error, nll, test = (_shown(row.get(name), scale, digits) for name, scale, digits in
                            (("val_error", 100, 2), ("val_nll", 1, 4), ("test_error", 100, 2)))
        lines.append(f"{mark} {row['trial']:<14}{row['temperature']:>7g}{row['hard_weight']:>8g}{width}"
                     f"{row['epochs']:>8}{error:>13}{nll:>9}{test:>14}{row['seconds']:>9.1f}  {row['status']}")
    return "\n".join(lines)


def _shown(value: float | None, scale: float, digits: int) -> str:
    return "n/a" if value is None else f"{scale * value:.{digits}f}"


def tensorboard_command(experiment: Storage) -> str:
    return f"tensorboard --logdir {experiment.uri()}"


# ------------------------------------------------------------------------------------ the stage
def sweep_spec(config: Config, input_shape: tuple[int, ...], num_classes: int) -> FitSpec:
    """The student of `distill` at the sweep's epoch budget; each trial overrides its parameters."""
    distill = config.distill
    student = distill.student
    return FitSpec(ModelSpec(student.name, student.options, tuple(input_shape), num_classes),
                   distill.train.model_copy(update={"epochs": config.sweep.max_epochs}),
                   LossSpec("distill", distill.temperature, distill.hard_weight,
                            kept_classes(distill.transfer.top_k, num_classes)))


def _train_best(context: StageContext, setup: TrialSetup, params: dict[str, Any]) -> dict[str, float]:
    """Train the best configuration to the sweep's budget (resuming an interrupted attempt), save
    and export it as `sweep/best/`."""
    output = context.output
    if not output.exists(BEST, "model.json"):
        spec = trial_spec(setup.base, params)
        result = fit(spec, trial_datasets(setup), context.config.resources, context.work.uri(), BEST)
        output.write_json(result.history, BEST, "history.json")
        save_bundle(output, BEST, spec.model, result.state_dict)
    model, spec = load_bundle(output, BEST, trusted=context.config.model_factories())
    export_program(output, BEST, model, spec)
    return final_metrics(output.read_json(BEST, "history.json"))


def run_sweep(context: StageContext) -> StageResult:
    from kdray.data import read_manifest

    config, sweep = context.config, context.config.sweep
    dataset = context.input_output("data", "dataset")
    manifest = read_manifest(Storage(dataset))
    concurrent = config.resources.max_concurrent_trials
    setup = TrialSetup(sweep_spec(config, manifest.feature_shape, manifest.num_classes),
                       context.input_output("transfer", "transfer"), dataset,
                       config.resources.model_copy(update={"cpus_per_worker": TRIAL_WORKER_CPUS}),
                       context.work.child("trials").uri())
    experiment = context.output.child(EXPERIMENT)
    results = run_tune(setup, sweep, concurrent, context.output, verbose=1 if context.progress else 0)
    rows = trial_rows(results, sweep.max_epochs, rung_epoch=sweep.grace_period)
    errored = [row["trial"] for row in rows if row["status"] == "error"]
    if errored:
        raise RuntimeError(f"sweep trials {errored} failed (see {experiment.uri()}); run again to resume them")
    best = best_trial(rows, sweep.metric)
    context.output.write_text(trials_csv(rows), TRIALS_CSV)
    context.output.write_json({"metric": sweep.metric, "max_epochs": sweep.max_epochs,
                               "rung_epoch": sweep.grace_period, "best": best["trial"], "trials": rows,
                               "columns": list(COLUMNS)}, TRIALS_JSON)
    params = {name: best[name] for name in PARAMETERS if best.get(name) is not None}
    final = _train_best(context, setup, params)
    context.output.write_json({"trial": best["trial"], **params}, BEST, "params.json")
    model = {"location": context.output.location, "bundles": [BEST]}
    summary = {"trials": len(rows), "finished": sum(row["status"] == "finished" for row in rows),
               "best_trial": best["trial"], **{f"best_{name}": value for name, value in params.items()},
               f"best_{sweep.metric}": best[sweep.metric], "swept_val_error": final.get("val_error"),
               "tensorboard": tensorboard_command(experiment)}
    return StageResult(outputs={"models": {SWEPT: model}, "trials": context.output.uri(TRIALS_JSON),
                                "tune": experiment.uri()}, summary=summary)
