"""`kdray run` as a Ray job on a cluster, submitted through the head's Jobs API (the dashboard).

The job runs ``python -m kdray run [CONFIG] ...`` in a copy of a local working directory that Ray
uploads on submission (``runtime_env["working_dir"]``): the config travels with it, and so does
kdray's own source when submitting from the repository. Virtual environments, git history, build
output and earlier runs stay behind. The job's Python needs kdray's dependencies: a head started
from the project's virtualenv, an image with kdray installed, or `pip` requirements Ray installs
for the job.
"""

from __future__ import annotations

import asyncio
import logging
import os
import posixpath
import shlex
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kdray.config import Config, ConfigError

# gitignore-style patterns; Ray also honours the working directory's .gitignore and .rayignore.
WORKING_DIR_EXCLUDES = (".git", ".venv", "venv", ".tox", "runs", "build", "dist", "__pycache__",
                        "*.egg-info", ".pytest_cache", ".ipynb_checkpoints")
# Keys and cloud credentials a project directory may hold: the upload is stored on the cluster, where
# its jobs and whoever reads the head's session files see it. No trailing "/": a directory matched by
# name is skipped whole.
SECRET_EXCLUDES = (".env*", "*.pem", "*.key", "id_rsa*", "id_ed25519*", ".netrc", ".aws", "**/.config/gcloud",
                   "credentials*.json", ".ray")
_ADDRESS_VARIABLES = ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS")


class SubmitError(Exception):
    """The job could not be submitted or followed; the message says what to change."""


@dataclass(frozen=True)
class SubmittedJob:
    client: Any  # ray.job_submission.JobSubmissionClient
    job_id: str  # the submission id, what `ray job logs/status/stop` take
    dashboard: str  # the dashboard's HTTP address, e.g. http://127.0.0.1:8265

    @property
    def link(self) -> str:
        return f"{self.dashboard}/#/jobs/{self.job_id}"


# ------------------------------------------------------------------------------------ the job
def check_job_config(config: Config) -> None:
    """What a local run accepts but a job cannot use: a relative storage path would resolve inside
    the job's temporary copy of the working directory and vanish with it."""
    location = config.storage.storage_path
    if "://" not in location and not location.startswith("~") and not os.path.isabs(location):
        raise ConfigError(f"invalid config: storage.storage_path: {location!r} is relative, and a job runs in "
                          "a temporary copy of the working directory; give an absolute path the cluster can "
                          "write to, or a URI (s3://, gs://)")


def config_in_working_dir(config: str, working_dir: str) -> str:
    """CONFIG as a POSIX path relative to `working_dir`, the job's current directory on the cluster."""
    relative = os.path.relpath(os.path.abspath(config), os.path.abspath(working_dir))
    if relative == ".." or relative.startswith(".." + os.sep):
        raise SubmitError(f"config {config} is outside the working directory {working_dir}, which is all "
                          "the job gets; move it there or pass --working-dir")
    return posixpath.join(*relative.split(os.sep))


def run_entrypoint(config: str | None, options: Sequence[str] = ()) -> str:
    """The job's shell command: `python -m kdray run [CONFIG] --no-progress OPTIONS`. `python -m`
    imports kdray from the working directory first, so a job submitted from the repository runs the
    uploaded source even where an older kdray is installed."""
    return shlex.join(["python", "-m", "kdray", "run", *([config] if config else []), "--no-progress", *options])


def job_runtime_env(working_dir: str, pip: Sequence[str] = ()) -> dict[str, Any]:
    if not os.path.isdir(working_dir):
        raise SubmitError(f"working directory {working_dir} is not a directory")
    # The job's output is a log file: Ray Data's progress bars (drawn in every worker) would flood it.
    env: dict[str, Any] = {"working_dir": os.path.abspath(working_dir),
                           "excludes": [*WORKING_DIR_EXCLUDES, *SECRET_EXCLUDES],
                           "env_vars": {"RAY_DATA_DISABLE_PROGRESS_BARS": "1"}}
    if pip:
        env["pip"] = list(pip)
    return env


@dataclass(frozen=True)
class Upload:
    """What Ray uploads as a job's working directory."""

    directory: str
    files: tuple[str, ...]  # POSIX paths relative to `directory`
    size: int  # bytes, before compression
    excludes: tuple[str, ...]  # patterns, besides those of .gitignore and .rayignore files

    def describe(self) -> str:
        count = f"{len(self.files)} file{'' if len(self.files) == 1 else 's'}"
        return (f"uploading {count}, {self.size / 2**20:.2f} MiB from {self.directory} (excluded: "
                f"{', '.join(self.excludes)} and what .gitignore/.rayignore files list)")


def upload_contents(runtime_env: dict[str, Any]) -> Upload:
    """The files of `runtime_env`'s working directory that Ray uploads: found with Ray's own walk and
    matching (its default excludes, then runtime_env's, then .gitignore and .rayignore files as it
    meets them), so what is reported is what is sent."""
    from ray._private import ray_constants
    from ray._private.runtime_env.packaging import _dir_travel, _get_excludes

    root = Path(runtime_env["working_dir"]).absolute()
    excludes = [*ray_constants.get_runtime_env_default_excludes(), *runtime_env.get("excludes", [])]
    include_gitignore = os.environ.get(ray_constants.RAY_RUNTIME_ENV_IGNORE_GITIGNORE, "0") != "1"
    files: list[Path] = []

    def collect(path: Path) -> None:  # Ray's zip also keeps empty directories, which hold nothing
        if path.is_file():
            files.append(path)

    # Ray's walk logs each ignore file it meets at INFO; its upload says so itself.
    _dir_travel(root, [_get_excludes(root, excludes)], collect, include_gitignore=include_gitignore,
                logger=logging.getLogger(__name__))
    return Upload(str(root), tuple(sorted(path.relative_to(root).as_posix() for path in files)),
                  sum(path.stat().st_size for path in files), tuple(dict.fromkeys(excludes)))


# ------------------------------------------------------------------------------------ the cluster
def connect(address: str | None):
    """A JobSubmissionClient for `address` (the dashboard's http://HOST:8265, or a Ray address)."""
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    # Ray's client lets these variables override the address it is given; refuse a silent swap.
    for variable in _ADDRESS_VARIABLES:
        value = os.environ.get(variable)
        if address and value and value.rstrip("/") != address.rstrip("/"):
            raise SubmitError(f"--address {address} but {variable}={value}, which Ray's job client would use "
                              f"instead; unset {variable} or pass the same address")
        if value:
            break
    try:
        return JobSubmissionClient(address)
    except AuthenticationError as error:
        raise SubmitError(f"{error}\nexport RAY_AUTH_MODE=token and the cluster's token (RAY_AUTH_TOKEN, or the "
                          "file ~/.ray/auth_token; `ray get-auth-token` prints it on the head)") from None
    except (ConnectionError, RuntimeError, ValueError) as error:
        raise SubmitError(f"cannot reach the Ray Jobs API at {address or '(auto-detected local Ray)'}: {error}\n"
                          "start a head with its dashboard (cluster/local.sh start), or forward its "
                          "dashboard port, and pass --address http://HOST:8265") from None


def _print_now(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()  # live even when stdout is a pipe (`| tee`, a CI log)


def submit_run(address: str | None, entrypoint: str, runtime_env: dict[str, Any], run_name: str,
               write: Callable[[str], Any] = _print_now) -> SubmittedJob:
    """Upload the working directory, saying what it holds, and submit; returns at once (see `follow`)."""
    client = connect(address)
    write(f"[kdray] {upload_contents(runtime_env).describe()}\n")
    submission_id = f"kdray-{run_name}-{uuid.uuid4().hex[:8]}"
    try:
        job_id = client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env, submission_id=submission_id,
                                   metadata={"kdray_run_name": run_name})
    except (ConnectionError, RuntimeError, ValueError) as error:
        raise SubmitError(f"submitting the job failed: {error}") from None
    return SubmittedJob(client=client, job_id=job_id, dashboard=client.get_address().rstrip("/"))


def follow(job: SubmittedJob, write: Callable[[str], Any] = _print_now, poll_seconds: float = 1.0):
    """Stream the job's logs until it ends; returns its final JobDetails (`.status`, `.message`)."""
    from aiohttp import ClientError

    async def tail() -> None:
        async for lines in job.client.tail_job_logs(job.job_id):
            write(lines)

    try:
        asyncio.run(tail())
    except (RuntimeError, OSError, ClientError) as error:  # the log stream broke off; the job may be fine
        write(f"[kdray] log stream ended early ({error}); waiting for the job's status\n")
    try:
        while not (info := job.client.get_job_info(job.job_id)).status.is_terminal():
            time.sleep(poll_seconds)
    except (RuntimeError, OSError) as error:
        raise SubmitError(f"lost the cluster while following job {job.job_id}: {error}\n"
                          f"ray job status --address {job.dashboard} {job.job_id} asks again") from None
    return info
