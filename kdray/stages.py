"""The pipeline's stages, in order, with what each depends on (config sections and upstream stages).

Adding a stage is one entry here plus a `run_*` function in its own module.
"""

from __future__ import annotations

import importlib

from kdray.pipeline import Stage, StageContext, StageResult


def _data_stage(context: StageContext) -> StageResult:
    from kdray.data import prepare_dataset, read_manifest
    from kdray.storage import Storage

    location = prepare_dataset(context.config.data, context.output.child("dataset"), context.progress)
    manifest = read_manifest(Storage(location))
    summary = {
        "rows": {split: manifest.rows(split) for split in manifest.split_names()},
        "num_classes": manifest.num_classes,
        "feature_shape": list(manifest.feature_shape),
        "shards": len(manifest.shards),
    }
    return StageResult(outputs={"dataset": location}, summary=summary)


def _lazy(path: str):
    """A stage function imported on first use, so `kdray --help` does not pay for torch and Ray."""

    def run(context: StageContext) -> StageResult:
        module, name = path.split(":")
        return getattr(importlib.import_module(module), name)(context)

    return run


def pipeline_stages() -> list[Stage]:
    return [
        Stage("data", _data_stage, config_keys=("data",)),
        Stage("teacher", _lazy("kdray.teacher:run_teacher"), config_keys=("teacher",), depends_on=("data",)),
        Stage("transfer", _lazy("kdray.transfer:run_transfer"), config_keys=("distill.transfer",), depends_on=("data", "teacher")),
        Stage("student", _lazy("kdray.student:run_student"),
              config_keys=("distill.temperature", "distill.hard_weight", "distill.student", "distill.train",
                           "distill.baseline", "distill.bias_correction", "distill.transfer"),
              depends_on=("data", "transfer")),
        Stage("evaluate", _lazy("kdray.evaluate:run_evaluate"), config_keys=(), depends_on=("data", "teacher", "student")),
    ]
