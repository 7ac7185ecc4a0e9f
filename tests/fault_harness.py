"""Driver faults for a whole `kdray run`: start it as a child process, wait until the run reaches a
chosen point on storage, SIGKILL the driver there, and check that its Ray went with it.

Used by tests/test_faults.py, tests/test_train.py, tests/test_specialists.py and benchmarks/faults.py.
The other faults, a killed Ray Train worker or specialist actor, go through kdray's one hook
(`kdray.runtime.faults`, the KDRAY_FAIL_AT_EPOCH variable): `failing_at_epoch` sets it for the runs
started inside, and `train_event_recorder` records what Ray Train made of the failure.

`start_run` starts `python -m kdray run` in a new session (setsid), so the driver's pid is the
session id of every process the in-process local Ray starts for it: GCS, raylet, dashboard and
workers (Ray gives workers their own process groups, but they keep the session). After a kill,
`session_processes` lists exactly those, and nothing of another Ray instance on the machine. Ray's
fate-sharing takes the GCS, raylet, dashboard and running workers down within seconds of the driver
(PR_SET_PDEATHSIG on what the driver starts; workers exit with their raylet); SELF_EXITING names
the few that take up to a minute. `RunProcess.kill` waits for the session to empty (or to hold only
those), then kills and reports whatever is left. Process listing reads /proc: Linux only.
"""

from __future__ import annotations

import glob
import json
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from procfs import live_processes
from ray.train import UserCallback

from kdray.runtime.faults import FAULT_ENV
from kdray.runtime.stage import read_stage_manifest
from kdray.runtime.storage import Storage
from kdray.runtime.train import TRAIN_POLL_ENV, TRAIN_POLL_S

T = TypeVar("T")

POLL_SECONDS = 0.05
TIMING_KEYS = ("seconds", "rows_per_second")  # per-epoch history values measured, not computed
TRAIN_SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train's record of the run's checkpoints
# Processes of a local Ray that outlive its killed raylet for a while, then exit on their own (Ray
# 2.60, measured): the raylet's agents see it die at once but exit only after giving up on the dead
# GCS, about 60 s later; a worker still starting up gives up on the raylet after about 25 s.
SELF_EXITING = frozenset({"ray::DashboardAgent", "ray::RuntimeEnvAgent", "python default_worker.py"})


class RunFailed(RuntimeError):
    """The run did not do what was waited for; the message ends with the tail of its output."""


def session_processes(session: int) -> dict[int, str]:
    """Live (non-zombie) processes whose session id is `session`: pid -> name (the process title
    Ray gives its processes, e.g. `ray::RayTrainWorker`, else the executable)."""
    return {pid: process.name for pid, process in live_processes().items() if process.session == session}


def _kill(pids) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@dataclass
class KillReport:
    """What killing a driver left behind. `session`: its session's processes (the driver and its
    local Ray) alive when it was killed, pid -> name; `lingering`: those still alive when the wait
    ended, which were then killed here; `waited`: seconds waited."""

    session: dict[int, str]
    lingering: dict[int, str]
    waited: float


@dataclass
class RunProcess:
    """A `kdray run` child process; its stdout and stderr go to `log` (read with `output()`)."""

    popen: subprocess.Popen
    log: Path
    started: float = field(default_factory=time.monotonic)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def describe(self, lines: int = 60) -> str:
        """The exit status (or 'running') and the last `lines` lines of output, for failure messages."""
        status = self.popen.poll()
        tail = "\n".join(self.output().splitlines()[-lines:])
        return f"kdray run (pid {self.pid}) {'running' if status is None else f'exited {status}'}; " \
               f"output {self.log}:\n{tail}"

    def wait_for(self, check: Callable[[], T | None], what: str, timeout: float) -> T:
        """Poll `check` until it returns something other than None/False; fail if the run exits first."""
        deadline = time.monotonic() + timeout
        while True:
            value = check()
            if value:
                return value
            if self.popen.poll() is not None:
                raise RunFailed(f"the run ended before {what}\n{self.describe()}")
            if time.monotonic() > deadline:
                raise RunFailed(f"no {what} after {timeout:.0f}s\n{self.describe()}")
            time.sleep(POLL_SECONDS)

    def kill(self, settle: float = 20.0) -> KillReport:
        """SIGKILL the driver alone (as an OOM killer would), then wait up to `settle` seconds for the
        rest of its session, its local Ray, to exit; kill what is left and report it. The wait ends
        early once only SELF_EXITING processes are left (they would go by themselves, later)."""
        session = session_processes(self.pid)
        os.kill(self.pid, signal.SIGKILL)
        self.popen.wait()
        started = time.monotonic()
        left = session_processes(self.pid)
        while left and not set(left.values()) <= SELF_EXITING and time.monotonic() - started < settle:
            time.sleep(0.2)
            left = session_processes(self.pid)
        _kill(left)
        return KillReport(session=session, lingering=left, waited=round(time.monotonic() - started, 2))

    def finish(self, timeout: float) -> str:
        """Wait for the run to exit; its output if it succeeded, else RunFailed."""
        try:
            code = self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            raise RunFailed(f"the run did not finish within {timeout:.0f}s\n{self.describe()}") from None
        if code != 0:
            raise RunFailed(f"the run failed\n{self.describe()}")
        return self.output()

    def cleanup(self) -> None:
        """Kill the driver if it still runs and every process left in its session (test teardown)."""
        if self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait()
        _kill(session_processes(self.pid))

    def __enter__(self) -> RunProcess:
        return self

    def __exit__(self, *exc) -> None:
        self.cleanup()


def start_run(config: str, storage_path: str, run_name: str, log: str | Path, *options: str,
              env: dict[str, str] | None = None) -> RunProcess:
    """Start `python -m kdray run CONFIG --storage-path S --run-name R --no-progress OPTIONS...` in
    a new session, with a local Ray of its own (RAY_ADDRESS removed from its environment)."""
    environment = {key: value for key, value in (env or os.environ).items() if key != "RAY_ADDRESS"}
    command = [sys.executable, "-m", "kdray", "run", config, "--storage-path", storage_path,
               "--run-name", run_name, "--no-progress", *options]
    log = Path(log)
    with open(log, "wb") as out:
        popen = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                 env=environment, start_new_session=True)
    return RunProcess(popen, log)


# ------------------------------------------------------------------------------------ where a run is
def stage_lines(output: str) -> dict[str, str]:
    """stage -> what the runner said of it last: 'running', 'up to date' or 'done'."""
    said = {}
    for line in output.splitlines():
        if line.startswith("[kdray] ") and ": " in line:
            stage, rest = line[len("[kdray] "):].split(": ", 1)
            for state in ("up to date", "running", "done"):
                if rest.startswith(state):
                    said[stage] = state
    return said


def training_snapshot(run_dir: str | Path, stage: str, name: str) -> dict[str, Any] | None:
    """Ray Train's checkpoint record of training run `name` in `stage`'s scratch directory
    (RUN/_work/STAGE-FINGERPRINT/NAME), once it records a checkpoint; None before."""
    for path in glob.glob(os.path.join(run_dir, "_work", f"{stage}-*", name, TRAIN_SNAPSHOT)):
        try:
            snapshot = json.loads(Path(path).read_text())
        except (OSError, ValueError):  # not there any more, or being written
            continue
        if snapshot.get("latest_checkpoint_result"):
            return {**snapshot, "path": os.path.dirname(path)}
    return None


def checkpointed_history(snapshot: dict[str, Any]) -> list[dict[str, float]]:
    """The training history saved in the latest checkpoint a snapshot records: the epochs a resumed
    run restores instead of training again."""
    import torch

    from kdray.runtime.train import CHECKPOINT_FILE

    directory = snapshot["latest_checkpoint_result"]["checkpoint_dir_name"]
    state = torch.load(os.path.join(snapshot["path"], directory, CHECKPOINT_FILE), map_location="cpu",
                       weights_only=True)
    return state["history"]


def stage_manifests(run_dir: str | Path) -> dict[str, dict[str, Any]]:
    """stage -> its manifest, for every stage of the run that has finished."""
    run = Storage(str(run_dir))
    names = [name for name in run.list() if run.is_dir(name)] if run.exists() else []
    manifests = {name: read_stage_manifest(run, name) for name in names}
    return {name: manifest for name, manifest in manifests.items() if manifest}


# ------------------------------------------------------------------------------------ the sequence
@dataclass
class DriverKill:
    """One `kdray run` killed: the point waited for, what its Ray left, its output and wall time,
    the stage manifests on storage just after, and, killed inside a training run, the history its
    latest checkpoint holds (the epochs the next run restores instead of training)."""

    point: str
    report: KillReport
    output: str
    seconds: float
    manifests: dict[str, dict[str, Any]]
    restorable: list[dict[str, float]] | None = None


@dataclass
class KillSequence:
    kills: list[DriverKill]
    output: str  # the finishing run's
    seconds: float  # the finishing run's wall time
    manifests: dict[str, dict[str, Any]]  # after it


def kill_inside_and_between(config: str, storage_path: str, run_name: str, logs: str | Path, *,
                            stage: str = "teacher", training: str = "member-00", between: str = "transfer",
                            timeout: float = 600.0) -> KillSequence:
    """The driver faults as one sequence of `kdray run CONFIG` processes on one run directory:

    1. killed inside `stage`, as soon as its training run `training` has recorded a checkpoint;
    2. run again, killed as soon as stage `between` has written its manifest;
    3. run again to the end.

    `storage_path` is a local directory (the runs' files are watched there) and `logs` one for the
    three runs' output. Each wait fails (RunFailed, with the run's
    output) after `timeout` seconds or if the run exits first. The runs' Ray Train polls every
    kdray.runtime.train.TRAIN_POLL_S whatever this environment says (Ray Train registers a checkpoint when
    it polls; at its default 2 s several fast epochs' checkpoints would be registered at once), so
    the first kill lands after one epoch's checkpoint, not after a batch of them.
    """
    env = {**os.environ, TRAIN_POLL_ENV: str(TRAIN_POLL_S)}
    run_dir = os.path.join(storage_path, run_name)
    logs = Path(logs)
    kills = []

    def killed(number: int, point: str, check: Callable[[], Any], restore: bool) -> None:
        with start_run(config, storage_path, run_name, logs / f"run-{number}.log", env=env) as process:
            found = process.wait_for(check, point, timeout)
            seconds = time.monotonic() - process.started
            report = process.kill()
        restorable = checkpointed_history(training_snapshot(run_dir, stage, training) or found) if restore else None
        kills.append(DriverKill(point, report, process.output(), round(seconds, 2), stage_manifests(run_dir),
                                restorable))

    killed(1, f"a checkpoint of {stage}/{training}", lambda: training_snapshot(run_dir, stage, training), True)
    killed(2, f"{between}'s manifest", lambda: os.path.exists(os.path.join(run_dir, between, "manifest.json")), False)
    with start_run(config, storage_path, run_name, logs / "run-3.log", env=env) as process:
        output = process.finish(timeout)
        seconds = time.monotonic() - process.started
    return KillSequence(kills, output, round(seconds, 2), stage_manifests(run_dir))


# ------------------------------------------------------------------------------------ comparing runs
def differences(actual: Any, expected: Any, where: str = "", rel: float = 1e-9) -> list[str]:
    """Where two JSON-like values differ, as paths ([] when they agree); floats agree within `rel`
    (a resumed run's metrics may be summed in another order)."""
    if isinstance(expected, dict) and isinstance(actual, dict):
        if set(actual) != set(expected):
            return [f"{where or '.'}: keys {sorted(set(actual) ^ set(expected))} on one side only"]
        return [d for key in expected for d in differences(actual[key], expected[key], f"{where}.{key}", rel)]
    if isinstance(expected, list) and isinstance(actual, list):
        if len(actual) != len(expected):
            return [f"{where}: {len(actual)} items, not {len(expected)}"]
        return [d for i, (a, e) in enumerate(zip(actual, expected)) for d in differences(a, e, f"{where}[{i}]", rel)]
    if isinstance(expected, float) and isinstance(actual, (int, float)):
        same = math.isclose(actual, expected, rel_tol=rel, abs_tol=1e-12)
    else:
        same = actual == expected
    return [] if same else [f"{where}: {actual!r} != {expected!r}"]


def without_timing(history: list[dict[str, float]]) -> list[dict[str, float]]:
    """A training history less its timings (TIMING_KEYS), the only values a resumed run may change."""
    return [{key: value for key, value in entry.items() if key not in TIMING_KEYS} for entry in history]


def weight_differences(actual: Storage, expected: Storage, bundle: str) -> list[str]:
    """The parameters of `bundle` that are not bitwise equal in the two stage directories."""
    import torch

    from kdray.runtime.artifacts import load_bundle

    first, _ = load_bundle(actual, bundle)
    second = load_bundle(expected, bundle)[0].state_dict()
    return [name for name, tensor in first.state_dict().items()
            if name not in second or not torch.equal(tensor, second[name])]


# ------------------------------------------------------------------------------------ worker and actor faults
@contextmanager
def failing_at_epoch(epoch: int) -> Iterator[None]:
    """Runs started inside lose a worker or actor in `epoch` (kdray forwards the variable to them)."""
    before = os.environ.get(FAULT_ENV)
    os.environ[FAULT_ENV] = str(epoch)
    try:
        yield
    finally:
        if before is None:
            del os.environ[FAULT_ENV]
        else:
            os.environ[FAULT_ENV] = before


def train_event_recorder(path: str):
    """A Ray Train callback that appends every report and failure the run's controller sees to the
    JSON-lines file `path` (`read_events`). The class is made here, inside a function, so that it
    pickles by value: the controller's process cannot import this test module."""

    class TrainEvents(UserCallback):
        def _log(self, event: dict) -> None:
            with open(path, "a") as file:
                file.write(json.dumps(event) + "\n")

        def after_report(self, run_context, metrics, checkpoint):
            self._log({"event": "report", "epoch": int(metrics[0]["epoch"]), "rows": int(metrics[0]["rows"])})

        def after_exception(self, run_context, worker_exceptions):
            self._log({"event": "failure", "ranks": sorted(worker_exceptions),
                       "error": " ".join(type(e).__name__ for e in worker_exceptions.values())})

    return TrainEvents()


def read_events(path: str) -> list[dict]:
    with open(path) as file:
        return [json.loads(line) for line in file]
