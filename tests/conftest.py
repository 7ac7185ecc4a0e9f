"""Shared fixtures: one real local Ray for the whole session (2 CPUs, as on the CI machine), and
what makes a failure readable where the suite runs unattended (CI)."""

import os
import shutil
import sys
import tempfile
import threading
from types import SimpleNamespace

import pytest
import ray

# Ray fails an object creation that needs spilling once the disk holding its session is 95% full
# by its count (1 - free / size: this workplace's shared disk reads 72% full with 71 GB free); the
# suite writes a few hundred MB, so only a truly full disk should fail it.
os.environ.setdefault("RAY_local_fs_capacity_threshold", "0.995")

WATCHDOG_LEAD_S = 30  # Ray's state is printed this long before pytest-timeout ends a hung test
_SHOWN: set[str] = set()  # failure texts already printed (a module fixture's error repeats per test)


@pytest.fixture(scope="session")
def ray_local():
    if not ray.is_initialized():
        # address="local": a fresh instance even if a `ray start` head runs on this machine.
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def distilled_run(ray_local, tmp_path_factory):
    """tiny_data.tiny_run_config's run, finished once per session, interrupted between stages on the
    way: the data and teacher stages first (`first`), then the whole pipeline (`full`), which must
    not redo them. Tests read it; one that changes a run works on a copy (tiny_data.copy_run)."""
    from tiny_data import tiny_run_config, write_blobs

    from kdray.config import config_from_dict
    from kdray.pipeline import pipeline_stages, run_pipeline
    from kdray.runtime.storage import Storage

    data, storage = str(tmp_path_factory.mktemp("tiny-data")), str(tmp_path_factory.mktemp("tiny-runs"))
    write_blobs(data)
    raw = tiny_run_config(data, storage)
    config, run = config_from_dict(raw), Storage(storage).child("tiny")
    first = run_pipeline(pipeline_stages()[:2], config, run, progress=False, log=lambda _: None)
    full = run_pipeline(pipeline_stages(), config, run, progress=False, log=lambda _: None)
    return SimpleNamespace(raw=raw, config=config, run=run, first=first, full=full)


def pytest_sessionstart(session):
    """The machine in one line, shown under -q too (a report header is not): CI logs say what it had."""
    terminal = session.config.pluginmanager.get_plugin("terminalreporter")
    usage = shutil.disk_usage(tempfile.gettempdir())
    if terminal is not None:
        terminal.write_line(f"kdray tests: {os.cpu_count()} CPUs; {tempfile.gettempdir()} {usage.free / 2**30:.1f} GiB "
                            f"free of {usage.total / 2**30:.0f} GiB: {100 * (1 - usage.free / usage.total):.0f}% full as Ray "
                            "counts it (free ÷ size; above 95% Ray's default fails objects that need spilling)")


def _ray_state() -> str:
    """What holds the session's resources: a hang's usual cause is a run that never ended."""
    from ray.util import placement_group_table

    groups = [f"  {group['name'] or group['placement_group_id'][:8]} {group['state']} {group['bundles']}"
              for group in placement_group_table().values() if group["state"] != "REMOVED"]
    return "\n".join([f"available {ray.available_resources()}", f"of {ray.cluster_resources()}",
                      "placement groups:", *(groups or ["  none"])])


_WATCHDOGS: dict[str, threading.Timer] = {}


def pytest_timeout_set_timer(item, settings):
    """pytest-timeout's thread method ends the whole run on a hang (a signal cannot interrupt a
    blocking ray.get), with no report: print Ray's state just before, while it can be read. The
    timeout is pytest-timeout's own (ini, command line or marker); returning None lets it arm."""
    if settings.timeout > WATCHDOG_LEAD_S:
        watchdog = threading.Timer(settings.timeout - WATCHDOG_LEAD_S, _print_hang, (item.nodeid, settings.timeout))
        watchdog.daemon = True
        watchdog.start()
        _WATCHDOGS[item.nodeid] = watchdog


def pytest_timeout_cancel_timer(item):
    watchdog = _WATCHDOGS.pop(item.nodeid, None)
    if watchdog is not None:
        watchdog.cancel()


def _print_hang(nodeid: str, timeout: float) -> None:
    state = _ray_state() if ray.is_initialized() else "Ray is not running"
    print(f"\n{nodeid} is still running {WATCHDOG_LEAD_S} s before its {timeout:.0f} s timeout:\n{state}",
          file=sys.stderr, flush=True)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Print a failure when it happens, not only in the summary at the end: when CI stops a run
    that hangs later, the end never comes."""
    outcome = yield
    report = outcome.get_result()
    terminal = item.config.pluginmanager.get_plugin("terminalreporter")
    if not report.failed or terminal is None:
        return
    state = _ray_state() if ray.is_initialized() else None
    if state is not None:
        report.sections.append(("ray at failure", state))
    terminal.write_line("")
    terminal.write_line(f"FAILED {report.nodeid} ({report.when}), as it happened:", red=True)
    tail = "\n".join(report.longreprtext.splitlines()[-30:])
    if tail in _SHOWN:
        terminal.write_line("    the same error as printed above")
        return
    _SHOWN.add(tail)
    for line in [*tail.splitlines(), *([state] if state else [])]:
        terminal.write_line("    " + line)
