"""kdray.runtime.progress: the epoch bar fed by Ray Train callbacks, and training runs as concurrent Ray
tasks sized to leave CPU for their data (real Ray Train runs on tiny blobs)."""

from __future__ import annotations

import pytest
from tiny_data import write_blobs

from kdray.config import ResourcesConfig, TrainConfig
from kdray.data.shards import read_split
from kdray.distill.student import rows_per_epoch
from kdray.runtime.artifacts import ModelSpec
from kdray.runtime.progress import EpochProgress, postfix, train_in_tasks
from kdray.runtime.session import runs_that_fit
from kdray.runtime.storage import Storage
from kdray.runtime.train import FitSpec, LossSpec, concurrent_fits, fit

SPEC = FitSpec(ModelSpec("mlp", {"hidden": [8]}, (6,), 4), TrainConfig(epochs=2, batch_size=64, lr=0.01),
               LossSpec("hard"))


@pytest.fixture(scope="module")
def blobs(tmp_path_factory):
    location = str(tmp_path_factory.mktemp("blobs"))
    write_blobs(location)
    return location


def test_postfix_names_the_run_its_epoch_and_errors_as_percentages():
    assert postfix("member-03", {"epoch": 3.0, "val_error": 0.09812, "loss": 1.0}, 15) == "member-03 3/15 val 9.81%"
    assert postfix("student", {"epoch": 1, "train_error": 0.5, "val_error": 0.25}, 2) == "student 1/2 val 25.00% train 50.00%"


def test_training_tasks_return_in_order_and_the_bar_counts_every_reported_epoch(ray_local, blobs, tmp_path):
    def train(spec: FitSpec, location: str, storage: str, name: str, callbacks: list) -> tuple[str, list[int]]:
        # Nested, so that Ray ships it by value: the workers cannot import this test module.
        datasets = {split: read_split(Storage(location), split) for split in ("train", "validation")}
        result = fit(spec, datasets, ResourcesConfig(cpus_per_worker=0.5), storage, name, callbacks=callbacks)
        return name, [int(entry["epoch"]) for entry in result.history]

    runs = {name: (SPEC, blobs, str(tmp_path), name) for name in ("first", "second")}
    with EpochProgress("test", {name: SPEC.train.epochs for name in runs}) as bar:
        results = train_in_tasks(train, runs, 2, bar)
        bar.refresh()
        assert bar.bar.n == 2 * SPEC.train.epochs  # each run's reports reached the driver
        assert bar.bar.postfix.split(" ")[:2] in (["first", "2/2"], ["second", "2/2"])
    assert results == [("first", [1, 2]), ("second", [1, 2])]
    disabled = EpochProgress("off", {"run": 2}, enabled=False)
    assert disabled.callbacks() == [] and disabled.board is None  # no actor, nothing drawn
    disabled.close()


def test_runs_with_longer_epochs_weigh_more_when_rows_are_given(ray_local):
    import ray

    # A student on 4 copies of each row beside its baseline on the plain rows: the baseline done
    # (its 3 epochs of 100 rows) is 300 of the 1,500 rows to train, not half the epochs.
    with EpochProgress("student", {"student": 3, "baseline": 3}, rows={"student": 400, "baseline": 100}) as bar:
        assert bar.bar.total == 1500 and bar.bar.unit == "row"
        ray.get(bar.board.post.remote("baseline", {"epoch": 3}))
        ray.get(bar.board.post.remote("student", {"epoch": 1}))
        bar.refresh()
        assert bar.bar.n == 300 + 400


def test_student_and_baseline_epochs_in_rows():
    summary = {"rows": 2000, "copies": 4, "fraction": 0.5}
    assert rows_per_epoch(summary, 1000, separate_transfer_set=False) == {"student": 2000, "baseline": 500}
    # A separate (unlabeled) transfer set: the baseline still trains on that fraction of train.
    assert rows_per_epoch(summary, 3000, separate_transfer_set=True) == {"student": 2000, "baseline": 1500}


def test_concurrent_runs_leave_a_cpu_for_their_data(ray_local):
    # The session's Ray has 2 CPUs: one is kept for Ray Data's reads.
    assert runs_that_fit(1.0) == 1 and runs_that_fit(0.5) == 2 and runs_that_fit(0.25) == 4
    assert runs_that_fit(4.0) == 1  # too big to fit beside the reserve: still one at a time
    assert runs_that_fit(0.5, gpus_per_run=1.0) == 1  # no GPUs here: at least one run
    assert concurrent_fits(ResourcesConfig(cpus_per_worker=1.0, use_gpu=False, concurrent_members=2)) == 1
    assert concurrent_fits(ResourcesConfig(cpus_per_worker=0.5, use_gpu=False, concurrent_members=2)) == 2
    assert concurrent_fits(ResourcesConfig(cpus_per_worker=0.25, num_workers=2, use_gpu=False,
                                           concurrent_members=8)) == 2
    assert concurrent_fits(ResourcesConfig(cpus_per_worker=0.25, use_gpu=False, concurrent_members=3)) == 3
