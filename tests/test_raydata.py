"""kdray.runtime.raydata: each execution of a Dataset kdray reads learns its resource limits promptly."""

from __future__ import annotations

import cloudpickle
import pytest
from ray.data._internal.execution.resource_manager import ResourceManager
from tiny_data import write_blobs

from kdray.data.shards import read_split
from kdray.runtime.raydata import LIMITS_REFRESH_SECONDS, PromptResourceLimits
from kdray.runtime.storage import Storage


@pytest.fixture
def shards(tmp_path) -> Storage:
    write_blobs(str(tmp_path), rows=(100, 10, 10))
    return Storage(str(tmp_path))


def test_every_pass_over_a_kdray_dataset_refreshes_its_limits_promptly(ray_local, shards, monkeypatch):
    seen = []  # per execution: (its interval, Ray's class default)
    apply = PromptResourceLimits.before_execution_starts

    def apply_and_record(self, executor):
        apply(self, executor)
        seen.append((executor._resource_manager.GLOBAL_LIMITS_UPDATE_INTERVAL_S,
                     ResourceManager.GLOBAL_LIMITS_UPDATE_INTERVAL_S))

    monkeypatch.setattr(PromptResourceLimits, "before_execution_starts", apply_and_record)
    dataset = read_split(shards, "train").select_columns(["x", "y"])  # derived: keeps the context
    for _ in range(2):
        assert sum(len(batch["y"]) for batch in dataset.iter_batches(batch_size=32)) == 100
    # Each pass (a new execution) got the short interval; Ray's own default is left alone.
    assert seen == [(LIMITS_REFRESH_SECONDS, 1)] * 2


def test_the_callback_travels_with_the_dataset_context(ray_local, shards):
    # Ray Train's split coordinator runs the executions in another process, from a copy of this context.
    context = cloudpickle.loads(cloudpickle.dumps(read_split(shards, "train").context))
    assert PromptResourceLimits in context.custom_execution_callback_classes
