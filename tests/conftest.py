"""Shared fixtures: one real local Ray for the whole session (2 CPUs, as on the CI machine)."""

import pytest
import ray


@pytest.fixture(scope="session")
def ray_local():
    if not ray.is_initialized():
        # address="local": a fresh instance even if a `ray start` head runs on this machine.
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()
