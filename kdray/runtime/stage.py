"""The contract between the pipeline and its stages: what a stage is given (`StageContext`), what it
returns (`StageResult`), and the manifest it leaves in its directory, which names the run's own
files relative to the run so that a copied or moved run reads its own files.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from kdray.config import Config
from kdray.runtime.artifacts import ModelRef
from kdray.runtime.storage import Storage, StorageError

MANIFEST = "manifest.json"
WORK_DIR = "_work"
ATTEMPT = ".attempt"
RUN_MARKER = "kdray-run.json"  # marks a directory as a kdray run: the only kind `kdray run` writes into
# Manifests name the run's own files relative to the run directory, so a copied or moved run reads
# its own files; locations outside the run (a user's dataset) stay as given.
RUN_RELATIVE = "./"
# Keys of a stage's outputs naming what it offers the run's report, {caption: location}: PNG figures
# and CSV tables. The report shows them under the stage's name without knowing its files.
REPORT_FIGURES, REPORT_TABLES = "report_figures", "report_tables"


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
        entry = self.input_output(stage, name)
        return ModelRef(entry["location"], tuple(entry["bundles"]), self.config.model_factories())


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


def relative_locations(outputs: Any, run: Storage) -> Any:
    """`outputs` as a manifest stores them: every location inside `run` made relative to it."""
    return _locations(outputs, lambda text: _relative(run, text))


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
