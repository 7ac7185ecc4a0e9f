"""kdray.runtime.session: joining a cluster fails at once, naming the fix, where it cannot succeed; the task
runners return results in submission order, bound the tasks in flight, and re-raise a task's own
exception without taking the driver down."""

from __future__ import annotations

import http.server
import subprocess
import sys
import textwrap
import threading
import time

import pytest
import ray
from test_submit import free_port

from kdray.runtime.session import ClusterError, gather, ray_session, run_bounded


# ------------------------------------------------------------------------------------ joining a cluster
def test_a_dashboard_url_is_refused_naming_the_gcs_address(ray_local):
    # Refused even beside a running Ray, which ray_session would otherwise reuse, ignoring the address.
    with pytest.raises(ClusterError, match=r"http://127\.0\.0\.1:8265 .* is a dashboard URL.*GCS address HOST:PORT"):
        with ray_session("http://127.0.0.1:8265"):
            pass


@pytest.fixture
def web_server():
    """An HTTP server on loopback, like a dashboard: its port, while it runs."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


def test_joining_a_port_that_is_no_cluster_fails_at_once_naming_the_fix(web_server):
    """Ray retried such addresses for minutes, silently. In a fresh process: the test session's Ray
    would be reused instead."""
    script = textwrap.dedent("""
        import sys
        from kdray.runtime.session import ClusterError, ray_session

        for address in sys.argv[1:]:
            try:
                with ray_session(address):
                    print("joined", address)
            except ClusterError as error:
                print(error)
    """)
    nothing, web = f"127.0.0.1:{free_port()}", f"127.0.0.1:{web_server}"
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-c", script, nothing, web], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert time.monotonic() - started < 60
    refused, not_gcs = done.stdout.splitlines()
    assert refused.startswith(f"no Ray cluster answers at {nothing} (") and "cluster/local.sh start" in refused
    assert not_gcs.startswith(f"{web} is not a Ray cluster's GCS (it answers, but not in gRPC: a dashboard")
    assert "give the head's GCS address" in not_gcs


# ------------------------------------------------------------------------------------ task runners
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
        from kdray.runtime.session import gather

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
