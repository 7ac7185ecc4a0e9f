"""Small datasets in the kdray format, written directly (no generator), for stage tests."""

from __future__ import annotations

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
