"""Check a dataset shard by shard, in parallel Ray tasks, before any training touches it.

Every check names the shard file it failed on: missing shard, checksum mismatch or truncation,
unreadable Parquet, schema different from the manifest's, row count, labels outside [0, C) (or -1
for unlabeled rows) and non-finite features. Shards are read in record batches, so memory stays
bounded by one row group, not one shard.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from kdray.data.shards import MANIFEST, UNLABELED, DatasetError, DatasetManifest, ShardInfo, read_manifest
from kdray.runtime import gather
from kdray.storage import Storage

_CHUNK = 8 << 20


@dataclass(frozen=True)
class ShardReport:
    file: str
    split: str
    rows: int
    class_counts: tuple[int, ...]  # index C counts unlabeled rows


@dataclass(frozen=True)
class DatasetReport:
    location: str
    manifest: DatasetManifest
    shards: tuple[ShardReport, ...]

    def class_histogram(self, split: str | None = None) -> np.ndarray:
        counts = [s.class_counts for s in self.shards if split is None or s.split == split]
        return np.sum(counts, axis=0) if counts else np.zeros(self.manifest.num_classes + 1, int)


def _file_digest(storage: Storage, file: str) -> tuple[int, str]:
    digest, size = hashlib.sha256(), 0
    with storage.open_input(file) as stream:
        while chunk := stream.read(_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return size, digest.hexdigest()


def _check_integrity(storage: Storage, shard: ShardInfo) -> None:
    where = storage.uri(shard.file)
    if not storage.exists(shard.file):
        raise DatasetError(f"shard {where} is listed in {MANIFEST} but missing")
    size, sha256 = _file_digest(storage, shard.file)
    if size != shard.bytes:
        raise DatasetError(f"shard {where} is truncated or altered: {size} bytes, manifest says {shard.bytes}")
    if sha256 != shard.sha256:
        raise DatasetError(f"shard {where} fails its checksum (sha256 {sha256[:12]}…, manifest {shard.sha256[:12]}…)")


def _check_batch(batch: pa.RecordBatch, num_classes: int, where: str) -> np.ndarray:
    labels = batch.column("y").to_numpy(zero_copy_only=False)
    bad = (labels != UNLABELED) & ((labels < 0) | (labels >= num_classes))
    if bad.any():
        raise DatasetError(f"shard {where}: label {labels[bad][0]} outside [0, {num_classes}) "
                           f"(row id {batch.column('id')[int(np.argmax(bad))]})")
    features = batch.column("x").flatten().to_numpy(zero_copy_only=False)
    if not np.isfinite(features).all():
        row = int(np.argmax(~np.isfinite(features))) // max(1, batch.column("x").type.list_size)
        raise DatasetError(f"shard {where}: NaN or infinite feature (row id {batch.column('id')[row]})")
    labeled = np.where(labels == UNLABELED, num_classes, labels)
    return np.bincount(labeled, minlength=num_classes + 1)


def _check_contents(stream, manifest: DatasetManifest, where: str) -> tuple[np.ndarray, int]:
    try:
        parquet = pq.ParquetFile(stream)
    except (pa.ArrowInvalid, OSError) as error:
        raise DatasetError(f"shard {where} is not readable Parquet: {error}") from None
    if not parquet.schema_arrow.equals(manifest.schema):
        raise DatasetError(f"shard {where} has schema {parquet.schema_arrow} but the manifest says {manifest.schema}")
    counts, rows = np.zeros(manifest.num_classes + 1, np.int64), 0
    for batch in parquet.iter_batches(batch_size=65_536):
        counts += _check_batch(batch, manifest.num_classes, where)
        rows += batch.num_rows
    return counts, rows


def check_shard(storage: Storage, shard: ShardInfo, manifest: DatasetManifest) -> ShardReport:
    """Run every check on one shard; DatasetError naming the shard on the first failure."""
    _check_integrity(storage, shard)
    where = storage.uri(shard.file)
    with storage.open_input(shard.file) as stream:
        counts, rows = _check_contents(stream, manifest, where)
    if rows != shard.rows:
        raise DatasetError(f"shard {where} has {rows} rows, the manifest says {shard.rows}")
    return ShardReport(shard.file, shard.split, rows, tuple(int(c) for c in counts))


def inspect_dataset(storage: Storage, progress: bool = False) -> DatasetReport:
    """Check all shards in parallel Ray tasks; raises DatasetError naming the first bad shard."""
    import ray

    manifest = read_manifest(storage)
    check = ray.remote(num_cpus=0.5)(check_shard)
    pending = [check.remote(storage, shard, manifest) for shard in manifest.shards]
    reports = gather(pending, desc="checking shards", progress=progress, unit="shard")
    return DatasetReport(storage.location, manifest, tuple(sorted(reports, key=lambda r: r.file)))

