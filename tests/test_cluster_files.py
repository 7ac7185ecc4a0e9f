"""cluster/: every recipe parses, passes Ray's own checks where Ray has them, and agrees with the
project: the Ray in each image is the version pyproject.toml pins, the entrypoints are kdray's own
commands with arguments its parser and config schema accept, the configs named exist, GPU workers
request GPUs and autoscale, the KubeRay dashboard stays inside Kubernetes (and the files say so),
and the local recipe stays on 127.0.0.1."""

from __future__ import annotations

import os
import re
import shlex
import stat
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml

from kdray.cli import build_parser
from kdray.config import load_config, parse_overrides

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
IMAGE = re.compile(r"^rayproject/ray:(?P<version>\d+\.\d+\.\d+)-py(?P<python>\d)(?P<minor>\d+)-(?P<kind>cpu|gpu)$")


def pinned_ray_version() -> str:
    dependencies = PYPROJECT["project"]["dependencies"]
    pins = [re.fullmatch(r"ray(\[[^\]]*\])?==(\S+)", dependency.replace(" ", "")) for dependency in dependencies]
    versions = [pin.group(2) for pin in pins if pin]
    assert len(versions) == 1, "pyproject.toml must pin ray exactly once"
    return versions[0]


def load(relative: str) -> dict:
    return yaml.safe_load((CLUSTER / relative).read_text())


def check_image(image: str, kind: str) -> None:
    match = IMAGE.match(image)
    assert match, f"{image} is not a rayproject/ray:VERSION-pyXY-cpu|gpu tag"
    assert match["version"] == pinned_ray_version(), f"{image}: not pyproject's ray=={pinned_ray_version()}"
    minimum = PYPROJECT["project"]["requires-python"].removeprefix(">=")
    assert (int(match["python"]), int(match["minor"])) >= tuple(map(int, minimum.split("."))), image
    assert match["kind"] == kind, f"{image} should be a {kind} image"


def check_kdray_run(entrypoint: str, cwd: Path = REPO):
    """`kdray run ...` or `python -m kdray run ...`, parsed by kdray's own parser; returns (args, config)."""
    argv = shlex.split(entrypoint)
    if argv[:3] == ["python", "-m", "kdray"]:
        assert (REPO / "kdray" / "__main__.py").exists()
        argv = argv[3:]
    else:
        assert argv[0] in PYPROJECT["project"]["scripts"], f"{argv[0]} is not a console script of kdray"
        argv = argv[1:]
    args = build_parser().parse_args(argv)
    assert args.command == "run"
    if args.config:
        assert (cwd / args.config).is_file(), f"{args.config} does not exist"
    overrides = parse_overrides(args.set or [])
    if args.storage_path:
        overrides.setdefault("storage", {})["storage_path"] = args.storage_path
    return args, load_config(str(cwd / args.config) if args.config else None, overrides)


# ------------------------------------------------------------------------------------ pyproject
def test_ray_is_pinned_and_kdray_has_its_console_script():
    assert re.fullmatch(r"\d+\.\d+\.\d+", pinned_ray_version())
    assert PYPROJECT["project"]["scripts"]["kdray"] == "kdray.cli:main"


@pytest.mark.parametrize("path", sorted(str(p.relative_to(CLUSTER)) for p in CLUSTER.rglob("*") if p.is_file()))
def test_every_job_config_a_cluster_file_names_exists(path):
    named = re.findall(r"\bjobs/[\w.-]+\.yaml\b", (CLUSTER / path).read_text())
    for config in named:
        assert (REPO / config).is_file(), f"cluster/{path} names {config}, which does not exist"
        load_config(str(REPO / config))  # and it is a valid config


# ------------------------------------------------------------------------------------ aws
@pytest.fixture(scope="module")
def aws() -> dict:
    return load("aws-gpu.yaml")


def test_aws_config_passes_the_cluster_launchers_own_validation(aws):
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(aws))  # what `ray up` runs first: schema, node types, min/max workers


def test_aws_images_carry_the_pinned_ray(aws):
    check_image(aws["docker"]["image"], "gpu")
    check_image(aws["docker"]["head_image"], "cpu")
    for name, node_type in aws["available_node_types"].items():
        if "docker" in node_type:
            check_image(node_type["docker"]["worker_image"], "gpu" if node_type["resources"].get("GPU") else "cpu")


def test_aws_gpu_workers_request_gpus_and_scale_from_zero(aws):
    types = aws["available_node_types"]
    gpu_types = {name: t for name, t in types.items() if t["resources"].get("GPU", 0) >= 1}
    assert gpu_types, "no node type offers a GPU"
    for name, node_type in gpu_types.items():
        assert re.match(r"^(g|p)\d", node_type["node_config"]["InstanceType"]), f"{name}: not a GPU instance"
        assert node_type["min_workers"] == 0 < node_type["max_workers"] <= aws["max_workers"], name
        assert "docker" not in node_type, f"{name} must run the GPU image"
    cpu_workers = [t for name, t in types.items() if name != aws["head_node_type"] and not t["resources"].get("GPU")]
    assert cpu_workers and all(t["max_workers"] > t["min_workers"] for t in cpu_workers)


def test_aws_head_starts_the_autoscaler_and_a_loopback_dashboard(aws):
    command = " ".join(aws["head_start_ray_commands"])
    assert "ray start --head" in command and "--autoscaling-config=~/ray_bootstrap_config.yaml" in command
    assert "--include-dashboard=true" in command and "--dashboard-host=127.0.0.1" in command
    assert "0.0.0.0" not in command
    assert all("--address=$RAY_HEAD_IP:6379" in c for c in aws["worker_start_ray_commands"] if "ray start" in c)


def test_aws_installs_the_synced_working_tree(aws):
    synced = {remote for remote, local in aws["file_mounts"].items() if (REPO / local).resolve() == REPO}
    assert synced, "file_mounts must sync the repository"
    installs = [shlex.split(c) for c in aws["setup_commands"] if c.startswith("pip install")]
    assert any("-e" in argv and argv[argv.index("-e") + 1] in synced for argv in installs)
    assert (REPO / "pyproject.toml").is_file()
    assert {".venv", ".git"} <= set(aws["rsync_exclude"])


# ------------------------------------------------------------------------------------ kuberay
@pytest.fixture(scope="module")
def raycluster() -> dict:
    return load("kuberay/raycluster.yaml")


@pytest.fixture(scope="module")
def rayjob() -> dict:
    return load("kuberay/rayjob.yaml")


def containers(spec: dict) -> list[dict]:
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    return [c for group in groups for c in group["template"]["spec"]["containers"]]


def test_raycluster_autoscales_a_gpu_group_from_zero(raycluster):
    assert (raycluster["apiVersion"], raycluster["kind"]) == ("ray.io/v1", "RayCluster")
    spec = raycluster["spec"]
    assert spec["rayVersion"] == pinned_ray_version()
    assert spec["enableInTreeAutoscaling"] is True
    gpu_groups = [g for g in spec["workerGroupSpecs"]
                  if int(g["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu", 0)) >= 1]
    assert gpu_groups, "no worker group requests nvidia.com/gpu"
    for group in spec["workerGroupSpecs"]:
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], group["groupName"]
        assert group["minReplicas"] < group["maxReplicas"], f"{group['groupName']} cannot scale"
    for group in gpu_groups:
        resources = group["template"]["spec"]["containers"][0]["resources"]
        assert resources["requests"]["nvidia.com/gpu"] == resources["limits"]["nvidia.com/gpu"]
        check_image(group["template"]["spec"]["containers"][0]["image"], "gpu")


def test_kuberay_images_carry_the_pinned_ray(raycluster, rayjob):
    for spec in (raycluster["spec"], rayjob["spec"]["rayClusterSpec"]):
        for container in containers(spec):
            match = IMAGE.match(container["image"])
            assert match, container["image"]
            check_image(container["image"], match["kind"])


def test_rayjob_runs_the_same_cluster_and_cleans_up(raycluster, rayjob):
    assert (rayjob["apiVersion"], rayjob["kind"]) == ("ray.io/v1", "RayJob")
    assert rayjob["spec"]["rayClusterSpec"] == raycluster["spec"], "rayjob.yaml's cluster drifted from raycluster.yaml"
    assert rayjob["spec"]["shutdownAfterJobFinishes"] is True


def test_rayjob_entrypoint_is_a_valid_kdray_run_for_that_cluster(raycluster, rayjob):
    args, config = check_kdray_run(rayjob["spec"]["entrypoint"])
    assert args.config is None  # the embedded default run
    assert "://" in config.storage.storage_path, "pods are ephemeral: runs must go to object storage"
    gpu_floor = min(g["minReplicas"] for g in raycluster["spec"]["workerGroupSpecs"] if g["groupName"] == "gpu")
    if gpu_floor == 0:
        assert config.resources.use_gpu is True, "with no GPU pod at start, 'auto' would never ask for one"


def test_rayjob_runtime_env_is_valid_and_installs_this_version(rayjob):
    from ray.runtime_env import RuntimeEnv

    runtime_env = yaml.safe_load(rayjob["spec"]["runtimeEnvYAML"])
    RuntimeEnv(**runtime_env)  # Ray's validation: URIs, pip spec
    assert runtime_env["working_dir"].endswith(f"/kdray-{PYPROJECT['project']['version']}.zip")
    assert runtime_env["pip"] == ["${RAY_RUNTIME_ENV_CREATE_WORKING_DIR}"]


@pytest.mark.parametrize("name", ["raycluster.yaml", "rayjob.yaml"])
def test_kuberay_dashboard_stays_inside_kubernetes_and_the_file_says_where_and_why(name):
    manifest = load(f"kuberay/{name}")
    spec = manifest["spec"] if manifest["kind"] == "RayCluster" else manifest["spec"]["rayClusterSpec"]
    head = spec["headGroupSpec"]
    assert head["serviceType"] == "ClusterIP", "a LoadBalancer or NodePort would publish the Jobs API"
    assert head["rayStartParams"]["dashboard-host"] == "0.0.0.0"  # in the pod, for the head Service
    ports = {port["name"]: port["containerPort"] for port in head["template"]["spec"]["containers"][0]["ports"]}
    assert ports["dashboard"] == 8265
    comments = " ".join(line.split("#", 1)[1].strip() for line in (CLUSTER / "kuberay" / name).read_text().splitlines()
                        if "#" in line)
    for said in ("port 8265 of the head pod", "head-svc", "ClusterIP", "kubectl port-forward",
                 "the Jobs API runs whatever code it is sent"):
        assert said in comments, f"kuberay/{name} does not say {said!r}"


# ------------------------------------------------------------------------------------ local.sh
LOCAL = CLUSTER / "local.sh"


def code_lines() -> list[str]:
    return [line.split(" #")[0] for line in LOCAL.read_text().splitlines() if not line.lstrip().startswith("#")]


def test_local_recipe_is_a_strict_executable_bash_script():
    text = LOCAL.read_text()
    assert text.startswith("#!/usr/bin/env bash\n")
    assert LOCAL.stat().st_mode & stat.S_IXUSR
    assert "set -euo pipefail" in code_lines()
    subprocess.run(["bash", "-n", str(LOCAL)], check=True)


def test_local_recipe_prints_usage():
    shown = subprocess.run([str(LOCAL), "--help"], capture_output=True, text=True, timeout=30)
    assert shown.returncode == 0
    assert all(action in shown.stdout for action in ("start", "worker", "status", "stop"))
    assert "kdray submit" in shown.stdout and "http://127.0.0.1:" in shown.stdout
    wrong = subprocess.run([str(LOCAL), "explode"], capture_output=True, text=True, timeout=30)
    assert wrong.returncode == 2 and "usage:" in wrong.stderr


def test_local_recipe_binds_to_loopback_and_stops_only_its_own_processes():
    code = "\n".join(code_lines())
    assert re.search(r"^HOST=127\.0\.0\.1$", code, re.M)
    bound = re.findall(r"--(?:node-ip-address|dashboard-host)=(\S+)", code)
    assert bound and set(bound) == {'"$HOST"'}, bound
    assert "0.0.0.0" not in code and "localhost" not in code
    environment = r'RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="\$MULTI_NODE" RAY_ADDRESS="\$HOST:\$RAY_PORT"'
    launch = re.search(environment + r' \\\n\s*"\$RAY" start ', code)
    assert launch, "every node starts single-machine unless MULTI_NODE=1, knowing its own cluster's address"
    assert re.search(r'^MULTI_NODE="\$\{MULTI_NODE:-0\}"', code, re.M)
    assert not re.search(r'("\$RAY"|\bray)\s+stop\b', code), "`ray stop` ends every Ray on the machine"
    assert "--block" in code and "set -m" in code  # each node its own process group, stopped by pid
    assert os.access(LOCAL, os.X_OK)
