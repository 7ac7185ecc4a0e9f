"""Where kdray meets a Ray cluster: connecting (or starting one in-process) and collecting results.

Stages schedule work with `@ray.remote`, `TorchTrainer` and `Tuner`; this module only decides which
cluster they run on and turns a failed remote call back into the exception its code raised, so a
user sees `DatasetError: shard ... is truncated` rather than a Ray traceback wrapper.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import ray


@contextmanager
def ray_session(address: str | None = None, num_cpus: int | None = None, quiet: bool = True,
                progress: bool = True) -> Iterator[None]:
    """Use the running Ray, the cluster at `address`/RAY_ADDRESS, or start a local one in-process."""
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = progress
    if ray.is_initialized():
        yield
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    # A local Ray gets its dashboard (on 127.0.0.1 only) so Jobs, Train and Tune can be watched;
    # worker logs stay out of the terminal unless asked for: kdray prints its own progress.
    options: dict[str, Any] = {"log_to_driver": not quiet, "include_dashboard": True,
                               "dashboard_host": "127.0.0.1"} if address is None else {}
    if address is None and num_cpus is not None:
        options["num_cpus"] = num_cpus
    # "local": a new in-process Ray even when a `ray start` cluster runs on this machine (plain
    # ray.init() would join that one); joining a cluster is what --address/RAY_ADDRESS are for.
    ray.init(address=address or "local", **options)
    if quiet:
        # Ray Data logs every execution plan at INFO: noise next to kdray's own stage lines.
        logging.getLogger("ray.data").setLevel(logging.WARNING)
    try:
        yield
    finally:
        ray.shutdown()


def unwrap_remote_error(error: ray.exceptions.RayTaskError) -> BaseException:
    """The exception the remote code raised (RayTaskError keeps it as `.cause`)."""
    cause = getattr(error, "cause", None)
    return cause if isinstance(cause, BaseException) else error


# Left free for Ray Data's read tasks when sizing how many training runs go at once: a run's
# workers wait on its reads, so runs holding every CPU would wait forever.
DATA_RESERVE_CPUS = 1.0


def runs_that_fit(cpus_per_run: float, gpus_per_run: float = 0.0) -> int:
    """How many runs needing `cpus_per_run` CPUs and `gpus_per_run` GPUs the cluster holds at once
    beside DATA_RESERVE_CPUS; at least one."""
    cluster = ray.cluster_resources()
    fits = int(max(0.0, cluster.get("CPU", 1.0) - DATA_RESERVE_CPUS) // cpus_per_run) if cpus_per_run > 0 else 1 << 30
    if gpus_per_run > 0:
        fits = min(fits, int(cluster.get("GPU", 0.0) // gpus_per_run))
    return max(1, fits)


WAIT_TICK_S = 1.0  # how often run_bounded calls `on_wait` while no task finishes


def gather(refs: list[ray.ObjectRef], desc: str = "", progress: bool = False, unit: str = "task") -> list[Any]:
    """`ray.get` in completion order with a progress bar; re-raises the remote exception itself.
    Results come back in the order of `refs`."""
    return run_bounded([lambda ref=ref: ref for ref in refs], None, desc, progress, unit)


def run_bounded(submits: Sequence[Callable[[], ray.ObjectRef]], max_in_flight: int | None = None, desc: str = "",
                progress: bool = False, unit: str = "task", on_wait: Callable[[], None] | None = None) -> list[Any]:
    """Call `submits` in order (each submits one Ray task and returns its ref), keeping at most
    `max_in_flight` running (None: all at once), so a job of thousands of tasks holds a bounded
    number of results in the object store. Results come back in the order of `submits`, collected
    as they finish with a progress bar; a failure re-raises the remote exception itself and submits
    nothing more. Tasks already running are left to finish and their results dropped: `ray.cancel`
    on a task whose dispatch races its cancellation aborts the driver in Ray 2.60 ("Check failed:
    it != submissible_tasks_.end() Tried to complete task that was not pending",
    ray-project/ray#54846), and at most `max_in_flight` tasks are running. `on_wait` (e.g. a
    finer-grained progress display) is called every WAIT_TICK_S while tasks run."""
    from tqdm.auto import tqdm

    limit = max_in_flight or len(submits)
    results: list[Any] = [None] * len(submits)
    waiting = list(reversed(range(len(submits))))  # popped from the end: submitted in order
    running: dict[ray.ObjectRef, int] = {}
    with tqdm(total=len(submits), desc=desc, disable=not progress, unit=unit) as bar:
        try:
            while waiting or running:
                while waiting and len(running) < limit:
                    index = waiting.pop()
                    running[submits[index]()] = index
                finished, _ = ray.wait(list(running), num_returns=1, timeout=WAIT_TICK_S if on_wait else None)
                if on_wait is not None:
                    on_wait()
                if not finished:
                    continue
                results[running.pop(finished[0])] = ray.get(finished[0])
                bar.update(1)
        except ray.exceptions.RayTaskError as error:
            raise unwrap_remote_error(error) from None
    return results
