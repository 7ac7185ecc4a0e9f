"""Shared fixtures: one real local Ray for the whole session (2 CPUs, as on the CI machine)."""

import os

import pytest
import ray

from kdray.faults import FAST_TRAIN_POLL

# Ray Train's controller polls its workers every 2 s by default: each training run ends up to a
# poll late and a faulted worker waits two polls to have its checkpoint collected (see
# kdray.train._maybe_fail). The suite runs dozens of short runs; polling every 0.2 s saves minutes.
# Set before Ray starts, so every Ray process (and every `ray start` a test runs) inherits it.
for _name, _value in FAST_TRAIN_POLL.items():
    os.environ.setdefault(_name, _value)


@pytest.fixture(scope="session")
def ray_local():
    if not ray.is_initialized():
        # address="local": a fresh instance even if a `ray start` head runs on this machine.
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()
