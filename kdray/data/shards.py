"""The kdray dataset format: Parquet shards plus `manifest.json`, read as a streaming Ray Dataset.

A dataset directory holds `SPLIT-NNNNN.parquet` shards and one manifest recording the schema, the
feature shape, the number of classes, and per shard its split, row count, byte size and SHA-256.
Each row is ``id: int64`` (unique across the dataset, stable: it aligns teacher logits with rows),
``x: fixed_size_list<float32>[D]`` (features, flattened) and ``y: int64`` (label in [0, C), or -1
for an unlabeled row). A shard belongs to exactly one split, so splits never share a row.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from kdray.storage import Storage

MANIFEST = "manifest.json"
FORMAT = "kdray-dataset/1"
SPLITS = ("train", "validation", "test")
UNLABELED = -1


class DatasetError(Exception):
    """A dataset is missing, malformed or inconsistent; the message names the file or shard."""


@dataclass(frozen=True)
class ShardInfo:
    file: str
    split: str
    rows: int
    bytes: int
    sha256: str


@dataclass(frozen=True)
class DatasetManifest:
    num_classes: int
    feature_shape: tuple[int, ...]
    shards: tuple[ShardInfo, ...]
    class_names: tuple[str, ...] = ()
    class_groups: tuple[int, ...] | None = None  # synthetic data: each class's true confusable group
    source: dict[str, Any] = field(default_factory=dict)

    @property
    def feature_dim(self) -> int:
        return math.prod(self.feature_shape)

    @property
    def schema(self) -> pa.Schema:
        return shard_schema(self.feature_dim)

    def split_shards(self, split: str) -> list[ShardInfo]:
        return [shard for shard in self.shards if shard.split == split]

    def rows(self, split: str | None = None) -> int:
        return sum(s.rows for s in self.shards if split is None or s.split == split)

    def to_json(self) -> dict[str, Any]:
        value = dataclasses.asdict(self)
        value["format"] = FORMAT
        value["schema"] = str(self.schema)
        value["splits"] = {s: {"rows": self.rows(s), "shards": len(self.split_shards(s))} for s in self.split_names()}
        return value

    def split_names(self) -> list[str]:
        return sorted({s.split for s in self.shards}, key=lambda s: (SPLITS + (s,)).index(s))

    @classmethod
    def from_json(cls, value: dict[str, Any], where: str) -> DatasetManifest:
        if value.get("format") != FORMAT:
            raise DatasetError(f"{where}: format is {value.get('format')!r}, expected {FORMAT!r}")
        try:
            groups = value.get("class_groups")
            return cls(
                num_classes=int(value["num_classes"]),
                feature_shape=tuple(int(v) for v in value["feature_shape"]),
                shards=tuple(ShardInfo(**shard) for shard in value["shards"]),
                class_names=tuple(value.get("class_names") or ()),
                class_groups=tuple(groups) if groups is not None else None,
                source=dict(value.get("source") or {}),
            )
        except (KeyError, TypeError, ValueError) as error:
            raise DatasetError(f"{where}: malformed manifest ({error!r})") from None


def shard_schema(feature_dim: int) -> pa.Schema:
    return pa.schema(
        [("id", pa.int64()), ("x", pa.list_(pa.float32(), feature_dim)), ("y", pa.int64())]
    )


def shard_table(ids: np.ndarray, features: np.ndarray, labels: np.ndarray) -> pa.Table:
    """Arrays [N], [N, D] float32, [N] -> a table in the shard schema."""
    features = np.ascontiguousarray(features, dtype=np.float32)
    rows, dim = features.shape
    flat = pa.array(features.reshape(-1), type=pa.float32())
    columns = [
        pa.array(np.asarray(ids, dtype=np.int64)),
        pa.FixedSizeListArray.from_arrays(flat, dim),
        pa.array(np.asarray(labels, dtype=np.int64)),
    ]
    return pa.Table.from_arrays(columns, schema=shard_schema(dim))


def write_shard(storage: Storage, file: str, split: str, table: pa.Table) -> ShardInfo:
    """Write one shard atomically and return its manifest entry (checksum of the bytes written)."""
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="snappy")
    data = sink.getvalue().to_pybytes()
    storage.write_bytes(data, file)
    return ShardInfo(file=file, split=split, rows=table.num_rows, bytes=len(data),
                     sha256=hashlib.sha256(data).hexdigest())


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:05d}.parquet"


def write_manifest(storage: Storage, manifest: DatasetManifest) -> None:
    """Written last: a dataset directory without a manifest is incomplete."""
    storage.write_json(manifest.to_json(), MANIFEST)


def read_manifest(storage: Storage) -> DatasetManifest:
    if not storage.exists(MANIFEST):
        raise DatasetError(f"{storage.uri(MANIFEST)} not found: not a kdray dataset (or an unfinished one)")
    try:
        value = storage.read_json(MANIFEST)
    except ValueError as error:
        raise DatasetError(f"{storage.uri(MANIFEST)}: not valid JSON ({error})") from None
    return DatasetManifest.from_json(value, storage.uri(MANIFEST))


def read_split(storage: Storage, split: str, manifest: DatasetManifest | None = None):
    """A lazily streamed `ray.data.Dataset` over one split's shards (nothing reaches the driver)."""
    manifest = manifest or read_manifest(storage)
    shards = manifest.split_shards(split)
    if not shards:
        raise DatasetError(f"{storage.uri(MANIFEST)} has no shards for split {split!r}")
    paths = [storage.path(shard.file) for shard in shards]
    return ordered(read_parquet(paths, storage.filesystem, schema=manifest.schema))


def read_parquet(paths, filesystem, **options):
    """`ray.data.read_parquet` through Ray Data's V1 Parquet datasource; every kdray read goes here.

    Ray 2.60 routes Parquet reads through DataSourceV2 by default, which adds file-listing and
    footer-reading tasks and streamed kdray's shards 10-20x slower: the default run's train split
    reached a Ray Train worker at 1.3-12k rows/s with V2 against 100-130k rows/s with V1 (2-core
    machine). kdray always knows its files and schema from a manifest, so V2's discovery buys
    nothing here. The switch is read when the Dataset is created, so it is flipped only for that.
    Its executions learn their resource limits at once (kdray.raydata).
    """
    import ray.data

    from kdray.raydata import prompt_resource_limits

    if isinstance(paths, (list, tuple)):
        # One block per shard: Ray would otherwise cut each file into several blocks to reach its
        # default parallelism, and per-block costs dominate a small model's input pipeline
        # (2.2x the CPU per row streamed, measured on the synthetic shards).
        options.setdefault("override_num_blocks", len(paths))
    context = ray.data.DataContext.get_current()
    previous, context.use_datasource_v2 = context.use_datasource_v2, False
    try:
        return prompt_resource_limits(ray.data.read_parquet(paths, filesystem=filesystem, **options))
    finally:
        context.use_datasource_v2 = previous


def ordered(dataset):
    """Make `dataset` (and what derives from it) yield rows in a fixed order: with the same seed,
    training sees the same batches, so a resumed run matches an uninterrupted one."""
    dataset.context.execution_options.preserve_order = True
    return dataset
