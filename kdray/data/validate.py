"""Check a dataset shard by shard, in parallel Ray tasks, before any training touches it.

Every check names the shard file it failed on: missing shard, checksum mismatch or truncation,
unreadable Parquet, schema different from the manifest's, row count, null values, labels outside
[0, C) (or -1 for unlabeled rows), non-finite features, an id range other than the manifest's, and
a row id that another row also has (`check_unique_ids`). Shards are read in record batches, so
memory stays bounded by one row group, not one shard; the driver sees one small report per shard.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from kdray.data.sampling import splitmix_uniform
from kdray.data.shards import MANIFEST, UNLABELED, DatasetError, DatasetManifest, ShardInfo, read_manifest
from kdray.runtime.session import gather
from kdray.runtime.storage import Storage

_CHUNK = 8 << 20
# Row ids one duplicate-id bucket task sorts: 64 MiB of int64, about 300 MiB at the sort's peak.
BUCKET_ROWS = 1 << 23


@dataclass(frozen=True)
class ShardReport:
    file: str
    split: str
    rows: int
    class_counts: tuple[int, ...]  # index C counts unlabeled rows
    id_min: int | None  # measured, as are the next two; None for a shard without rows
    id_max: int | None
    ids_increasing: bool  # strictly: the shard cannot repeat an id within itself


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


class _IdSpan:
    """A shard's id range, and whether its ids strictly increase, followed batch by batch in O(1) memory."""

    def __init__(self):
        self.low = self.high = self.last = None
        self.increasing = True

    def add(self, ids: np.ndarray) -> None:
        if not len(ids):
            return
        follows = self.last is None or ids[0] > self.last
        self.increasing = self.increasing and follows and bool(np.all(ids[1:] > ids[:-1]))
        self.last = int(ids[-1])
        low, high = int(ids.min()), int(ids.max())
        self.low = low if self.low is None else min(self.low, low)
        self.high = high if self.high is None else max(self.high, high)


def _check_nulls(batch: pa.RecordBatch, first_row: int, where: str) -> None:
    for name in ("id", "x", "y"):
        column = batch.column(name)
        if column.null_count:
            row = first_row + int(np.argmax(column.is_null().to_numpy(zero_copy_only=False)))
            raise DatasetError(f"shard {where}: column {name} is null in row {row} of the shard")


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


def _one_line(schema: pa.Schema) -> str:
    return "{" + ", ".join(f"{field.name}: {field.type}" for field in schema) + "}"


def _check_contents(stream, manifest: DatasetManifest, where: str) -> tuple[np.ndarray, int, _IdSpan]:
    try:
        parquet = pq.ParquetFile(stream)
    except (pa.ArrowInvalid, OSError) as error:
        raise DatasetError(f"shard {where} is not readable Parquet: {error}") from None
    if not parquet.schema_arrow.equals(manifest.schema):
        raise DatasetError(f"shard {where} has schema {_one_line(parquet.schema_arrow)} "
                           f"but the manifest says {_one_line(manifest.schema)}")
    counts, rows, ids = np.zeros(manifest.num_classes + 1, np.int64), 0, _IdSpan()
    for batch in parquet.iter_batches(batch_size=65_536):
        _check_nulls(batch, rows, where)
        counts += _check_batch(batch, manifest.num_classes, where)
        ids.add(batch.column("id").to_numpy())
        rows += batch.num_rows
    return counts, rows, ids


def check_shard(storage: Storage, shard: ShardInfo, manifest: DatasetManifest) -> ShardReport:
    """Run every check on one shard; DatasetError naming the shard on the first failure."""
    _check_integrity(storage, shard)
    where = storage.uri(shard.file)
    with storage.open_input(shard.file) as stream:
        counts, rows, ids = _check_contents(stream, manifest, where)
    if rows != shard.rows:
        raise DatasetError(f"shard {where} has {rows} rows, the manifest says {shard.rows}")
    if shard.id_min is not None and (ids.low, ids.high) != (shard.id_min, shard.id_max):
        raise DatasetError(f"shard {where} has ids in [{ids.low}, {ids.high}], "
                           f"the manifest says [{shard.id_min}, {shard.id_max}]")
    return ShardReport(shard.file, shard.split, rows, tuple(int(c) for c in counts), ids.low, ids.high,
                       ids.increasing)


# ------------------------------------------------------------------------------------ unique ids
def shards_that_may_share_ids(reports: list[ShardReport]) -> list[ShardReport]:
    """The shards that can hold an id another row also holds: those whose id range overlaps
    another shard's, and those whose ids do not strictly increase (they may repeat one inside)."""
    suspects = {report.file for report in reports if report.rows and not report.ids_increasing}
    reach = None  # of the shards swept so far (by first id), the one whose range ends last
    for report in sorted((r for r in reports if r.rows), key=lambda r: r.id_min):
        # A shard overlaps an earlier one exactly when it starts before the reach ends. Every
        # earlier shard it overlaps is marked too: it is the reach, or it overlapped the reach
        # (or the shard that took over the reach) when that one was swept.
        if reach is not None and report.id_min <= reach.id_max:
            suspects.update((report.file, reach.file))
        if reach is None or report.id_max > reach.id_max:
            reach = report
    return [report for report in reports if report.file in suspects]


def _bucket_ids(storage: Storage, file: str, buckets: int) -> np.ndarray | tuple[np.ndarray, ...]:
    """One shard's ids [N] split into `buckets` arrays by a hash of the id (one array for one bucket).

    Holds the shard's id column (8 bytes a row): bounded by the shard, as writing it was."""
    with storage.open_input(file) as stream:
        parts = [batch.column("id").to_numpy() for batch in
                 pq.ParquetFile(stream).iter_batches(batch_size=65_536, columns=["id"])]
    ids = np.concatenate(parts) if parts else np.empty(0, np.int64)
    if buckets == 1:
        return ids
    bucket = (splitmix_uniform(ids, 0) * buckets).astype(np.int64)
    return tuple(ids[bucket == index] for index in range(buckets))


def _repeated_id(*parts: np.ndarray) -> tuple[int, int, int] | None:
    """(id, shard, shard) of the smallest id found twice among `parts` (one per shard, in shard
    order; the two shards are equal when a shard repeats an id itself), or None."""
    ids = np.concatenate(parts)
    owners = np.repeat(np.arange(len(parts), dtype=np.int32), [len(part) for part in parts])
    order = np.argsort(ids, kind="stable")
    ordered_ids = ids[order]
    repeats = np.flatnonzero(ordered_ids[1:] == ordered_ids[:-1])
    if not len(repeats):
        return None
    first = repeats[0]
    return int(ordered_ids[first]), int(owners[order[first]]), int(owners[order[first + 1]])


def check_unique_ids(storage: Storage, reports: list[ShardReport], bucket_rows: int = BUCKET_ROWS,
                     progress: bool = False) -> None:
    """DatasetError naming a row id that two rows share, and their shard(s).

    Ids align teacher logits with rows, so a repeat silently pairs a row with another's targets.
    Shards whose measured id ranges are apart cannot share an id, so only the others are read
    again (none for kdray's synthetic data, whose shards hold consecutive ids). Their ids are
    hashed into buckets, one Ray task per shard, and one task per bucket sorts its ids and looks
    for equal neighbours: equal ids hash alike, so buckets can be checked apart and nothing is
    missed. The bucket count keeps a bucket near `bucket_rows` ids, so no task holds more than a
    shard's or a bucket's ids and the driver only object refs, at any dataset size (Ray spills
    the buckets to disk if they outgrow its object store). Hashing, not cutting the id range,
    keeps buckets even when ids cluster.
    """
    import ray

    suspects = shards_that_may_share_ids(reports)
    if not suspects:
        return
    buckets = max(1, math.ceil(sum(report.rows for report in suspects) / bucket_rows))
    split = ray.remote(num_cpus=0.5, num_returns=buckets)(_bucket_ids)
    parts = [split.remote(storage, report.file, buckets) for report in suspects]
    parts = [part if buckets > 1 else [part] for part in parts]
    find = ray.remote(num_cpus=0.5)(_repeated_id)
    found = gather([find.remote(*(part[bucket] for part in parts)) for bucket in range(buckets)],
                   desc="checking ids", progress=progress, unit="bucket")
    repeats = sorted(repeat for repeat in found if repeat is not None)
    if repeats:
        row_id, first, second = repeats[0]
        files = [storage.uri(suspects[first].file), storage.uri(suspects[second].file)]
        where = f"twice in shard {files[0]}" if first == second else f"in shards {files[0]} and {files[1]}"
        raise DatasetError(f"row id {row_id} appears {where}: row ids must be unique across the dataset")


def inspect_dataset(storage: Storage, progress: bool = False) -> DatasetReport:
    """Check all shards in parallel Ray tasks, then that no row id repeats; raises DatasetError
    naming the first bad shard."""
    import ray

    manifest = read_manifest(storage)
    check = ray.remote(num_cpus=0.5)(check_shard)
    pending = [check.remote(storage, shard, manifest) for shard in manifest.shards]
    reports = gather(pending, desc="checking shards", progress=progress, unit="shard")
    check_unique_ids(storage, reports, progress=progress)
    return DatasetReport(storage.location, manifest, tuple(sorted(reports, key=lambda r: r.file)))

