"""The dataset format (kdray.data.shards), its shard-by-shard checks (kdray.data.validate) and
`kdray data inspect`: a good dataset is summarised, each kind of damage is named by its shard file."""

from __future__ import annotations

import dataclasses
import os
import re
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
from kdray.data.validate import ShardReport, check_shard, check_unique_ids, inspect_dataset, shards_that_may_share_ids
from kdray.runtime.storage import Storage

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
    shards = tuple(dataclasses.replace(s, rows=7) if s.file == BAD_SHARD else s for s in manifest.shards)
    write_manifest(dataset, dataclasses.replace(manifest, shards=shards))
    with pytest.raises(DatasetError, match=f"{BAD_SHARD} has 8 rows, the manifest says 7"):
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


# ------------------------------------------------------------------------------------ manifest fields
def _parent(manifest: dict, path: str) -> tuple:
    """(the object or list holding the field at dotted `path`, the field's key or index)."""
    *parents, last = [int(part) if part.isdigit() else part for part in path.split(".")]
    for part in parents:
        manifest = manifest[part]
    return manifest, last


def _set(path: str, value):
    """An edit of the manifest's JSON value that sets the field at dotted `path`."""
    def edit(manifest: dict) -> dict:
        node, key = _parent(manifest, path)
        node[key] = value
        return manifest
    return edit


def _drop(path: str):
    def edit(manifest: dict) -> dict:
        node, key = _parent(manifest, path)
        del node[key]
        return manifest
    return edit


def _no_rows(manifest: dict) -> dict:
    for shard in manifest["shards"]:
        shard.update(rows=0, id_min=None, id_max=None)
    return manifest


def _shard_twice(manifest: dict) -> dict:
    manifest["shards"].append(dict(manifest["shards"][0]))
    return manifest


def _field(name: str) -> str:
    return f"field shards[1].{name} (shard {BAD_SHARD})"


MALFORMED_MANIFESTS = {  # what a manifest.json says -> what the error must say (literally)
    "a JSON list": (lambda manifest: [manifest], "the manifest must be a JSON object, got a list"),
    "negative class count": (_set("num_classes", -3), "field num_classes must be at least 1, got -3"),
    "zero classes": (_set("num_classes", 0), "field num_classes must be at least 1, got 0"),
    "class count missing": (_drop("num_classes"), "field num_classes is missing"),
    "class count a string": (_set("num_classes", "3"), "field num_classes must be an integer, got '3'"),
    "class count a float": (_set("num_classes", 3.0), "field num_classes must be an integer, got 3.0"),
    "class count a boolean": (_set("num_classes", True), "field num_classes must be an integer, got a boolean"),
    "feature shape a string": (_set("feature_shape", "4"), "field feature_shape must be a list, got '4'"),
    "feature dimension zero": (_set("feature_shape", [4, 0]), "field feature_shape[1] must be an integer >= 1, got 0"),
    "feature shape empty": (_set("feature_shape", []), "field feature_shape is empty"),
    "shards an object": (_set("shards", {}), "field shards must be a list, got an object"),
    "shards null": (_set("shards", None), "field shards must be a list, got null"),
    "no shards": (_set("shards", []), "lists no shards: the dataset is empty"),
    "no rows": (_no_rows, "its 3 shard(s) hold no rows: the dataset is empty"),
    "shard a string": (_set("shards.1", "x.parquet"), "field shards[1] must be a JSON object, got 'x.parquet'"),
    "shard file missing": (_drop("shards.1.file"), "field shards[1].file is missing"),
    "shard rows missing": (_drop("shards.1.rows"), _field("rows") + " is missing"),
    "negative rows": (_set("shards.1.rows", -1), _field("rows") + " must be at least 0, got -1"),
    "unknown shard field": (_set("shards.1.weight", 1), "has unknown field(s) weight"),
    "unknown manifest field": (_set("num_clases", 3), "the manifest has unknown field(s) num_clases"),
    "unknown split": (_set("shards.1.split", "dev"),
                      _field("split") + " is 'dev'; expected one of train, validation, test"),
    "split a number": (_set("shards.1.split", 1), _field("split") + " must be a string, got 1"),
    "path escaping": (_set("shards.1.file", "../other/train-00001.parquet"),
                      "must be a relative path inside the dataset directory"),
    "absolute path": (_set("shards.1.file", "/etc/hosts"), "must be a relative path inside the dataset directory"),
    "shard listed twice": (_shard_twice, "field shards[3].file (shard train-00000.parquet) is listed twice"),
    "bad checksum text": (_set("shards.1.sha256", "abc"), _field("sha256") + " must be 64 lowercase hex digits"),
    "id range reversed": (_set("shards.1.id_min", 99), _field("id_min") + " 99 exceeds id_max 15"),
    "id range half set": (_set("shards.1.id_max", None), _field("id_min") + " and id_max must both be set"),
    "more rows than ids": (_set("shards.1.id_max", 12), _field("rows") + " 8 exceeds the 5 distinct ids"),
    "class names short": (_set("class_names", ["ant"]), "class_names has 1 entries, num_classes is 3"),
    "class name a number": (_set("class_names", ["ant", 2, "cat"]), "field class_names[1] must be a string, got 2"),
    "negative class group": (_set("class_groups", [0, -1, 0]), "field class_groups[1] must be an integer >= 0"),
    "source a list": (_set("source", []), "field source must be an object, got a list"),
}


@pytest.mark.parametrize("edit,message", MALFORMED_MANIFESTS.values(), ids=MALFORMED_MANIFESTS.keys())
def test_a_malformed_manifest_names_the_file_and_the_field(dataset, edit, message):
    dataset.write_json(edit(dataset.read_json(MANIFEST)), MANIFEST)
    with pytest.raises(DatasetError, match=re.escape(message)) as error:
        read_manifest(dataset)
    assert str(error.value).startswith(f"{dataset.path(MANIFEST)}") and "\n" not in str(error.value)


@pytest.mark.parametrize("data,message", [
    (b"{not json", "is not valid JSON (Expecting property name"),
    (b"", "is not valid JSON (Expecting value: line 1 column 1"),
    (b'{"format": "kdray-dataset/1", "num_classes": 3\xff}', "is not UTF-8 text (invalid start byte at byte 46)"),
    (b"\x89PNG\r\n\x1a\n", "is not UTF-8 text"),
], ids=["truncated JSON", "empty file", "a stray byte", "binary"])
def test_manifest_bytes_that_are_not_json_name_the_file(dataset, data, message):
    dataset.write_bytes(data, MANIFEST)
    with pytest.raises(DatasetError, match=re.escape(f"{dataset.path(MANIFEST)} {message}")):
        read_manifest(dataset)


def test_an_unreadable_manifest_is_a_dataset_error(dataset):
    dataset.delete(MANIFEST)
    dataset.makedirs(MANIFEST)  # a directory where the file should be
    with pytest.raises(DatasetError, match=re.escape(f"{dataset.path(MANIFEST)} cannot be read")):
        read_manifest(dataset)


def test_cli_prints_a_malformed_manifest_as_one_line(data_context, dataset, capsys):
    dataset.write_json([dataset.read_json(MANIFEST)], MANIFEST)
    code, out, err = inspect_cli(dataset.location, capsys)
    assert (code, out) == (2, "")
    assert err == f"kdray: error: {dataset.path(MANIFEST)}: the manifest must be a JSON object, got a list\n"


def test_a_manifest_without_id_ranges_still_reads_and_checks(data_context, dataset):
    """Manifests written before shards recorded their id ranges (or by other tools) stay valid."""
    value = dataset.read_json(MANIFEST)
    for shard in value["shards"]:
        del shard["id_min"], shard["id_max"]
    dataset.write_json(value, MANIFEST)
    assert {shard.id_min for shard in read_manifest(dataset).shards} == {None}
    assert [report.id_min for report in inspect_dataset(dataset).shards] == [16, 0, 8]  # sorted by file


def test_kdray_writes_no_manifest_it_would_refuse(dataset):
    manifest = read_manifest(dataset)
    assert [(s.id_min, s.id_max) for s in manifest.shards] == [(0, 7), (8, 15), (16, 23)]
    dataset.delete(MANIFEST)
    bad = dataclasses.replace(manifest.shards[1], split="dev")
    with pytest.raises(DatasetError, match=re.escape(f"{dataset.path(MANIFEST)}: field shards[1].split")):
        write_manifest(dataset, dataclasses.replace(manifest, shards=(manifest.shards[0], bad)))
    assert not dataset.exists(MANIFEST)


# ------------------------------------------------------------------------------------ shard paths
def _move_shard_out(dataset: Storage, target: Path, link: str = BAD_SHARD) -> None:
    """Move BAD_SHARD to `target` and leave a symlink `link` to it in the dataset."""
    target.parent.mkdir(parents=True, exist_ok=True)
    os.replace(dataset.path(BAD_SHARD), target)
    os.symlink(target, dataset.path(link))


def test_a_shard_linked_from_outside_the_directory_is_refused(dataset, tmp_path):
    _move_shard_out(dataset, tmp_path / "elsewhere" / BAD_SHARD)
    with pytest.raises(DatasetError, match=re.escape(
            f"{dataset.path(MANIFEST)}: shard {BAD_SHARD} resolves to {tmp_path / 'elsewhere' / BAD_SHARD}, "
            "outside the dataset directory")):
        read_manifest(dataset)


def test_a_shard_under_a_linked_folder_outside_is_refused(dataset, tmp_path):
    (tmp_path / "elsewhere").mkdir()
    os.replace(dataset.path(BAD_SHARD), tmp_path / "elsewhere" / BAD_SHARD)
    os.symlink(tmp_path / "elsewhere", dataset.path("part"))
    value = dataset.read_json(MANIFEST)
    value["shards"][1]["file"] = f"part/{BAD_SHARD}"
    dataset.write_json(value, MANIFEST)
    with pytest.raises(DatasetError, match=f"shard part/{BAD_SHARD} resolves to .*outside the dataset directory"):
        read_manifest(dataset)


def test_links_that_stay_inside_the_directory_are_fine(data_context, dataset, tmp_path):
    _move_shard_out(dataset, Path(dataset.path("store", BAD_SHARD)))  # a link to a file inside
    os.symlink(dataset.location, tmp_path / "alias")  # the dataset reached through a linked directory
    assert inspect_dataset(Storage(str(tmp_path / "alias"))).manifest == read_manifest(dataset)


# ------------------------------------------------------------------------------------ row ids
def build_shards(location: str, ids_per_shard: dict[str, list[int]], record_ranges: bool = False) -> Storage:
    """A dataset whose shards {file: ids} hold the given ids, in that order. Without
    `record_ranges` the manifest carries no id ranges, as another tool's might: the scan must find
    what the manifest does not say."""
    storage, infos = Storage(location), []
    for file, ids in ids_per_shard.items():
        ids = np.asarray(ids)
        table = shard_table(ids, np.zeros((len(ids), DIM), np.float32), np.abs(ids) % CLASSES)
        info = write_shard(storage, file, file.split("-")[0], table)
        infos.append(info if record_ranges else dataclasses.replace(info, id_min=None, id_max=None))
    write_manifest(storage, DatasetManifest(num_classes=CLASSES, feature_shape=(DIM,), shards=tuple(infos)))
    return storage


REPEATED_IDS = {  # shards -> the repeat the error names (DIR: the dataset directory)
    "across splits": ({"train-00000.parquet": range(8), "test-00000.parquet": range(7, 12)},
                      "row id 7 appears in shards DIR/train-00000.parquet and DIR/test-00000.parquet"),
    "inside one shard": ({"train-00000.parquet": [5, 3, 9, 3], "train-00001.parquet": range(10, 14)},
                         "row id 3 appears twice in shard DIR/train-00000.parquet"),
    "sorted, inside one shard": ({"train-00000.parquet": [0, 1, 1, 2]},
                                 "row id 1 appears twice in shard DIR/train-00000.parquet"),
    "interleaved shards": ({"train-00000.parquet": range(0, 20, 2), "validation-00000.parquet": [1, 3, 5, 8, 9]},
                           "row id 8 appears in shards DIR/train-00000.parquet and DIR/validation-00000.parquet"),
    "range inside another": ({"train-00000.parquet": range(100), "train-00001.parquet": [200, 201],
                              "test-00000.parquet": [-5, 50]},
                             "row id 50 appears in shards DIR/train-00000.parquet and DIR/test-00000.parquet"),
}


@pytest.mark.parametrize("ids,message", REPEATED_IDS.values(), ids=REPEATED_IDS.keys())
def test_a_repeated_row_id_names_the_shards(data_context, tmp_path, ids, message):
    storage = build_shards(str(tmp_path / "ds"), ids)
    with pytest.raises(DatasetError, match=re.escape(message.replace("DIR", storage.location))):
        inspect_dataset(storage)


def test_interleaved_shards_without_repeats_pass(data_context, tmp_path):
    storage = build_shards(str(tmp_path / "ds"), {"train-00000.parquet": range(0, 40, 2),
                                                  "validation-00000.parquet": range(1, 40, 2),
                                                  "test-00000.parquet": [41, 40, 42]})
    assert inspect_dataset(storage).manifest.rows() == 43


@pytest.mark.parametrize("bucket_rows", [1, 3, 1000])
def test_ids_are_checked_bucket_by_bucket(data_context, tmp_path, bucket_rows):
    """However the ids are split into buckets, a repeat is found and a clean dataset passes."""
    shards = {"train-00000.parquet": range(0, 30, 3), "train-00001.parquet": range(1, 30, 3),
              "test-00000.parquet": [29, 2, 26]}
    storage = build_shards(str(tmp_path / "ds"), shards)
    reports = [check_shard(storage, shard, read_manifest(storage)) for shard in read_manifest(storage).shards]
    check_unique_ids(storage, reports, bucket_rows=bucket_rows)
    shards["test-00000.parquet"] = [29, 2, 27]
    storage = build_shards(str(tmp_path / "again"), shards)
    reports = [check_shard(storage, shard, read_manifest(storage)) for shard in read_manifest(storage).shards]
    with pytest.raises(DatasetError, match="row id 27 appears in shards .*train-00000.parquet and .*test-00000"):
        check_unique_ids(storage, reports, bucket_rows=bucket_rows)


def _report(file: str, id_min: int, id_max: int, increasing: bool = True) -> ShardReport:
    return ShardReport(file, "train", id_max - id_min + 1, (), id_min, id_max, increasing)


@pytest.mark.parametrize("spans,expected", [
    ([(0, 9), (10, 19), (20, 29)], ""),  # consecutive: kdray's synthetic shards, nothing read again
    ([(20, 29), (0, 9), (10, 19)], ""),
    ([(0, 100), (1, 5), (50, 60), (200, 300)], "abc"),
    ([(0, 5), (2, 20), (15, 16), (30, 31)], "abc"),
    ([(0, 5), (6, 9, False), (10, 11)], "b"),  # ids not increasing: may repeat inside the shard
    ([(0, 5), (5, 9)], "ab"),  # sharing only an end point
])
def test_only_shards_that_may_share_an_id_are_read_again(spans, expected):
    reports = [_report(file, *span) for file, span in zip("abcd", spans)]
    assert "".join(report.file for report in shards_that_may_share_ids(reports)) == expected


def test_an_id_range_other_than_the_manifests_names_the_shard(data_context, dataset):
    value = dataset.read_json(MANIFEST)
    value["shards"][1]["id_max"] = 16
    dataset.write_json(value, MANIFEST)
    with pytest.raises(DatasetError, match=re.escape(
            f"shard {dataset.path(BAD_SHARD)} has ids in [8, 15], the manifest says [8, 16]")):
        inspect_dataset(dataset)


@pytest.mark.parametrize("column,row", [("id", 3), ("y", 6), ("x", 0)])
def test_a_null_value_names_the_shard_column_and_row(data_context, dataset, column, row):
    table = shard_table(*shard_arrays(ROWS_PER_SHARD))
    values = table.column(column).to_pylist()
    values[row] = None
    field = table.schema.field(column)
    replace_shard(dataset, BAD_SHARD, table.set_column(table.schema.get_field_index(column), field,
                                                       pa.array(values, field.type)))
    with pytest.raises(DatasetError, match=re.escape(f"shard {dataset.path(BAD_SHARD)}: column {column} is null "
                                                     f"in row {row} of the shard")):
        inspect_dataset(dataset)


def test_the_data_stage_checks_a_parquet_dataset_for_repeated_ids(data_context, tmp_path):
    from kdray.config import DataConfig
    from kdray.data import prepare_dataset

    build_shards(str(tmp_path / "ds"), {"train-00000.parquet": range(8), "test-00000.parquet": range(7, 12)},
                 record_ranges=True)
    config = DataConfig(source="parquet", path=str(tmp_path / "ds"))
    with pytest.raises(DatasetError, match="row id 7 appears in shards"):
        prepare_dataset(config, Storage(str(tmp_path / "run" / "dataset")))
