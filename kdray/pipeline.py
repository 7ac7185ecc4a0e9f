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
import importlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from kdray import __version__
from kdray.config import Config, config_to_yaml
from kdray.preflight import check_config
from kdray.runtime.stage import (
    ATTEMPT,
    MANIFEST,
    RUN_MARKER,
    WORK_DIR,
    StageContext,
    StageResult,
    check_run_directory,
    read_stage_manifest,
    relative_locations,
)
from kdray.runtime.storage import Storage


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
        "outputs": relative_locations(result.outputs, run),
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
    """Run the enabled stages in order, skipping those whose manifest is up to date. Refuses a config
    that preflight finds wrong before anything is written."""
    check_config(config)
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


# ------------------------------------------------------------------------------------ the stages
# In order, with what each depends on (config sections and upstream stages). Adding a stage is one
# entry here plus a `run_*` function in its own module.
def _lazy(path: str):
    """A stage function imported on first use, so `kdray --help` does not pay for torch and Ray."""

    def run(context: StageContext) -> StageResult:
        module, name = path.split(":")
        return getattr(importlib.import_module(module), name)(context)

    return run


# Every specialists setting but max_concurrent, which changes how fast, not what, it trains.
_SPECIALIST_KEYS = ("train", "subset_fraction", "soft_target_weight", "temperature", "top_n", "distill_back",
                    "distill_train", "distill_hard_weight")


def pipeline_stages() -> list[Stage]:
    return [
        Stage("data", _lazy("kdray.data.stage:run_data"), config_keys=("data",)),
        Stage("teacher", _lazy("kdray.distill.teacher:run_teacher"), config_keys=("teacher",), depends_on=("data",)),
        Stage("transfer", _lazy("kdray.distill.transfer:run_transfer"), config_keys=("distill.transfer",), depends_on=("data", "teacher")),
        Stage("student", _lazy("kdray.distill.student:run_student"),
              config_keys=("distill.temperature", "distill.hard_weight", "distill.student", "distill.train",
                           "distill.baseline", "distill.bias_correction", "distill.transfer"),
              depends_on=("data", "transfer")),
        Stage("sweep", _lazy("kdray.sweep:run_sweep"),
              config_keys=("sweep", "distill.student", "distill.train", "distill.transfer"),
              depends_on=("data", "transfer"), enabled=lambda config: config.sweep.enabled),
        Stage("clustering", _lazy("kdray.specialists.clustering:run_clustering"), config_keys=("clustering",),
              depends_on=("data", "teacher"), enabled=lambda config: config.clustering.enabled),
        Stage("specialists", _lazy("kdray.specialists.stage:run_specialists"),
              config_keys=tuple(f"specialists.{key}" for key in _SPECIALIST_KEYS),
              depends_on=("data", "teacher", "clustering"), enabled=lambda config: config.clustering.enabled),
        Stage("evaluate", _lazy("kdray.evaluation.evaluate:run_evaluate"), config_keys=(),
              depends_on=("data", "teacher", "transfer", "student"),
              optional_inputs=("sweep", "specialists")),
        # Reads files the optional stages leave (sweep trials, the clustering figure) when they ran.
        Stage("report", _lazy("kdray.evaluation.report:run_report"), config_keys=(), depends_on=("evaluate",),
              optional_inputs=("sweep", "clustering", "specialists")),
    ]


def stages_for(target: str) -> list[Stage]:
    """`target` and the stages it depends on (transitively), in pipeline order: what `kdray sweep` runs."""
    stages = pipeline_stages()
    by_name = {stage.name: stage for stage in stages}
    if target not in by_name:
        raise ValueError(f"unknown stage {target!r}; stages: {list(by_name)}")
    needed, pending = set(), [target]
    while pending:
        name = pending.pop()
        if name not in needed:
            needed.add(name)
            pending.extend(by_name[name].depends_on)
    return [stage for stage in stages if stage.name in needed]
