"""The driver of `kdray run` SIGKILLed inside a stage and between stages (issue 6), as real processes.

One sequence on one run directory (fault_harness.kill_inside_and_between): run 1 is killed inside the
teacher stage once its training run has checkpointed an epoch; run 2 is killed as soon as the
transfer stage's manifest is written; run 3 finishes. Each re-run must skip the stages that had
finished, resume the interrupted one from its checkpoint, and the finished run must equal an
uninterrupted one with the same config and seed (the session's distilled run, in-process). The
killed drivers' local Rays must go with them. The other faults have their own tests: a killed Ray
Train worker (test_train), a killed specialist actor (test_specialists), a truncated or corrupt
shard (test_shards), an unwritable storage path (test_cli).
"""

from __future__ import annotations

import pytest
import yaml
from fault_harness import (
    SELF_EXITING,
    differences,
    kill_inside_and_between,
    stage_lines,
    weight_differences,
    without_timing,
)
from tiny_data import TEACHER_EPOCHS

from kdray.evaluation.evaluate import RESULTS
from kdray.runtime.storage import Storage

FINISHED_FIRST = ("data", "teacher", "transfer")  # finished before the second kill


@pytest.fixture(scope="module")
def runs(distilled_run, tmp_path_factory):
    """The kill sequence on the session's distilled run's config; that finished run is the
    uninterrupted one it must equal."""
    root = tmp_path_factory.mktemp("faults")
    # local_num_cpus: each killed run's own local Ray takes 2 CPUs, like the session's.
    # epoch_cache_mb 0: every epoch streams, as on data too big to cache, so the teacher's epochs
    # take long enough for the first kill to land between two of their checkpoints. Neither
    # changes what is computed. No baseline or bias correction: the models the killed run makes
    # are the teacher and the student, which must equal the uninterrupted run's.
    raw = {**distilled_run.raw, "resources": {**distilled_run.raw["resources"], "local_num_cpus": 2,
                                              "epoch_cache_mb": 0},
           "distill": {**distilled_run.raw["distill"], "baseline": False, "bias_correction": False}}
    config = root / "config.yaml"
    config.write_text(yaml.safe_dump(raw))
    sequence = kill_inside_and_between(str(config), str(root / "runs"), "killed", root, timeout=600)
    return sequence, Storage(str(root / "runs")).child("killed"), distilled_run.run


def _context(kill) -> str:
    return f"killed at {kill.point} after {kill.seconds}s; its output:\n{kill.output[-4000:]}"


def test_each_kill_landed_where_it_was_meant_to(runs):
    sequence, _, _ = runs
    inside, between = sequence.kills
    assert "teacher" not in inside.manifests, _context(inside)  # the teacher stage had not finished
    assert 1 <= len(inside.restorable) < TEACHER_EPOCHS, _context(inside)  # nor its training
    assert set(FINISHED_FIRST) <= set(between.manifests) and "student" not in between.manifests, _context(between)


def test_the_killed_drivers_ray_goes_with_it(runs):
    # GCS, raylet, dashboard and running workers fate-share with the driver (in seconds); only the
    # raylet's agents and a worker caught starting up linger (they exit by themselves up to a
    # minute later); the helper kills those.
    sequence, _, _ = runs
    for kill in sequence.kills:
        assert len(kill.report.session) > 5, kill.report  # it did have a local Ray to lose
        assert set(kill.report.lingering.values()) <= SELF_EXITING, (kill.report, _context(kill))


def test_a_rerun_skips_finished_stages_and_resumes_the_interrupted_one(runs):
    sequence, killed, _ = runs
    inside, between = sequence.kills
    assert stage_lines(between.output)["data"] == "up to date", _context(between)
    assert stage_lines(between.output)["teacher"] == "done", _context(between)
    said = stage_lines(sequence.output)
    assert said == {
        **{stage: "up to date" for stage in FINISHED_FIRST}, "student": "done", "evaluate": "done",
        "report": "done"}, sequence.output
    # Skipped stages' manifests are untouched: the data stage's since run 1, the others' since run 2.
    assert sequence.manifests["data"] == inside.manifests["data"] == between.manifests["data"]
    for stage in FINISHED_FIRST:
        assert sequence.manifests[stage] == between.manifests[stage], stage
    # The teacher trained every epoch exactly once: what its checkpoint held when run 1 died was
    # restored (the epoch's own timing kept), only the epochs after it were trained by run 2.
    history = killed.read_json("teacher", "member-00", "history.json")
    assert [entry["epoch"] for entry in history] == list(range(1, TEACHER_EPOCHS + 1))
    assert history[:len(inside.restorable)] == inside.restorable, _context(inside)
    # A finished stage drops its scratch (transfer's may remain if run 2 died just after its manifest).
    scratch = killed.list("_work") if killed.exists("_work") else []
    assert not [name for name in scratch if not name.startswith("transfer-")], scratch


def test_the_finished_run_equals_an_uninterrupted_one(runs):
    _, killed, clean = runs
    for stage, bundle in (("teacher", "member-00"), ("student", "student")):
        assert weight_differences(killed.child(stage), clean.child(stage), bundle) == [], f"{stage}/{bundle}"
        histories = [without_timing(run.read_json(stage, bundle, "history.json")) for run in (killed, clean)]
        assert differences(*histories, f"{stage}/{bundle}") == []
    models = killed.read_json(RESULTS)["models"]
    assert set(models) == {"teacher", "student"}
    clean_models = clean.read_json(RESULTS)["models"]
    assert differences(models, {name: clean_models[name] for name in models}, "models") == []
