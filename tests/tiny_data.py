"""Small datasets in the kdray format, written directly (no generator), for stage tests."""

from __future__ import annotations

import os
import shutil

import numpy as np

from kdray.data.shards import DatasetManifest, shard_name, shard_table, write_manifest, write_shard
from kdray.runtime.storage import Storage


def write_blobs(location: str, classes: int = 4, dim: int = 6, rows: tuple[int, int, int] = (800, 200, 200),
                shards_per_split: int = 2, seed: int = 0) -> DatasetManifest:
    """Gaussian blobs, one per class, overlapping enough that models make some errors."""
    rng = np.random.default_rng(seed)
    means = rng.normal(scale=2.0, size=(classes, dim))
    storage, infos, next_id = Storage(location), [], 0
    for split, count in zip(("train", "validation", "test"), rows):
        for index, part in enumerate(np.array_split(np.arange(count), shards_per_split)):
            labels = rng.integers(0, classes, size=len(part))
            x = (means[labels] + rng.normal(size=(len(part), dim))).astype(np.float32)
            ids = np.arange(next_id, next_id + len(part))
            next_id += len(part)
            infos.append(write_shard(storage, shard_name(split, index), split, shard_table(ids, x, labels)))
    manifest = DatasetManifest(num_classes=classes, feature_shape=(dim,), shards=tuple(infos),
                               class_names=tuple(f"c{c}" for c in range(classes)))
    write_manifest(storage, manifest)
    return manifest


# ------------------------------------------------------------------------------------ the shared run
TEACHER_EPOCHS = 3  # enough for a driver kill to land between two of the teacher's checkpoints


def tiny_run_config(data: str, storage: str, run_name: str = "tiny") -> dict:
    """The suite's one small distillation run (conftest's `distilled_run`) on `write_blobs` data:
    every distillation stage with a baseline, a bias correction and an omitted class. The pipeline,
    sweep, report and driver-fault tests all read it, or copy it and add to it, instead of each
    training its own teacher and student."""
    return {
        "data": {"source": "parquet", "path": data},
        "teacher": {"model": {"name": "mlp", "hidden": [32]},
                    "train": {"epochs": TEACHER_EPOCHS, "batch_size": 64, "lr": 0.01}},
        "distill": {"student": {"name": "mlp", "hidden": [8]}, "train": {"epochs": 2, "batch_size": 64, "lr": 0.05},
                    "temperature": 2.0, "bias_correction": True, "transfer": {"omit_classes": [3]}},
        "resources": {"cpus_per_worker": 0.5},
        "storage": {"storage_path": storage, "run_name": run_name},
    }


def copy_run(run: Storage, storage: str, run_name: str) -> Storage:
    """A copy of the finished run `run` as STORAGE/RUN_NAME (its manifests name its own files
    relative to it, so the copy reads its own)."""
    shutil.copytree(run.location, os.path.join(storage, run_name))
    return Storage(storage).child(run_name)
