"""kdray.runtime's task runners: results in submission order, a bound on tasks in flight, and a
failure that re-raises the task's own exception without taking the driver down."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time

import pytest
import ray

from kdray.runtime import gather, run_bounded


@ray.remote(num_cpus=0.5)
def _square_or_fail(value: int) -> int:
    if value < 0:
        raise ValueError(f"negative input {value}")
    time.sleep(0.01 * (value % 3))  # finish out of submission order
    return value * value


@ray.remote(num_cpus=0)
class _Concurrency:
    """Counts tasks inside `hold` at once; records the most seen."""

    def __init__(self) -> None:
        self.inside = self.most = 0

    def enter(self) -> None:
        self.inside += 1
        self.most = max(self.most, self.inside)

    def leave(self) -> None:
        self.inside -= 1

    def peak(self) -> int:
        return self.most


@ray.remote(num_cpus=0.5)
def _hold(counter, seconds: float) -> None:
    ray.get(counter.enter.remote())
    time.sleep(seconds)
    ray.get(counter.leave.remote())


def test_gather_returns_results_in_the_order_of_the_refs(ray_local):
    assert gather([_square_or_fail.remote(value) for value in range(8)]) == [v * v for v in range(8)]


def test_run_bounded_keeps_at_most_max_in_flight_tasks_running(ray_local):
    counter = _Concurrency.remote()
    # 2 CPUs fit 4 half-CPU tasks: without the bound, more than one would run at once.
    run_bounded([lambda: _hold.remote(counter, 0.2)] * 4, max_in_flight=1)
    assert ray.get(counter.peak.remote()) == 1


def test_a_failure_raises_the_tasks_own_exception_and_submits_nothing_more(ray_local):
    submitted: list[int] = []

    def submit(value: int):
        submitted.append(value)
        return _square_or_fail.remote(value)

    with pytest.raises(ValueError, match="negative input -1"):
        run_bounded([lambda value=value: submit(value) for value in (-1, 2, 3, 4)], max_in_flight=1)
    assert submitted == [-1]


def test_failing_gathers_with_tasks_in_flight_never_abort_the_driver():
    """Regression: cancelling the tasks still in flight after a failure raced their dispatch and
    aborted the driver with a failed Ray CHECK (exit 1, no Python traceback) within ~30 rounds.
    In a subprocess, so that an abort fails this test instead of ending the whole session."""
    script = textwrap.dedent("""
        import ray
        from kdray.runtime import gather

        @ray.remote(num_cpus=0.5)
        def check(index):
            if index == 1:
                raise ValueError(index)
            return index

        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
        for _ in range(200):
            try:
                gather([check.remote(index) for index in range(3)])
            except ValueError:
                continue
            raise SystemExit("gather did not raise the task's ValueError")
        print("survived")
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "survived" in done.stdout, done.stderr[-3000:]
