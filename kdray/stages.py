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


# Every specialists setting but max_concurrent, which changes how fast, not what, it trains.
_SPECIALIST_KEYS = ("train", "subset_fraction", "soft_target_weight", "temperature", "top_n", "distill_back",
                    "distill_train", "distill_hard_weight")


def pipeline_stages() -> list[Stage]:
    return [
        Stage("data", _data_stage, config_keys=("data",)),
        Stage("teacher", _lazy("kdray.teacher:run_teacher"), config_keys=("teacher",), depends_on=("data",)),
        Stage("transfer", _lazy("kdray.transfer:run_transfer"), config_keys=("distill.transfer",), depends_on=("data", "teacher")),
        Stage("student", _lazy("kdray.student:run_student"),
              config_keys=("distill.temperature", "distill.hard_weight", "distill.student", "distill.train",
                           "distill.baseline", "distill.bias_correction", "distill.transfer"),
              depends_on=("data", "transfer")),
        Stage("sweep", _lazy("kdray.sweep:run_sweep"),
              config_keys=("sweep", "distill.student", "distill.train", "distill.transfer"),
              depends_on=("data", "transfer"), enabled=lambda config: config.sweep.enabled),
        Stage("clustering", _lazy("kdray.clustering:run_clustering"), config_keys=("clustering",),
              depends_on=("data", "teacher"), enabled=lambda config: config.clustering.enabled),
        Stage("specialists", _lazy("kdray.specialists:run_specialists"),
              config_keys=tuple(f"specialists.{key}" for key in _SPECIALIST_KEYS),
              depends_on=("data", "teacher", "clustering"), enabled=lambda config: config.clustering.enabled),
        Stage("evaluate", _lazy("kdray.evaluate:run_evaluate"), config_keys=(),
              depends_on=("data", "teacher", "transfer", "student"),
              optional_inputs=("sweep", "specialists")),
        # Reads files the optional stages leave (sweep trials, the clustering figure) when they ran.
        Stage("report", _lazy("kdray.report:run_report"), config_keys=(), depends_on=("evaluate",),
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
