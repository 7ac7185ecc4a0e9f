"""The data stage: the configured dataset made (generated or imported) or checked, as a kdray dataset."""

from __future__ import annotations

from kdray.data import prepare_dataset, read_manifest
from kdray.runtime.stage import StageContext, StageResult
from kdray.runtime.storage import Storage


def run_data(context: StageContext) -> StageResult:
    location = prepare_dataset(context.config.data, context.output.child("dataset"), context.progress)
    manifest = read_manifest(Storage(location))
    summary = {
        "rows": {split: manifest.rows(split) for split in manifest.split_names()},
        "num_classes": manifest.num_classes,
        "feature_shape": list(manifest.feature_shape),
        "shards": len(manifest.shards),
    }
    return StageResult(outputs={"dataset": location}, summary=summary)
