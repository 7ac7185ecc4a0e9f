"""kdray.sweep: a tiny sweep through Tune with ASHA on a real local Ray (event files, trials table,
the best configuration exported and evaluated), restoring the finished experiment retrains nothing,
`kdray sweep` reuses the run; the pure pieces on hand-made values."""

from __future__ import annotations

import csv
import glob
import io
import json
import os

import pytest
import torch
from tiny_data import copy_run

from kdray.cli import main
from kdray.config import ConfigError, config_from_dict, config_to_yaml, load_config
from kdray.data import read_manifest
from kdray.evaluation.evaluate import RESULTS
from kdray.pipeline import pipeline_stages, run_pipeline, stages_for
from kdray.preflight import check_sweep
from kdray.runtime.artifacts import load_bundle
from kdray.runtime.stage import read_stage_manifest
from kdray.runtime.storage import Storage
from kdray.sweep import (
    BEST,
    EXPERIMENT,
    SWEPT,
    TRIALS_CSV,
    TRIALS_JSON,
    TrialSetup,
    best_trial,
    run_tune,
    search_space,
    sweep_spec,
    trial_spec,
    trial_worker_reservations,
)

# Widths 16 then 1, one at a time: the 1-unit student is far worse when it reaches ASHA's rung at
# epoch 1, where the 16-unit one already set the bar, so ASHA stops it (deterministically).
SWEEP = {"enabled": True, "temperatures": [4.0], "hard_weights": [0.1], "widths": [16, 1],
         "max_epochs": 2, "grace_period": 1}
_SHARED: dict = {}


@pytest.fixture(scope="module")
def swept_run(distilled_run, tmp_path_factory):
    """The session's distilled run, copied, with the sweep enabled: only the sweep, evaluate and
    report run. Built once per session: tests/test_report.py imports this fixture too."""
    if not _SHARED:
        storage = str(tmp_path_factory.mktemp("sweep-runs"))
        run = copy_run(distilled_run.run, storage, "swept")
        raw = {**distilled_run.raw, "sweep": SWEEP, "storage": {"storage_path": storage, "run_name": "swept"},
               "resources": {**distilled_run.raw["resources"], "max_concurrent_trials": 1}}
        config = config_from_dict(raw)
        outcomes = run_pipeline(pipeline_stages(), config, run, progress=False, log=lambda _: None)
        _SHARED.update(config=config, run=run, outcomes={o.name: o.status for o in outcomes})
    return _SHARED


def _trial_dirs(run: Storage) -> list[str]:
    return sorted(glob.glob(run.path("sweep", EXPERIMENT, "T*")))


def _reported_epochs(run: Storage) -> dict[str, list[int]]:
    """Trial directory -> the epochs in its result.json (one JSON line per report)."""
    reported = {}
    for directory in _trial_dirs(run):
        with open(os.path.join(directory, "result.json")) as handle:
            reported[directory] = [json.loads(line)["epoch"] for line in handle if line.strip()]
    return reported


def _first_report(directory: str) -> dict:
    with open(os.path.join(directory, "result.json")) as handle:
        return json.loads(handle.readline())


def test_sweep_runs_trials_under_asha_with_event_files_and_a_table(swept_run):
    run, outcomes = swept_run["run"], swept_run["outcomes"]
    assert outcomes["sweep"] == outcomes["evaluate"] == outcomes["report"] == "ran"
    assert {outcomes[stage] for stage in ("data", "teacher", "transfer", "student")} == {"skipped"}  # the copy's
    table = run.read_json("sweep", TRIALS_JSON)
    trials = {row["width"]: row for row in table["trials"]}
    assert set(trials) == {16, 1} and table["metric"] == "val_error"
    assert trials[16]["status"] == "finished" and trials[16]["epochs"] == 2
    assert trials[1]["status"] == "stopped" and trials[1]["epochs"] == 1  # ASHA's rung at epoch 1
    assert trials[1]["val_error"] > trials[16]["val_error"]
    assert all(0.0 <= row["test_error"] <= 1.0 for row in trials.values())  # for the report's heatmaps
    # Both trials at ASHA's rung (epoch 1): the stopped one's last figures, the finished one's first.
    assert table["rung_epoch"] == 1
    assert trials[1]["rung_val_error"] == trials[1]["val_error"]
    assert trials[1]["rung_test_error"] == trials[1]["test_error"]
    finished = _first_report(next(directory for directory in _trial_dirs(run) if "-w16-" in directory))
    assert finished["epoch"] == 1 and trials[16]["rung_val_error"] == finished["val_error"]
    assert table["best"] == trials[16]["trial"]
    assert trial_worker_reservations() == []  # the stopped trial's worker reservation was released
    with open(run.path("sweep", TRIALS_CSV)) as handle:
        rows = list(csv.DictReader(handle))
    assert sorted(row["width"] for row in rows) == ["1", "16"]
    dirs = _trial_dirs(run)
    assert len(dirs) == 2
    for directory in dirs:  # Tune's TensorBoard logger wrote each trial's curves
        events = glob.glob(os.path.join(directory, "events.out.tfevents.*"))
        assert events and os.path.getsize(events[0]) > 0


def test_best_configuration_is_exported_and_evaluated(swept_run):
    run = swept_run["run"]
    sweep = run.child("sweep")
    params = sweep.read_json(BEST, "params.json")
    assert params == {"trial": run.read_json("sweep", TRIALS_JSON)["best"], "temperature": 4.0,
                      "hard_weight": 0.1, "width": 16}
    model, spec = load_bundle(sweep, BEST)
    assert spec.options["hidden"] == [16, 16]
    exported = torch.export.load(sweep.path(BEST, "model.pt2")).module()
    x = torch.randn(5, 6)
    torch.testing.assert_close(exported(x), model(x))
    assert len(sweep.read_json(BEST, "history.json")) == 2
    evaluate = run.read_json("evaluate", "manifest.json")
    assert "sweep" in evaluate["inputs"]
    swept = run.read_json(RESULTS)["models"][SWEPT]
    assert swept["stage"] == "sweep" and swept["test"]["rows"] == 200 and swept["test"]["error_rate"] < 0.5


def test_restoring_the_finished_experiment_retrains_nothing(swept_run, tmp_path):
    config, run = swept_run["config"], swept_run["run"]
    progress = _reported_epochs(run)
    manifest = read_manifest(Storage(config.data.path))
    trials = tmp_path / "trials"  # where any trial that (wrongly) trained again would checkpoint
    setup = TrialSetup(sweep_spec(config, manifest.feature_shape, manifest.num_classes),
                       read_stage_manifest(run, "transfer")["outputs"]["transfer"], config.data.path,
                       config.resources, str(trials))
    results = run_tune(setup, config.sweep, 1, run.child("sweep"))
    assert sorted(result.metrics["trial_id"] for result in results) == \
        sorted(row["trial"] for row in run.read_json("sweep", TRIALS_JSON)["trials"])
    assert not trials.exists()  # no TorchTrainer run started
    assert _reported_epochs(run) == progress  # no trial reported another epoch


def test_kdray_sweep_reuses_the_run_and_prints_the_table(swept_run, tmp_path, capsys):
    config = swept_run["config"]
    path = tmp_path / "swept.yaml"
    path.write_text(config_to_yaml(config))
    assert main(["sweep", str(path), "--no-progress"]) == 0
    out = capsys.readouterr().out
    for stage in ("data", "teacher", "transfer", "sweep"):
        assert f"[kdray] {stage}: up to date" in out
    assert "[kdray] student" not in out  # the sweep does not need the student stage
    best = swept_run["run"].read_json("sweep", TRIALS_JSON)["best"]
    assert f"* {best}" in out and "stopped" in out
    assert f"tensorboard --logdir {swept_run['run'].path('sweep', EXPERIMENT)}" in out


# ------------------------------------------------------------------------------------ pure pieces
def test_search_space_grid_and_random():
    from ray.tune.search.sample import Categorical

    sweep = config_from_dict({"sweep": {"temperatures": [1, 4], "hard_weights": [0.0], "widths": [30, 300]}}).sweep
    grid = search_space(sweep)
    assert grid == {"temperature": {"grid_search": [1.0, 4.0]}, "hard_weight": {"grid_search": [0.0]},
                    "width": {"grid_search": [30, 300]}}
    random = search_space(sweep.model_copy(update={"search": "random", "widths": []}))
    assert set(random) == {"temperature", "hard_weight"}
    assert isinstance(random["temperature"], Categorical) and random["temperature"].categories == [1.0, 4.0]


def test_trial_spec_sets_loss_and_width():
    config = config_from_dict({"distill": {"student": {"name": "mlp", "hidden": [800, 800], "dropout": 0.1},
                                           "temperature": 4.0, "hard_weight": 0.1},
                               "sweep": {"max_epochs": 3, "grace_period": 1}})
    base = sweep_spec(config, (6,), 4)
    assert base.train.epochs == 3 and base.loss.kind == "distill"
    spec = trial_spec(base, {"temperature": 2.5, "hard_weight": 0.5, "width": 30})
    assert (spec.loss.temperature, spec.loss.hard_weight) == (2.5, 0.5)
    assert spec.model.options == {"hidden": [30, 30], "dropout": 0.1}
    assert trial_spec(base, {"temperature": 8.0, "hard_weight": 0.0}).model.options["hidden"] == [800, 800]


def test_best_trial_prefers_finished_trials():
    rows = [{"trial": "a", "status": "stopped", "val_error": 0.05},
            {"trial": "b", "status": "finished", "val_error": 0.20},
            {"trial": "c", "status": "finished", "val_error": 0.10},
            {"trial": "d", "status": "finished", "val_error": 0.10},
            {"trial": "e", "status": "error", "val_error": None}]
    assert best_trial(rows, "val_error")["trial"] == "c"
    with pytest.raises(RuntimeError, match="no sweep trial finished"):
        best_trial(rows[:1], "val_error")


def test_check_sweep_names_the_keys():
    with pytest.raises(ConfigError, match="sweep.widths"):
        check_sweep(config_from_dict({"distill": {"student": {"name": "cnn"}}, "sweep": {"enabled": True, "widths": [30]}}))
    with pytest.raises(ConfigError, match="use_labels"):
        check_sweep(config_from_dict({"distill": {"transfer": {"use_labels": False}}, "sweep": {"enabled": True}}))
    with pytest.raises(ConfigError, match="grace_period"):
        config_from_dict({"sweep": {"max_epochs": 2, "grace_period": 3}})


def test_temperature_job_config_is_valid_and_sweeps_the_papers_grid():
    config = load_config(os.path.join(os.path.dirname(__file__), "..", "jobs", "temperature.yaml"))
    assert config.sweep.enabled and config.sweep.search == "grid"
    assert config.sweep.widths == [30, 100, 300]  # the paper's narrow (30) and wide (>= 300) students
    assert config.sweep.temperatures == [1.0, 2.0, 2.5, 3.0, 4.0, 8.0, 20.0]
    assert config.sweep.hard_weights == [0.0, 0.1, 0.5]
    check_sweep(config)  # enabled, so it checks


def test_sweep_command_runs_only_what_the_sweep_needs():
    assert [stage.name for stage in stages_for("sweep")] == ["data", "teacher", "transfer", "sweep"]
    names = [stage.name for stage in pipeline_stages()]
    assert names.index("sweep") < names.index("evaluate") < names.index("report")


def test_trials_csv_round_trips():
    from kdray.sweep import COLUMNS, trials_csv

    rows = [{"trial": "a", "temperature": 2.0, "hard_weight": 0.1, "width": None, "epochs": 3,
             "val_error": 0.125, "val_nll": 0.5, "seconds": 1.5, "status": "finished"}]
    parsed = list(csv.DictReader(io.StringIO(trials_csv(rows))))
    assert tuple(parsed[0]) == COLUMNS and parsed[0]["width"] == "" and parsed[0]["val_error"] == "0.125"
