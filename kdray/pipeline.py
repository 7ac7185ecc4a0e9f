"""The runner: wires the stages in order and decides which ones must run.

Each stage writes its artifacts under ``STORAGE_PATH/RUN_NAME/STAGE/`` and, last and atomically, a
``manifest.json`` holding its fingerprint: a hash of the config sections it reads and of its inputs'
fingerprints. A stage whose manifest carries the fingerprint it would have now is skipped, so a
finished run recomputes nothing and a changed config re-runs exactly the stages downstream of the
change. A stage interrupted before its manifest was written is re-run; work it checkpointed under
``RUN/_work/STAGE-FINGERPRINT/`` (training checkpoints, finished specialists) is resumed there.
This module holds no maths: the stages live in their own modules.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from kdray import __version__
from kdray.config import Config, config_to_yaml
from kdray.storage import Storage, StorageError

MANIFEST = "manifest.json"
WORK_DIR = "_work"
ATTEMPT = ".attempt"
RUN_MARKER = "kdray-run.json"  # marks a directory as a kdray run: the only kind `kdray run` writes into
# Manifests name the run's own files relative to the run directory, so a copied or moved run reads
# its own files; locations outside the run (a user's dataset) stay as given.
RUN_RELATIVE = "./"


@dataclass(frozen=True)
class StageResult:
    """What a stage hands downstream: named output locations and a summary of figures."""

    outputs: dict[str, str] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class StageContext:
    config: Config
    run: Storage  # STORAGE_PATH/RUN_NAME
    output: Storage  # RUN/STAGE: this stage's artifacts
    work: Storage  # RUN/_work/STAGE-FINGERPRINT: resumable scratch (checkpoints)
    inputs: dict[str, dict[str, Any]]  # upstream stage name -> its manifest
    progress: bool = True

    def input_output(self, stage: str, name: str) -> Any:
        """An upstream stage's named output location."""
        return self.inputs[stage]["outputs"][name]

    def model_ref(self, stage: str, name: str):
        """An upstream stage's model output as a ModelRef, trusting the factories this run's config names."""
        from kdray.inference import ModelRef

        entry = self.input_output(stage, name)
        return ModelRef(entry["location"], tuple(entry["bundles"]), self.config.model_factories())


@dataclass(frozen=True)
class Stage:
    name: str
    run: Callable[[StageContext], StageResult]
    config_keys: tuple[str, ...]  # dotted config paths this stage's result depends on
    depends_on: tuple[str, ...] = ()
    enabled: Callable[[Config], bool] = lambda config: True
    # Upstream stages read when they ran earlier in this pipeline; a disabled (or absent) one is
    # left out of the inputs instead of failing the run, e.g. evaluate reads the sweep if enabled.
    optional_inputs: tuple[str, ...] = ()


@dataclass(frozen=True)
class StageOutcome:
    name: str
    status: str  # "ran" | "skipped" | "disabled"
    seconds: float
    manifest: dict[str, Any] | None


def _config_value(config: Config, dotted: str) -> Any:
    value: Any = config
    for part in dotted.split("."):
        value = getattr(value, part)
    if hasattr(value, "fingerprint_view"):  # a section that knows which of its fields matter
        return value.fingerprint_view()
    return value.model_dump(mode="json") if hasattr(value, "model_dump") else value


def stage_fingerprint(stage: Stage, config: Config, input_fingerprints: dict[str, str]) -> str:
    payload = {
        "stage": stage.name,
        "kdray": __version__,
        "config": {key: _config_value(config, key) for key in stage.config_keys},
        "inputs": input_fingerprints,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def read_stage_manifest(run: Storage, stage: str) -> dict[str, Any] | None:
    """A stage's manifest with its run-relative locations resolved under `run`; None if the stage
    has none or it is not a JSON object (a manifest is written atomically, so that means tampering:
    the pipeline re-runs the stage)."""
    if not run.exists(stage, MANIFEST):
        return None
    try:
        manifest = run.read_json(stage, MANIFEST)
    except ValueError:
        return None
    if not isinstance(manifest, dict):
        return None
    return {**manifest, "outputs": _locations(manifest.get("outputs"), lambda text: _resolve(run, text))}


def _locations(value: Any, convert: Callable[[str], str]) -> Any:
    """`value` with `convert` applied to every string in it (nested dicts and lists)."""
    if isinstance(value, str):
        return convert(value)
    if isinstance(value, dict):
        return {key: _locations(item, convert) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_locations(item, convert) for item in value]
    return value


def _relative(run: Storage, location: str) -> str:
    root = run.uri().rstrip("/") + "/"
    return RUN_RELATIVE + location[len(root):] if location.startswith(root) else location


def _resolve(run: Storage, text: str) -> str:
    # Storage.uri refuses a path that climbs out of the run ('..'), naming it.
    return run.uri(text[len(RUN_RELATIVE):]) if text.startswith(RUN_RELATIVE) else text


def is_run_directory(run: Storage) -> bool:
    """Whether `run` is a kdray run: its marker, or (runs from before the marker) a stage attempt."""
    return run.exists(RUN_MARKER) or any(run.exists(name, ATTEMPT) for name in run.list())


def check_run_directory(run: Storage, inputs: dict[str, Storage] | None = None) -> None:
    """Refuse a run directory that holds anything but a kdray run (its stages would replace files
    there), or that overlaps an input the config names."""
    for key, location in (inputs or {}).items():
        if run.contains(location) or location.contains(run):
            raise StorageError(f"run directory {run.location} and {key} {location.location} must not contain each "
                               f"other: choose another storage.storage_path or storage.run_name")
    if run.list() and not is_run_directory(run):
        raise StorageError(f"run directory {run.location} holds files but is not a kdray run (no {RUN_MARKER}): "
                           f"choose another storage.storage_path or storage.run_name")


def _prepare_output(run: Storage, stage: str, fingerprint: str) -> None:
    """Keep what an interrupted attempt with the same fingerprint finished (a stage may resume
    from it, e.g. trained ensemble members); anything else in the stage directory is stale."""
    attempt = run.read_text(stage, ATTEMPT) if run.exists(stage, ATTEMPT) else None
    if attempt != fingerprint:
        run.delete(stage)
        run.write_text(fingerprint, stage, ATTEMPT)


def _run_one(stage: Stage, config: Config, run: Storage, inputs: dict, fingerprint: str, progress: bool) -> dict:
    _prepare_output(run, stage.name, fingerprint)
    work = run.child(WORK_DIR, f"{stage.name}-{fingerprint}")
    context = StageContext(config, run, run.child(stage.name), work, inputs, progress)
    started = time.time()
    result = stage.run(context)
    manifest = {
        "stage": stage.name,
        "fingerprint": fingerprint,
        "inputs": {name: manifest["fingerprint"] for name, manifest in inputs.items()},
        "outputs": _locations(result.outputs, lambda text: _relative(run, text)),
        "summary": result.summary,
        "artifacts": [name for name in run.list(stage.name) if name != ATTEMPT],
        "seconds": round(time.time() - started, 3),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "kdray": __version__,
    }
    run.write_json(manifest, stage.name, MANIFEST)
    run.delete(WORK_DIR, f"{stage.name}-{fingerprint}")
    return {**manifest, "outputs": result.outputs}


def run_pipeline(
    stages: list[Stage],
    config: Config,
    run: Storage,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> list[StageOutcome]:
    """Run the enabled stages in order, skipping those whose manifest is up to date."""
    check_run_directory(run)
    run.makedirs()
    if not run.exists(RUN_MARKER):
        run.write_json({"kdray": __version__}, RUN_MARKER)
    run.write_text(config_to_yaml(config), "config.yaml")
    manifests: dict[str, dict[str, Any]] = {}
    outcomes = []
    for stage in stages:
        if not stage.enabled(config):
            outcomes.append(StageOutcome(stage.name, "disabled", 0.0, None))
            continue
        missing = [name for name in stage.depends_on if name not in manifests]
        if missing:
            raise ValueError(f"stage {stage.name} needs {missing}, which are disabled or not earlier")
        names = stage.depends_on + tuple(name for name in stage.optional_inputs if name in manifests)
        inputs = {name: manifests[name] for name in names}
        fingerprint = stage_fingerprint(stage, config, {n: m["fingerprint"] for n, m in inputs.items()})
        existing = read_stage_manifest(run, stage.name)
        started = time.time()
        if existing and existing.get("fingerprint") == fingerprint:
            log(f"[kdray] {stage.name}: up to date ({fingerprint}), skipped")
            manifests[stage.name] = existing
            outcomes.append(StageOutcome(stage.name, "skipped", 0.0, existing))
            continue
        log(f"[kdray] {stage.name}: running ({fingerprint})")
        manifests[stage.name] = _run_one(stage, config, run, inputs, fingerprint, progress)
        outcomes.append(StageOutcome(stage.name, "ran", time.time() - started, manifests[stage.name]))
        log(f"[kdray] {stage.name}: done in {outcomes[-1].seconds:.1f}s")
    return outcomes
