"""`kdray submit` and `ray job submit` against a real Ray head that cluster/local.sh starts on
127.0.0.1 (own temp dir, free ports, own token): a job runs a tiny pipeline and leaves every stage's
artifacts; the upload is what submit reports, without virtualenvs, runs or secrets; the head listens on
loopback only and keeps its token file private; a driver here joins it by its loopback address; a
failed job exits 1; bad input fails before anything is uploaded; stopping the head ends its processes
and spares the test session's own Ray."""

from __future__ import annotations

import ipaddress
import json
import os
import re
import secrets
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest
import ray
import yaml

from kdray.cli import build_parser, main
from kdray.submit import job_runtime_env, run_entrypoint, upload_contents

REPO = Path(__file__).resolve().parents[1]
LOCAL_SH = REPO / "cluster" / "local.sh"
BIN = Path(sys.executable).parent  # the virtualenv's bin: python, ray, kdray
STAGES = ("data", "teacher", "transfer", "student", "evaluate", "report")
SECRETS = (".env", "secret.pem", "id_rsa", ".aws/credentials", "credentials-prod.json", ".ray/auth_token")

# As small as a full pipeline gets: Ray start-up, not the data, sets the time.
TINY = """\
data:
  synth: {rows: 200, validation_rows: 40, test_rows: 40, classes: 4, groups: 2, dim: 5, shards: 1}
teacher:
  model: {name: mlp, hidden: [8]}
  train: {epochs: 1, batch_size: 64}
distill:
  student: {name: mlp, hidden: [4]}
  train: {epochs: 1, batch_size: 64}
  baseline: false
resources: {cpus_per_worker: 0.5}
"""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# ------------------------------------------------------------------------------------ processes
def _process_table() -> list[tuple[int, int, str]]:
    rows = subprocess.run(["ps", "-A", "-o", "pid=,ppid=,stat="], capture_output=True, text=True, check=True)
    fields = (line.split()[:3] for line in rows.stdout.splitlines())
    return [(int(pid), int(ppid), state) for pid, ppid, state in fields]


def process_tree(root: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for pid, ppid, _ in _process_table():
        children.setdefault(ppid, []).append(pid)
    tree, stack = set(), [root]
    while stack:
        pid = stack.pop()
        if pid not in tree:
            tree.add(pid)
            stack.extend(children.get(pid, []))
    return tree


def running(pids: set[int]) -> set[int]:
    """Those of `pids` still running; a zombie (exited, not yet reaped) is not."""
    return {pid for pid, _, state in _process_table() if pid in pids and not state.startswith("Z")}


def listening_addresses(pids: set[int]) -> set[str]:
    """IP addresses the processes' TCP sockets listen on (Linux: /proc)."""
    inodes = set()
    for pid in pids:
        try:
            descriptors = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in descriptors:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[len("socket:["):-1])
    addresses = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                raw = bytes.fromhex(fields[1].split(":")[0])
                words = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))  # host-order words
                address = ipaddress.ip_address(words)
                addresses.add(str(getattr(address, "ipv4_mapped", None) or address))
    return addresses


# ------------------------------------------------------------------------------------ the head
@dataclass
class Head:
    directory: Path
    env: dict[str, str]
    address: str  # the dashboard: http://127.0.0.1:PORT

    @property
    def pid(self) -> int:
        return int((self.directory / "nodes" / "head.pid").read_text())

    def local_sh(self, action: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(LOCAL_SH), action], env=self.env, capture_output=True, text=True, timeout=180)

    def job(self, job_id: str) -> dict:
        request = urllib.request.Request(f"{self.address}/api/jobs/{job_id}",
                                         headers={"Authorization": f"Bearer {self.env['RAY_AUTH_TOKEN']}"})
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.load(response)

    def uploaded_working_dirs(self) -> list[Path]:
        files = self.directory / "session_latest" / "runtime_resources" / "working_dir_files"
        return [path for path in files.glob("_ray_pkg_*") if path.is_dir()]


@pytest.fixture(scope="module")
def head():
    # Short: Ray's unix sockets live under it, and their paths may not pass ~100 characters.
    directory = Path(tempfile.mkdtemp(prefix="kdh-", dir="/tmp" if os.path.isdir("/tmp") else None))
    env = {key: value for key, value in os.environ.items() if not key.startswith("RAY_")}  # not the session's Ray
    env.update(PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}", RAY=str(BIN / "ray"), PYTHON=sys.executable,
               KDRAY_RAY_DIR=str(directory), RAY_PORT=str(free_port()), DASHBOARD_PORT=str(free_port()),
               NUM_CPUS="2", MULTI_NODE="0", RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32))
    # The same token in a file as a umask of 022 leaves it, readable by all, for start to make private.
    token_file = directory / "auth_token"
    token_file.write_text(env["RAY_AUTH_TOKEN"])
    token_file.chmod(0o644)
    env["RAY_AUTH_TOKEN_PATH"] = str(token_file)
    cluster = Head(directory, env, f"http://127.0.0.1:{env['DASHBOARD_PORT']}")
    try:
        started = cluster.local_sh("start")
        assert started.returncode == 0, started.stdout + started.stderr
        yield cluster
    finally:
        cluster.local_sh("stop")
        shutil.rmtree(directory, ignore_errors=True)


def project(directory: Path, config: str = TINY) -> Path:
    """A working directory to submit from: the config, and what the upload must leave behind."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "cfg.yaml").write_text(config)
    (directory / ".venv" / "lib").mkdir(parents=True)
    (directory / ".venv" / "lib" / "big.bin").write_bytes(b"\0" * 4096)
    (directory / "runs" / "old").mkdir(parents=True)
    (directory / "runs" / "old" / "manifest.json").write_text("{}")
    for secret in SECRETS:
        (directory / secret).parent.mkdir(parents=True, exist_ok=True)
        (directory / secret).write_text("not for the cluster")
    return directory


def kdray_submit(head: Head, cwd: Path, *argv: str, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kdray", "submit", *argv, "--address", head.address], cwd=cwd,
                          env=head.env, capture_output=True, text=True, timeout=timeout)


def submitted_id(out: str) -> str:
    found = re.search(r"^\[kdray\] submitted job (\S+): python -m kdray run ", out, re.M)
    assert found, out
    return found.group(1)


@pytest.fixture(scope="module")
def first_job(head, tmp_path_factory):
    work = project(tmp_path_factory.mktemp("project"))
    storage = tmp_path_factory.mktemp("storage")
    result = kdray_submit(head, work, "cfg.yaml", "--storage-path", str(storage), "--run-name", "tiny")
    return SimpleNamespace(project=work, run=storage / "tiny", storage=storage, result=result)


# ------------------------------------------------------------------------------------ against the head
def test_the_head_listens_on_loopback_only(head):
    if not Path("/proc/net/tcp").exists():
        pytest.skip("reads listening sockets from Linux's /proc")
    addresses = listening_addresses(process_tree(head.pid))
    assert addresses and addresses <= {"127.0.0.1", "::1"}, addresses


def test_submit_runs_the_pipeline_as_a_job_and_links_its_dashboard_page(head, first_job):
    result = first_job.result
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    job_id = submitted_id(result.stdout)
    assert f"[kdray] dashboard: {head.address}/#/jobs/{job_id}" in result.stdout
    assert "[kdray] finished:" in result.stdout  # the job's own output, streamed
    assert f"[kdray] job {job_id} SUCCEEDED" in result.stdout
    assert "%|" not in result.stdout  # no progress bars drawn into the log
    # With another Ray on the machine (the test session's), Ray code that finds "the" cluster without
    # an address must still find this one: local.sh gives the nodes RAY_ADDRESS.
    assert "Found multiple active Ray instances" not in result.stdout
    info = head.job(job_id)
    assert info["status"] == "SUCCEEDED" and info["entrypoint"].startswith("python -m kdray run cfg.yaml")

    run = first_job.run
    for stage in STAGES:
        assert json.loads((run / stage / "manifest.json").read_text())["outputs"] is not None, stage
    results = json.loads((run / "results.json").read_text())
    assert {"teacher", "student"} <= set(results["models"])
    assert results["models"]["student"]["test"]["rows"] == 40
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["distill"]["student"]["hidden"] == [4]  # cfg.yaml's, not the embedded default's


def test_the_upload_is_what_submit_reported_without_virtualenvs_runs_or_secrets(head, first_job):
    reported = upload_contents(job_runtime_env(str(first_job.project)))
    assert reported.files == ("cfg.yaml",)
    assert f"[kdray] uploading 1 file, 0.00 MiB from {first_job.project} (excluded: " in first_job.result.stdout
    uploads = [path for path in head.uploaded_working_dirs() if (path / "cfg.yaml").exists()]
    assert uploads, list(head.uploaded_working_dirs())
    for upload in uploads:
        assert (upload / "cfg.yaml").read_text() == TINY
        assert {path.relative_to(upload).as_posix() for path in upload.rglob("*") if path.is_file()} == {"cfg.yaml"}
        assert not any((upload / secret).exists() for secret in SECRETS)
        assert not (upload / ".venv").exists() and not (upload / "runs").exists()


def test_start_makes_the_token_file_private(head):
    mode = Path(head.env["RAY_AUTH_TOKEN_PATH"]).stat().st_mode & 0o777
    assert mode == 0o600, oct(mode)


def test_a_driver_on_this_machine_joins_the_head_by_its_loopback_address(head, first_job):
    """`kdray data inspect --address 127.0.0.1:PORT` once retried the GCS at the machine's network
    address for minutes; the token comes from the machine (here RAY_AUTH_TOKEN) without RAY_AUTH_MODE."""
    # The stage manifest gives it relative to the run.
    dataset = first_job.run / json.loads((first_job.run / "data" / "manifest.json").read_text())["outputs"]["dataset"]
    env = {name: value for name, value in head.env.items() if name != "RAY_AUTH_MODE"}
    inspected = subprocess.run([sys.executable, "-m", "kdray", "data", "inspect", str(dataset),
                                "--address", f"127.0.0.1:{head.env['RAY_PORT']}"],
                               env=env, capture_output=True, text=True, timeout=120)
    assert inspected.returncode == 0, inspected.stdout[-3000:] + inspected.stderr[-3000:]
    assert "all shards OK" in inspected.stdout


def test_ray_job_submit_runs_the_same_entrypoint_and_recomputes_nothing(head, first_job):
    run = first_job.run
    before = {stage: (run / stage / "manifest.json").read_bytes() for stage in STAGES}
    entrypoint = ["python", "-m", "kdray", "run", "cfg.yaml", "--no-progress",
                  "--storage-path", str(first_job.storage), "--run-name", "tiny"]
    result = subprocess.run([str(BIN / "ray"), "job", "submit", "--address", head.address, "--working-dir", ".",
                             "--", *entrypoint], cwd=first_job.project, env=head.env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    for stage in STAGES:
        assert re.search(rf"^{stage}\s+skipped\b", result.stdout, re.M), f"{stage} not skipped:\n{result.stdout}"
        assert (run / stage / "manifest.json").read_bytes() == before[stage]
    assert (run / "results.json").is_file()


def test_a_failed_job_exits_1_and_no_wait_returns_at_once(head, tmp_path):
    work = project(tmp_path / "project")
    unwritable = ("cfg.yaml", "--storage-path", "/dev/null/runs")  # valid here, fails on the cluster
    queued = kdray_submit(head, work, *unwritable, "--no-wait", timeout=300)
    assert queued.returncode == 0, queued.stdout + queued.stderr
    job_id = submitted_id(queued.stdout)
    assert f"ray job logs --follow --address {head.address} {job_id}" in queued.stdout
    deadline = time.monotonic() + 300
    while (status := head.job(job_id)["status"]) not in ("SUCCEEDED", "FAILED", "STOPPED"):
        assert time.monotonic() < deadline, f"job {job_id} still {status}"
        time.sleep(1)
    assert status == "FAILED"

    waited = kdray_submit(head, work, *unwritable, timeout=300)
    assert waited.returncode == 1, waited.stdout + waited.stderr
    assert "storage path /dev/null/runs/default is not writable" in waited.stdout  # the job's own error
    assert f"[kdray] job {submitted_id(waited.stdout)} FAILED" in waited.stdout


@ray.remote(num_cpus=0)
def _double(x: int) -> int:
    return 2 * x


def test_stopping_the_head_ends_its_processes_and_spares_the_sessions_ray(head, ray_local):
    tree = process_tree(head.pid)
    assert len(running(tree)) >= 5, tree  # ray start, GCS, raylet, dashboard, agents
    stopped = head.local_sh("stop")
    assert stopped.returncode == 0 and "stopped head" in stopped.stdout, stopped.stdout + stopped.stderr
    assert running(tree) == set()
    assert ray.get(_double.remote(21)) == 42  # the in-process Ray of tests/conftest.py still works


# ------------------------------------------------------------------------------------ refused early
def test_submit_help_in_a_real_process():
    shown = subprocess.run([sys.executable, "-m", "kdray", "submit", "--help"], capture_output=True, text=True,
                           timeout=120)
    assert shown.returncode == 0
    assert all(option in shown.stdout for option in ("--address", "--storage-path", "--run-name", "--no-wait"))


def test_entrypoint_quotes_what_the_shell_would_split():
    command = run_entrypoint("my configs/a b.yaml", ["--set=distill.temperature=2", "--run-name=r"])
    argv = shlex.split(command)
    assert argv[:4] == ["python", "-m", "kdray", "run"]
    args = build_parser().parse_args(argv[3:])
    assert (args.config, args.set, args.run_name, args.no_progress) == ("my configs/a b.yaml",
                                                                        ["distill.temperature=2"], "r", True)


@pytest.fixture
def nowhere(tmp_path, monkeypatch) -> str:
    """An address nothing listens on, and a clean environment: Ray's job client prefers RAY_ADDRESS."""
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS", raising=False)
    monkeypatch.chdir(tmp_path)
    return f"http://127.0.0.1:{free_port()}"


def submit_here(argv: list[str], capsys) -> tuple[int, str, str]:
    code = main(["submit", *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_a_bad_config_fails_before_the_cluster_is_contacted(tmp_path, nowhere, capsys):
    (tmp_path / "bad.yaml").write_text("distill:\n  temperature: -1\n")
    code, out, err = submit_here(["bad.yaml", "--address", nowhere], capsys)
    assert code == 2 and out == ""
    assert "invalid config bad.yaml" in err and "distill.temperature" in err
    assert "cannot reach" not in err  # it never got as far as the address


def test_a_relative_storage_path_is_refused_naming_the_key(tmp_path, nowhere, capsys):
    (tmp_path / "cfg.yaml").write_text(TINY)
    code, _, err = submit_here(["cfg.yaml", "--storage-path", "runs", "--address", nowhere], capsys)
    assert code == 2 and "storage.storage_path: 'runs' is relative" in err


def test_a_config_outside_the_working_directory_is_refused(tmp_path, nowhere, capsys):
    (tmp_path / "cfg.yaml").write_text(TINY)
    (tmp_path / "work").mkdir()
    code, _, err = submit_here(["cfg.yaml", "--working-dir", "work", "--address", nowhere], capsys)
    assert code == 2 and "is outside the working directory work" in err


def test_an_unreachable_cluster_is_named(nowhere, capsys):
    code, out, err = submit_here(["--address", nowhere], capsys)
    assert code == 2 and out == ""
    assert f"cannot reach the Ray Jobs API at {nowhere}" in err and "Traceback" not in err


def test_an_address_that_ray_address_would_override_is_refused(nowhere, monkeypatch, capsys):
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")
    code, _, err = submit_here(["--address", nowhere], capsys)
    assert code == 2 and "RAY_ADDRESS=127.0.0.1:1" in err
