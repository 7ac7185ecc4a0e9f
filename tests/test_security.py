"""What kdray keeps from other users and other machines: the in-process Ray listens on loopback only
and keeps its token file to its owner, and `kdray submit` uploads no keys or cloud credentials and
says what it does upload. (cluster/local.sh's head: tests/test_submit.py; the KubeRay dashboard:
tests/test_cluster_files.py.)"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from test_submit import listening_addresses, process_tree

from kdray.submit import job_runtime_env, upload_contents

# A driver that starts kdray's in-process Ray, runs a task (so a worker process listens too), says
# so and holds the session open until its stdin closes.
_HOLD_A_LOCAL_RAY = textwrap.dedent("""
    import sys
    import ray
    from kdray.runtime.session import ray_session

    @ray.remote(num_cpus=0)
    def ping():
        return "pong"

    with ray_session(num_cpus=1):
        print(ray.get(ping.remote()), flush=True)
        sys.stdin.read()
""")


@pytest.fixture
def local_ray(tmp_path):
    """The driver above in a fresh HOME (where Ray creates the token file), running; its pid."""
    env = {name: value for name, value in os.environ.items()
           if not name.startswith("RAY_AUTH") and name != "RAY_ADDRESS"}
    env["HOME"] = str(tmp_path)
    log = tmp_path / "driver.log"  # a file, not a pipe: Ray's start-up chatter cannot fill it and stall the driver
    with log.open("w") as stderr:
        driver = subprocess.Popen([sys.executable, "-c", _HOLD_A_LOCAL_RAY], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, stderr=stderr, text=True, env=env)
    try:
        if driver.stdout.readline().strip() != "pong":
            driver.kill()
            pytest.fail(f"the driver did not start Ray:\n{log.read_text()[-3000:]}")
        yield driver.pid
    finally:
        driver.stdin.close()  # ends the session: ray.shutdown stops what it started
        driver.wait(timeout=120)
        driver.stdout.close()


def test_the_in_process_ray_listens_on_loopback_only_and_keeps_its_token_private(local_ray, tmp_path):
    if not Path("/proc/net/tcp").exists():
        pytest.skip("reads listening sockets from Linux's /proc")
    addresses = listening_addresses(process_tree(local_ray))
    assert addresses and addresses <= {"127.0.0.1", "::1"}, addresses
    token = tmp_path / ".ray" / "auth_token"
    assert token.stat().st_mode & 0o777 == 0o600, oct(token.stat().st_mode)


# ------------------------------------------------------------------------------------ the upload
SECRETS = (".env", ".env.production", "config/.env.local", "secret.pem", "tls/server.key", "id_rsa", "id_rsa.pub",
           ".ssh/id_ed25519", ".netrc", ".aws/credentials", ".config/gcloud/application_default_credentials.json",
           "credentials-prod.json", "deploy/credentials.json", ".ray/auth_token")
KEPT = ("cfg.yaml", "kdray/keys.py", "docs/environment.md", "notes/keyboard.txt", ".gitignore")


def test_the_upload_leaves_secrets_out_and_says_what_it_sends(tmp_path):
    for name in (*SECRETS, *KEPT, ".venv/lib/big.bin", "runs/old/manifest.json", "scratch.log"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("x" * 1000)
    (tmp_path / ".gitignore").write_text("*.log\n")  # what the project's own ignore file lists stays too

    upload = upload_contents(job_runtime_env(str(tmp_path)))
    assert set(upload.files) == set(KEPT)
    assert upload.size == sum((tmp_path / name).stat().st_size for name in KEPT)
    message = upload.describe()
    assert message.startswith(f"uploading {len(KEPT)} files, {upload.size / 2**20:.2f} MiB from {tmp_path} ")
    for pattern in (".env*", "*.pem", "*.key", "id_rsa*", "id_ed25519*", ".netrc", ".aws", "credentials*.json", ".ray"):
        assert pattern in message
