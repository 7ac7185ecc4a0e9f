"""The kdray dataset format: Parquet shards plus `manifest.json`, read as a streaming Ray Dataset.

A dataset directory holds `SPLIT-NNNNN.parquet` shards and one manifest recording the schema, the
feature shape, the number of classes, and per shard its split, row count, byte size, SHA-256 and
id range. Reading the manifest checks every field and what readers assume of the whole: a known
split per shard, at least one row, shard paths that stay inside the directory (symlinks resolved).
Each row is ``id: int64`` (unique across the dataset, stable: it aligns teacher logits with rows),
``x: fixed_size_list<float32>[D]`` (features, flattened) and ``y: int64`` (label in [0, C), or -1
for an unlabeled row). A shard belongs to exactly one split, so splits never share a row.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import posixpath
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from kdray.runtime.storage import Storage

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
    # The shard's smallest and largest row id (None for an empty shard, or a manifest written
    # before they were recorded): shards whose ranges do not overlap cannot share an id, so the
    # duplicate-id check scans only the shards whose ranges do (kdray.data.validate).
    id_min: int | None = None
    id_max: int | None = None


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
    def from_json(cls, value: Any, where: str) -> DatasetManifest:
        """Parse a manifest's JSON value; DatasetError naming `where` and the field on anything malformed."""
        fields = _Fields(value, "", where)
        if value.get("format") != FORMAT:
            raise DatasetError(f"{where}: format is {value.get('format')!r}, expected {FORMAT!r}")
        fields.check_keys(_MANIFEST_KEYS)
        groups = fields.items("class_groups", int, minimum=0, default=None)
        manifest = cls(
            num_classes=fields.integer("num_classes", minimum=1),
            feature_shape=tuple(fields.items("feature_shape", int, minimum=1)),
            shards=tuple(_shard_from_json(shard, index, where)
                         for index, shard in enumerate(fields.get("shards", list))),
            class_names=tuple(fields.items("class_names", str, default=[])),
            class_groups=tuple(groups) if groups is not None else None,
            source=fields.get("source", dict, {}),
        )
        manifest.check(where)
        return manifest

    def check(self, where: str) -> None:
        """What every reader assumes of a dataset beyond each field's type: DatasetError naming `where`."""
        if not self.feature_shape:
            raise DatasetError(f"{where}: field feature_shape is empty")
        for name, values in (("class_names", self.class_names), ("class_groups", self.class_groups or ())):
            if values and len(values) != self.num_classes:
                raise DatasetError(f"{where}: {name} has {len(values)} entries, num_classes is {self.num_classes}")
        if not self.shards:
            raise DatasetError(f"{where} lists no shards: the dataset is empty")
        if self.rows() == 0:
            raise DatasetError(f"{where}: its {len(self.shards)} shard(s) hold no rows: the dataset is empty")
        seen = set()
        for index, shard in enumerate(self.shards):
            problem = _shard_problem(shard, seen)
            if problem:
                raise DatasetError(f"{where}: field shards[{index}].{problem[0]} (shard {shard.file}) {problem[1]}")
            seen.add(shard.file)


_MANIFEST_KEYS = frozenset({"format", "schema", "splits", *(f.name for f in dataclasses.fields(DatasetManifest))})
_SHARD_KEYS = frozenset(f.name for f in dataclasses.fields(ShardInfo))
_KINDS = {int: "an integer", str: "a string", list: "a list", dict: "an object"}
_REQUIRED = object()


class _Fields:
    """Typed access to one JSON object of a manifest; each error names the file and the field."""

    def __init__(self, value: Any, name: str, where: str):
        self.value, self.name, self.where, self.about = value, name, where, ""
        if not isinstance(value, dict):
            raise self.error("", f"must be a JSON object, got {_describe(value)}")

    def error(self, key: str, problem: str) -> DatasetError:
        name = ".".join(part for part in (self.name, key) if part)
        return DatasetError(f"{self.where}: {f'field {name}' if name else 'the manifest'}{self.about} {problem}")

    def check_keys(self, known: frozenset[str]) -> None:
        unknown = sorted(set(self.value) - known)
        if unknown:
            raise self.error("", f"has unknown field(s) {', '.join(unknown)} (known: {', '.join(sorted(known))})")

    def get(self, key: str, kind: type, default: Any = _REQUIRED) -> Any:
        """The field's value, of `kind`; `default` when absent (or null, for a default of None)."""
        if key not in self.value or (self.value[key] is None and default is None):
            if default is _REQUIRED:
                raise self.error(key, "is missing")
            return default
        value = self.value[key]
        if not _is_kind(value, kind):
            raise self.error(key, f"must be {_KINDS[kind]}, got {_describe(value)}")
        return value

    def integer(self, key: str, minimum: int | None = None, default: Any = _REQUIRED) -> Any:
        value = self.get(key, int, default)
        if value is not default and minimum is not None and value < minimum:
            raise self.error(key, f"must be at least {minimum}, got {value}")
        return value

    def items(self, key: str, kind: type, minimum: int | None = None, default: Any = _REQUIRED) -> list:
        """A list field whose every entry is of `kind` (and at least `minimum`, for integers)."""
        values = self.get(key, list, default)
        for index, value in enumerate(values or ()):
            if not _is_kind(value, kind) or (minimum is not None and value < minimum):
                bound = f" >= {minimum}" if minimum is not None else ""
                raise self.error(f"{key}[{index}]", f"must be {_KINDS[kind]}{bound}, got {_describe(value)}")
        return values


def _is_kind(value: Any, kind: type) -> bool:
    return isinstance(value, kind) and not (kind is int and isinstance(value, bool))  # JSON true is no count


def _describe(value: Any) -> str:
    names = {dict: "an object", list: "a list", bool: "a boolean", type(None): "null"}
    return names.get(type(value)) or repr(value)[:40]


def _shard_from_json(value: Any, index: int, where: str) -> ShardInfo:
    fields = _Fields(value, f"shards[{index}]", where)
    fields.check_keys(_SHARD_KEYS)
    fields.about = f" (shard {fields.get('file', str)})"
    return ShardInfo(file=fields.get("file", str), split=fields.get("split", str),
                     rows=fields.integer("rows", minimum=0), bytes=fields.integer("bytes", minimum=0),
                     sha256=fields.get("sha256", str), id_min=fields.integer("id_min", default=None),
                     id_max=fields.integer("id_max", default=None))


def _shard_problem(shard: ShardInfo, earlier_files: set[str]) -> tuple[str, str] | None:
    """(field, problem) for a shard entry that readers would misread; None if it is sound."""
    if shard.split not in SPLITS:
        return "split", f"is {shard.split!r}; expected one of {', '.join(SPLITS)}"
    if not _is_relative_inside(shard.file):
        return "file", "must be a relative path inside the dataset directory"
    if shard.file in earlier_files:
        return "file", "is listed twice"
    if len(shard.sha256) != 64 or shard.sha256.strip("0123456789abcdef"):
        return "sha256", f"must be 64 lowercase hex digits, got {shard.sha256[:70]!r}"
    return _id_range_problem(shard)


def _is_relative_inside(file: str) -> bool:
    """A relative path that stays under the directory as written; where it resolves to (symlinks)
    is checked against the filesystem when the manifest is read (read_manifest)."""
    normal = posixpath.normpath(file) if file else "."
    return not (normal in (".", "..") or normal.startswith(("/", "../")) or "://" in file or "\\" in file)


def _id_range_problem(shard: ShardInfo) -> tuple[str, str] | None:
    """(field, problem) if the shard's id range is inconsistent with itself or its row count."""
    bounds = (shard.id_min, shard.id_max)
    if bounds == (None, None):
        return None
    if shard.rows == 0 or None in bounds:
        return "id_min", f"and id_max must both be set when a shard has rows and both null when not (rows {shard.rows})"
    if shard.id_min > shard.id_max:
        return "id_min", f"{shard.id_min} exceeds id_max {shard.id_max}"
    if shard.id_max - shard.id_min + 1 < shard.rows:  # pigeonhole: some id repeats within the shard
        return "rows", f"{shard.rows} exceeds the {shard.id_max - shard.id_min + 1} distinct ids in [id_min, id_max]"
    return None


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
    ids = pc.min_max(table.column("id"))
    return ShardInfo(file=file, split=split, rows=table.num_rows, bytes=len(data),
                     sha256=hashlib.sha256(data).hexdigest(), id_min=ids["min"].as_py(), id_max=ids["max"].as_py())


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:05d}.parquet"


def write_manifest(storage: Storage, manifest: DatasetManifest) -> None:
    """Written last: a dataset directory without a manifest is incomplete. Checked first, so kdray
    never writes a manifest it would refuse to read."""
    manifest.check(storage.uri(MANIFEST))
    storage.write_json(manifest.to_json(), MANIFEST)


def read_manifest(storage: Storage) -> DatasetManifest:
    """The dataset's manifest, checked field by field; DatasetError naming the file on any fault."""
    where = storage.uri(MANIFEST)
    if not storage.exists(MANIFEST):
        raise DatasetError(f"{where} not found: not a kdray dataset (or an unfinished one)")
    try:
        text = storage.read_bytes(MANIFEST).decode("utf-8")
        value = json.loads(text)
    except OSError as error:
        raise DatasetError(f"{where} cannot be read: {error}") from None
    except UnicodeDecodeError as error:
        raise DatasetError(f"{where} is not UTF-8 text ({error.reason} at byte {error.start})") from None
    except ValueError as error:  # json.JSONDecodeError, and a number too long to parse
        raise DatasetError(f"{where} is not valid JSON ({error})") from None
    manifest = DatasetManifest.from_json(value, where)
    _check_shards_inside(storage, manifest, where)
    return manifest


def _check_shards_inside(storage: Storage, manifest: DatasetManifest, where: str) -> None:
    """Refuse a shard that resolves (through symlinks) outside the dataset directory: it could be
    another dataset's file, which a rewrite or delete of this dataset would then reach."""
    for shard in manifest.shards:
        if not storage.contains(storage.child(shard.file)):
            raise DatasetError(f"{where}: shard {shard.file} resolves to {os.path.realpath(storage.path(shard.file))}, "
                               f"outside the dataset directory")


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
    footer-reading tasks and streams kdray's shards an order of magnitude slower (measured in
    benchmarks/performance.md). kdray always knows its files and schema from a manifest, so V2's discovery buys
    nothing here. The switch is read when the Dataset is created, so it is flipped only for that.
    Its executions learn their resource limits at once (kdray.runtime.raydata).
    """
    import ray.data

    from kdray.runtime.raydata import prompt_resource_limits

    if isinstance(paths, (list, tuple)):
        # One block per shard: Ray would otherwise cut each file into several blocks to reach its
        # default parallelism, and per-block costs dominate a small model's input pipeline.
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
