"""Where kdray meets a Ray cluster: connecting (or starting one in-process) and collecting results.

Stages schedule work with `@ray.remote`, `TorchTrainer` and `Tuner`; this module only decides which
cluster they run on and turns a failed remote call back into the exception its code raised, so a
user sees `DatasetError: shard ... is truncated` rather than a Ray traceback wrapper.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import ray


class ClusterError(Exception):
    """kdray could not start or join a Ray cluster; the message says what to change."""


# Where a user finds the address to join, named in every error about one.
_LOCAL_HEAD = "cluster/local.sh start prints it: 127.0.0.1:RAY_PORT, 6379 by default"
_TOKEN_FIX = ("if it uses token authentication (cluster/local.sh's default), export RAY_AUTH_MODE=token and the "
              "cluster's token (RAY_AUTH_TOKEN or ~/.ray/auth_token; `ray get-auth-token` on the head prints it)")
CONNECT_TIMEOUT_S = 5.0  # for the probe of a head's GCS port: a live one answers in milliseconds
_HTTP2_OPENING = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"  # the client connection preface, RFC 9113 3.4
_HTTP2_SETTINGS = 0x4  # the frame type a server's preface opens with


@contextmanager
def ray_session(address: str | None = None, num_cpus: int | None = None, quiet: bool = True,
                progress: bool = True) -> Iterator[None]:
    """Use the running Ray, the cluster at `address`/RAY_ADDRESS (its GCS, HOST:PORT), or start a
    local one in-process. A cluster that cannot be joined raises ClusterError at once."""
    import ray.data

    address = address or os.environ.get("RAY_ADDRESS") or None
    if address == "local":  # Ray's name for a new in-process instance: what no address starts
        address = None
    endpoint = _gcs_endpoint(address) if address else None  # a malformed address fails even beside a running Ray
    ray.data.DataContext.get_current().enable_progress_bars = progress
    if ray.is_initialized():
        yield
        return
    if endpoint is not None:
        _check_gcs(address, *endpoint)
    with _environment_for(address, endpoint):
        _start_or_join(address, num_cpus, quiet)
        _protect_token_file()
        if quiet:
            # Ray Data logs every execution plan at INFO: noise next to kdray's own stage lines.
            logging.getLogger("ray.data").setLevel(logging.WARNING)
        try:
            yield
        finally:
            ray.shutdown()


def _start_or_join(address: str | None, num_cpus: int | None, quiet: bool) -> None:
    from ray.exceptions import AuthenticationError

    # A local Ray gets its dashboard (on 127.0.0.1 only) so Jobs, Train and Tune can be watched;
    # worker logs stay out of the terminal unless asked for: kdray prints its own progress.
    options: dict[str, Any] = {"log_to_driver": not quiet, "include_dashboard": True,
                               "dashboard_host": "127.0.0.1"} if address is None else {}
    if address is None and num_cpus is not None:
        options["num_cpus"] = num_cpus
    try:
        # "local": a new in-process Ray even when a `ray start` cluster runs on this machine (plain
        # ray.init() would join that one); joining a cluster is what --address/RAY_ADDRESS are for.
        ray.init(address=address or "local", **options)
    except (ConnectionError, AuthenticationError) as error:
        if address is None:  # starting Ray here failed: Ray's own error says why
            raise
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ClusterError(f"cannot join the Ray cluster at {address}: {reason}; {_TOKEN_FIX}") from None


def _gcs_endpoint(address: str) -> tuple[str, int] | None:
    """(host, port) of a HOST:PORT cluster address; None for the forms Ray resolves itself ("auto",
    ray://). A dashboard URL or a missing port is refused, naming the address to give instead."""
    scheme = address.split("://", 1)[0].lower() if "://" in address else ""
    if scheme in ("http", "https"):
        raise ClusterError(f"Ray address {address} (--address or RAY_ADDRESS) is a dashboard URL, what `kdray "
                           f"submit` takes; this command joins the cluster itself: give its GCS address HOST:PORT "
                           f"({_LOCAL_HEAD})")
    if scheme or address == "auto":
        return None
    parts = urlsplit("//" + address)
    try:
        port = parts.port
    except ValueError:  # not a number, or out of range
        port = None
    if not parts.hostname or port is None:
        raise ClusterError(f"Ray address {address} (--address or RAY_ADDRESS) is not HOST:PORT; give the head's GCS "
                           f"address ({_LOCAL_HEAD})")
    return parts.hostname, port


def _is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name
        return False


def _check_gcs(address: str, host: str, port: int) -> None:
    """Ray retries an address that is not a cluster's GCS for minutes, silently. A refused
    connection says so in milliseconds, and so does the answer to HTTP/2's opening: a GCS speaks
    gRPC, whose server opens with a SETTINGS frame; a dashboard answers "HTTP/1.0 400"."""
    try:
        probe = socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S)
    except OSError as error:
        raise ClusterError(f"no Ray cluster answers at {address} ({error.strerror or error}): start its head "
                           f"({_LOCAL_HEAD}) or give the address of a running one") from None
    with probe:
        answer = _first_bytes(probe, _HTTP2_OPENING, 9)  # 9: an HTTP/2 frame header
    if len(answer) == 9 and answer[3] != _HTTP2_SETTINGS:
        raise ClusterError(f"{address} is not a Ray cluster's GCS (it answers, but not in gRPC: a dashboard or "
                           f"another web server?): give the head's GCS address ({_LOCAL_HEAD})")


def _first_bytes(connection: socket.socket, request: bytes, count: int) -> bytes:
    """Up to `count` bytes of the answer to `request`; fewer if the peer closes or stays silent."""
    answer = b""
    try:
        connection.sendall(request)
        while len(answer) < count and (chunk := connection.recv(count - len(answer))):
            answer += chunk
    except OSError:  # silent or reset: ray.init finds out what it is
        pass
    return answer


def _environment_for(address: str | None, endpoint: tuple[str, int] | None):
    """What Ray needs exported for the session: single-machine settings unless the cluster is elsewhere."""
    if address is None:
        return _single_machine({})
    if endpoint is not None and _is_loopback(endpoint[0]):
        return _single_machine(_loopback_join_settings())
    return nullcontext()  # another machine's cluster: Ray's own settings


def _loopback_join_settings() -> dict[str, str]:
    """Environment for joining a head on 127.0.0.1, leaving out what the user has set."""
    from ray._raylet import AuthenticationTokenLoader

    # Ray's patience for a head that is still starting (20 tries, 1 s apart) would only delay the
    # error about a refused token: a head on this machine that listens (see _check_gcs) is up.
    settings = {"RAY_gcs_server_port_wait_time_s": "2"}
    # Ray sends its token to an address it is given only under RAY_AUTH_MODE=token; a head on this
    # machine takes this machine's token, as Ray itself assumes for a local cluster it finds alone.
    if AuthenticationTokenLoader.instance().has_token(ignore_auth_mode=True):
        settings["RAY_AUTH_MODE"] = "token"
    return {name: value for name, value in settings.items() if name not in os.environ}


@contextmanager
def _single_machine(settings: dict[str, str]) -> Iterator[None]:
    """Ray told, for the session, that its cluster is this machine alone, with `settings` exported.

    On Linux Ray swaps 127.0.0.1 for the machine's network address so that other nodes could reach
    it: an in-process Ray then opens its ports on every interface, and a driver dials a loopback
    head at an address it does not listen on, retrying for minutes. RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
    (what Ray assumes on macOS) keeps 127.0.0.1; Ray reads it once, on import, so its module copy
    is set too, and the processes it starts inherit the variable. RayConfig (C++) reads RAY_*
    variables when initialised: re-initialised here, as Ray does when it enables token auth itself.
    """
    from ray._private import ray_constants
    from ray._raylet import Config

    settings = {ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR: "0", **settings}
    saved = {name: os.environ.get(name) for name in settings}
    saved_flag = ray_constants.ENABLE_RAY_CLUSTER
    os.environ.update(settings)
    ray_constants.ENABLE_RAY_CLUSTER = False
    Config.initialize("")
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        ray_constants.ENABLE_RAY_CLUSTER = saved_flag
        Config.initialize("")


def _protect_token_file() -> None:
    """Ray writes its token file with the process's umask, readable by every user by default, and
    whoever holds the token can run code on the cluster: make it the owner's alone."""
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
    try:
        status = path.stat()
        if status.st_uid == os.getuid() and status.st_mode & 0o077:
            path.chmod(0o600)
    except FileNotFoundError:
        pass


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
