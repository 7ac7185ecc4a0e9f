"""The dataset format (kdray.data.shards), its shard-by-shard checks (kdray.data.validate) and
`kdray data inspect`: a good dataset is summarised, each kind of damage is named by its shard file."""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from kdray.cli import main
from kdray.data.shards import (
    MANIFEST,
    DatasetError,
    DatasetManifest,
    read_manifest,
    read_split,
    shard_name,
    shard_schema,
    shard_table,
    write_manifest,
    write_shard,
)
from kdray.data.validate import inspect_dataset
from kdray.storage import Storage

CLASSES, DIM, ROWS_PER_SHARD = 3, 4, 8
LAYOUT = (("train", 0), ("train", 1), ("test", 0))  # 3 shards: 16 train rows, 8 test rows
BAD_SHARD = shard_name("train", 1)


def shard_arrays(first_id: int, rows: int = ROWS_PER_SHARD) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    ids = np.arange(first_id, first_id + rows)
    features = np.random.default_rng(first_id).normal(size=(rows, DIM)).astype(np.float32)
    return ids, features, ids % CLASSES


def build_dataset(location: str) -> DatasetManifest:
    storage, infos = Storage(location), []
    for position, (split, index) in enumerate(LAYOUT):
        table = shard_table(*shard_arrays(position * ROWS_PER_SHARD))
        infos.append(write_shard(storage, shard_name(split, index), split, table))
    manifest = DatasetManifest(num_classes=CLASSES, feature_shape=(DIM,), shards=tuple(infos),
                               class_names=("ant", "bee", "cat"), source={"kind": "test"})
    write_manifest(storage, manifest)
    return manifest


def replace_shard(storage: Storage, file: str, table: pa.Table) -> None:
    """Rewrite a shard and record its new size and checksum, so a content check must catch it."""
    manifest = read_manifest(storage)
    old = next(shard for shard in manifest.shards if shard.file == file)
    new = write_shard(storage, file, old.split, table)
    write_manifest(storage, dataclasses.replace(
        manifest, shards=tuple(new if shard.file == file else shard for shard in manifest.shards)))


@pytest.fixture
def dataset(tmp_path) -> Storage:
    build_dataset(str(tmp_path / "ds"))
    return Storage(str(tmp_path / "ds"))


@pytest.fixture
def data_context(ray_local):
    """The local Ray, with Ray Data's default context created once with Ray's own warning silenced:
    in Ray 2.60 `DataContext()` warns that its default `use_push_based_shuffle` is deprecated.
    pyproject ignores that warning, but a command-line `-W error::DeprecationWarning` overrides the
    ignore, and both `read_split` and `ray_session` (the CLI) create the context."""
    from ray.data import DataContext

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning, module="ray.data.context")
        return DataContext.get_current()


def inspect_cli(location: str, capsys) -> tuple[int, str, str]:
    code = main(["data", "inspect", location])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# ------------------------------------------------------------------------------------ format
def test_manifest_round_trips_and_records_each_shard(dataset):
    manifest = read_manifest(dataset)
    assert manifest == build_dataset(dataset.location)  # rewritten identically: deterministic bytes
    assert [s.file for s in manifest.shards] == ["train-00000.parquet", "train-00001.parquet", "test-00000.parquet"]
    assert manifest.rows() == 24 and manifest.rows("train") == 16 and manifest.rows("validation") == 0
    assert manifest.split_names() == ["train", "test"]
    assert all(shard.bytes == dataset.size(shard.file) for shard in manifest.shards)
    value = dataset.read_json(MANIFEST)
    assert value["format"] == "kdray-dataset/1" and value["splits"]["train"] == {"rows": 16, "shards": 2}


def test_shard_table_has_the_documented_schema():
    table = shard_table(*shard_arrays(0))
    assert table.schema.equals(shard_schema(DIM))
    assert table.schema.field("x").type == pa.list_(pa.float32(), DIM)
    assert table.column("y").to_pylist() == [0, 1, 2, 0, 1, 2, 0, 1]


def test_a_manifest_of_another_format_is_rejected(dataset):
    value = dataset.read_json(MANIFEST)
    value["format"] = "something-else/2"
    dataset.write_json(value, MANIFEST)
    with pytest.raises(DatasetError, match="format is 'something-else/2'"):
        read_manifest(dataset)


def test_a_manifest_that_is_not_json_is_a_dataset_error(dataset):
    dataset.write_text("{not json", MANIFEST)
    with pytest.raises(DatasetError, match="not valid JSON"):
        read_manifest(dataset)


def test_read_split_streams_the_split_rows(data_context, dataset):
    import ray.data

    train = read_split(dataset, "train")
    assert isinstance(train, ray.data.Dataset)
    assert train.count() == 16
    assert train.columns() == ["id", "x", "y"]
    rows = train.take_all()
    assert [row["id"] for row in rows] == list(range(16))  # shard order, rows in order
    np.testing.assert_array_equal(np.asarray(rows[9]["x"], np.float32), shard_arrays(8)[1][1])
    assert read_split(dataset, "test").count() == 8
    with pytest.raises(DatasetError, match="no shards for split 'validation'"):
        read_split(dataset, "validation")


# ------------------------------------------------------------------------------------ checks
def test_inspect_reports_rows_and_class_histogram(data_context, dataset):
    report = inspect_dataset(dataset)
    assert [shard.rows for shard in report.shards] == [8, 8, 8]
    np.testing.assert_array_equal(report.class_histogram(), [8, 8, 8, 0])  # index C: unlabeled rows
    np.testing.assert_array_equal(report.class_histogram("train"), [6, 5, 5, 0])  # ids 0..15 mod 3


def test_unlabeled_rows_are_valid_and_counted_apart(data_context, dataset):
    ids, features, labels = shard_arrays(ROWS_PER_SHARD)
    labels = np.where(ids % 2 == 0, -1, labels)
    replace_shard(dataset, BAD_SHARD, shard_table(ids, features, labels))
    report = inspect_dataset(dataset)
    assert report.class_histogram()[CLASSES] == 4 and report.class_histogram().sum() == 24


def test_cli_inspect_prints_the_summary(data_context, dataset, capsys):
    code, out, err = inspect_cli(dataset.location, capsys)
    assert code == 0, err
    assert "rows           24  (train: 16, test: 8)" in out
    assert "shards         3" in out
    assert "feature shape  (4,)" in out
    assert "classes        3" in out
    histogram = {line.split()[0]: int(line.split()[1]) for line in out.splitlines()[-4:-1]}
    assert histogram == {"ant": 8, "bee": 8, "cat": 8}
    assert out.rstrip().endswith("all shards OK")


def _wrong_float_type(table: pa.Table) -> pa.Table:
    features = table.column("x").combine_chunks().flatten().cast(pa.float64())
    return table.set_column(1, "x", pa.FixedSizeListArray.from_arrays(features, DIM))


def _variable_length_lists(table: pa.Table) -> pa.Table:
    return table.set_column(1, "x", table.column("x").cast(pa.list_(pa.float32())))


def _extra_column(table: pa.Table) -> pa.Table:
    return table.append_column("weight", pa.array(np.ones(table.num_rows)))


def _int32_labels(table: pa.Table) -> pa.Table:
    return table.set_column(2, "y", table.column("y").cast(pa.int32()))


@pytest.mark.parametrize("change", [_wrong_float_type, _variable_length_lists, _extra_column, _int32_labels])
def test_schema_differing_from_the_manifest_names_the_shard(data_context, dataset, capsys, change):
    replace_shard(dataset, BAD_SHARD, change(shard_table(*shard_arrays(ROWS_PER_SHARD))))
    code, _, err = inspect_cli(dataset.location, capsys)
    assert code == 2
    assert f"shard {dataset.path(BAD_SHARD)} has schema" in err


@pytest.mark.parametrize("bad_label", [CLASSES, 99, -2])
def test_label_outside_the_classes_names_the_shard(data_context, dataset, capsys, bad_label):
    ids, features, labels = shard_arrays(ROWS_PER_SHARD)
    labels[5] = bad_label
    replace_shard(dataset, BAD_SHARD, shard_table(ids, features, labels))
    code, _, err = inspect_cli(dataset.location, capsys)
    assert code == 2
    assert f"shard {dataset.path(BAD_SHARD)}: label {bad_label} outside [0, 3) (row id 13)" in err


@pytest.mark.parametrize("bad_value", [np.nan, np.inf, -np.inf])
def test_non_finite_feature_names_the_shard_and_row(data_context, dataset, capsys, bad_value):
    ids, features, labels = shard_arrays(ROWS_PER_SHARD)
    features[3, 2] = bad_value
    replace_shard(dataset, BAD_SHARD, shard_table(ids, features, labels))
    code, _, err = inspect_cli(dataset.location, capsys)
    assert code == 2
    assert f"shard {dataset.path(BAD_SHARD)}: NaN or infinite feature (row id 11)" in err


def test_flipped_byte_fails_the_checksum(data_context, dataset, capsys):
    path = dataset.path(BAD_SHARD)
    data = bytearray(Path(path).read_bytes())
    data[len(data) // 2] ^= 0xFF
    Path(path).write_bytes(bytes(data))
    code, _, err = inspect_cli(dataset.location, capsys)
    assert code == 2
    assert f"shard {path} fails its checksum" in err


def test_truncated_shard_is_named(data_context, dataset, capsys):
    path = dataset.path(BAD_SHARD)
    data = Path(path).read_bytes()
    Path(path).write_bytes(data[: len(data) - 100])
    code, _, err = inspect_cli(dataset.location, capsys)
    assert code == 2
    assert f"shard {path} is truncated or altered: {len(data) - 100} bytes, manifest says {len(data)}" in err


def test_shard_in_the_manifest_but_missing_is_named(data_context, dataset, capsys):
    dataset.delete(BAD_SHARD)
    code, _, err = inspect_cli(dataset.location, capsys)
    assert code == 2
    assert f"shard {dataset.path(BAD_SHARD)} is listed in manifest.json but missing" in err


def test_row_count_differing_from_the_manifest_is_named(data_context, dataset):
    manifest = read_manifest(dataset)
    shards = tuple(dataclasses.replace(s, rows=9) if s.file == BAD_SHARD else s for s in manifest.shards)
    write_manifest(dataset, dataclasses.replace(manifest, shards=shards))
    with pytest.raises(DatasetError, match=f"{BAD_SHARD} has 8 rows, the manifest says 9"):
        inspect_dataset(dataset)


def test_directory_without_manifest_is_not_a_dataset(data_context, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "train-00000.parquet").write_bytes(b"PAR1")
    code, out, err = inspect_cli(str(tmp_path / "empty"), capsys)
    assert code == 2 and out == ""
    assert f"{tmp_path / 'empty' / 'manifest.json'} not found: not a kdray dataset" in err


def test_inspect_through_a_file_uri(data_context, dataset, capsys):
    code, out, err = inspect_cli(f"file://{dataset.location}", capsys)
    assert code == 0, err
    assert "all shards OK" in out
