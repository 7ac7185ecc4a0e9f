"""kdray.runtime.storage: one API over a local path or a URI, atomic writes, paths confined to the root."""

from __future__ import annotations

import os
import pickle

import pytest

from kdray.runtime.storage import Storage, StorageError, check_replaceable, staged_output


@pytest.fixture(params=["path", "file-uri"])
def storage(request, tmp_path) -> Storage:
    root = tmp_path / "root"
    return Storage(str(root) if request.param == "path" else f"file://{root}")


def files_under(directory) -> list[str]:
    return sorted(os.path.relpath(os.path.join(d, f), directory) for d, _, fs in os.walk(directory) for f in fs)


def test_json_text_and_bytes_round_trip(storage):
    value = {"b": [1, 2.5, None], "a": {"nested": "é"}}
    storage.write_json(value, "stage", "manifest.json")
    storage.write_text("hello\n", "stage", "notes.txt")
    storage.write_bytes(b"\x00\xff", "blob.bin")
    assert storage.read_json("stage", "manifest.json") == value
    assert storage.read_text("stage/notes.txt") == "hello\n"
    assert storage.read_bytes("blob.bin") == b"\x00\xff"
    assert storage.size("blob.bin") == 2
    with storage.open_input("blob.bin") as stream:
        assert stream.read() == b"\x00\xff"


def test_writes_land_in_the_root_directory_on_disk(storage, tmp_path):
    storage.write_text("x", "a", "b.txt")
    assert (tmp_path / "root" / "a" / "b.txt").read_text() == "x"


def test_list_exists_is_dir_and_delete(storage):
    assert storage.list() == [] and not storage.exists()
    storage.write_text("1", "d", "one.txt")
    storage.write_text("2", "d", "two.txt")
    storage.write_text("3", "top.txt")
    assert storage.list() == ["d", "top.txt"]
    assert storage.list("d") == ["one.txt", "two.txt"]
    assert storage.list("top.txt") == [] and storage.list("nothing") == []
    assert storage.exists("d", "one.txt") and storage.is_dir("d") and not storage.is_dir("top.txt")
    storage.delete("d", "one.txt")
    assert not storage.exists("d", "one.txt") and storage.exists("d", "two.txt")
    storage.delete("d")
    assert not storage.exists("d") and storage.list() == ["top.txt"]
    storage.delete("never-there")  # deleting what does not exist is not an error


def test_writes_are_atomic_and_leave_no_temporary_files(storage, tmp_path):
    storage.write_json({"v": 1}, "m.json")
    storage.write_json({"v": 2}, "m.json")  # replacing an existing file
    assert storage.read_json("m.json") == {"v": 2}
    assert files_under(tmp_path / "root") == ["m.json"]


def test_failed_write_keeps_the_old_file_and_removes_the_temporary(storage, tmp_path):
    storage.write_text("old", "m.txt")
    with pytest.raises(RuntimeError, match="crash"):
        with storage.atomic_output("m.txt") as temporary:
            with storage.filesystem.open_output_stream(temporary) as stream:
                stream.write(b"half a fi")
            raise RuntimeError("crash")
    assert storage.read_text("m.txt") == "old"
    assert files_under(tmp_path / "root") == ["m.txt"]


def test_reading_a_missing_file_names_it(storage):
    with pytest.raises(FileNotFoundError, match="missing.json"):
        storage.read_json("missing.json")


@pytest.mark.parametrize("parts", [("..",), ("../sibling",), ("a", "..", "..", "b"), ("/etc/passwd",), ("a", "/abs")])
def test_paths_escaping_the_root_are_rejected(storage, parts):
    with pytest.raises(StorageError, match="escapes storage root"):
        storage.path(*parts)
    with pytest.raises(StorageError):
        storage.write_text("x", *parts)
    with pytest.raises(StorageError):
        storage.child(*parts)


def test_dotdot_that_stays_inside_the_root_is_allowed(storage):
    storage.write_text("x", "a", "..", "b.txt")
    assert storage.list() == ["b.txt"]


def test_check_writable_creates_the_root_and_leaves_nothing(storage, tmp_path):
    storage.check_writable()
    assert os.path.isdir(tmp_path / "root") and files_under(tmp_path / "root") == []


def test_check_writable_under_a_regular_file_names_the_location(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    for location in (str(blocker / "runs"), f"file://{blocker}/runs"):
        with pytest.raises(StorageError, match="is not writable") as error:
            Storage(location).check_writable()
        assert str(blocker / "runs") in str(error.value)


@pytest.mark.parametrize("location", ["", "unknownscheme://bucket/x"])
def test_unusable_locations_raise_storage_error(location):
    with pytest.raises(StorageError):
        Storage(location)


def test_pickle_round_trip_keeps_the_location_and_works(storage):
    storage.write_text("payload", "f.txt")
    copy = pickle.loads(pickle.dumps(storage))
    assert copy.location == storage.location and copy.root == storage.root
    assert copy.read_text("f.txt") == "payload"


def test_local_path_is_made_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    storage = Storage("relative/dir")
    assert storage.location == str(tmp_path / "relative" / "dir")
    assert storage.uri("x") == str(tmp_path / "relative" / "dir" / "x")


def test_file_uri_child_and_uri_round_trip(tmp_path):
    storage = Storage(f"file://{tmp_path}/root")
    assert storage.uri() == f"file://{tmp_path}/root"
    assert storage.uri("run", "stage") == f"file://{tmp_path}/root/run/stage"
    child = storage.child("run", "stage")
    assert child.location == storage.uri("run", "stage")
    assert Storage(child.uri()).location == child.location
    child.write_text("x", "out.txt")
    assert storage.read_text("run", "stage", "out.txt") == "x"
    assert (tmp_path / "root" / "run" / "stage" / "out.txt").exists()


def test_local_child_is_a_plain_path(tmp_path):
    child = Storage(str(tmp_path)).child("run")
    assert child.location == str(tmp_path / "run")


# ------------------------------------------------------------------------------------ replacing outputs
def write_output(storage: Storage, files: dict[str, str]) -> None:
    for name, text in files.items():
        storage.write_text(text, name)


def is_own(manifest) -> bool:
    return isinstance(manifest, dict) and manifest.get("kind") == "test-output"


OWN = '{"kind": "test-output"}'


def test_staged_output_replaces_only_once_the_new_output_is_complete(storage, tmp_path):
    output = storage.child("out")
    write_output(output, {"manifest.json": OWN, "old-shard": "old"})
    with staged_output(output, "manifest.json") as staging:
        write_output(staging, {"new-shard": "new"})
        assert output.read_text("old-shard") == "old"  # untouched while the new output is written
        staging.write_text(OWN, "manifest.json")
    assert files_under(tmp_path / "root") == ["out/manifest.json", "out/new-shard"]


def test_a_failed_staged_output_leaves_the_old_one_and_no_staging(storage, tmp_path):
    output = storage.child("out")
    write_output(output, {"manifest.json": OWN, "old-shard": "old"})
    with pytest.raises(RuntimeError, match="source went bad"):
        with staged_output(output, "manifest.json") as staging:
            write_output(staging, {"new-shard": "new"})
            raise RuntimeError("source went bad")
    with pytest.raises(StorageError, match="not finished"):
        with staged_output(output, "manifest.json") as staging:
            write_output(staging, {"new-shard": "new"})  # and no manifest
    assert files_under(tmp_path / "root") == ["out/manifest.json", "out/old-shard"]


def test_a_symlinked_output_keeps_its_link_and_its_target_is_replaced(tmp_path):
    (tmp_path / "target").mkdir()
    (tmp_path / "target" / "manifest.json").write_text(OWN)
    os.symlink(tmp_path / "target", tmp_path / "link")
    with staged_output(Storage(str(tmp_path / "link")), "manifest.json") as staging:
        write_output(staging, {"new-shard": "new", "manifest.json": OWN})
    assert os.path.islink(tmp_path / "link") and files_under(tmp_path / "target") == ["manifest.json", "new-shard"]


def test_an_object_store_output_is_replaced_manifest_last_without_rename():
    output = Storage("mock:///bucket/out")
    staging = Storage("mock:///bucket/.out.kdray-new-1")
    staging.filesystem = output.filesystem  # pyarrow's in-memory filesystem, one per URI otherwise
    write_output(output, {"manifest.json": OWN, "old-shard": "old", "kept/part": "old part"})
    write_output(staging, {"manifest.json": '{"kind": "test-output", "new": 1}', "kept/part": "new part", "b": "b"})
    output.replace_with(staging, "manifest.json")
    assert sorted(output.files()) == ["b", "kept/part", "manifest.json"] and not staging.exists()
    assert output.read_json("manifest.json")["new"] == 1 and output.read_text("kept/part") == "new part"


@pytest.mark.parametrize("contents, overwrite, message", [
    ({"notes.txt": "mine"}, True, "holds files but no kdray test output"),
    ({"manifest.json": '{"kind": "other"}'}, True, "holds files but no kdray test output"),
    ({"manifest.json": "not json"}, True, "holds files but no kdray test output"),
    ({"manifest.json": OWN}, False, "pass --overwrite"),
])
def test_check_replaceable_refuses_what_kdray_must_not_replace(storage, contents, overwrite, message):
    output = storage.child("out")
    write_output(output, contents)
    with pytest.raises(StorageError, match=message):
        check_replaceable(output, "test output", "manifest.json", is_own, overwrite)


def test_check_replaceable_accepts_new_empty_and_own_outputs(storage):
    check_replaceable(storage.child("new"), "test output", "manifest.json", is_own, overwrite=False)
    storage.makedirs("empty")
    check_replaceable(storage.child("empty"), "test output", "manifest.json", is_own, overwrite=False)
    write_output(storage.child("own"), {"manifest.json": OWN})
    check_replaceable(storage.child("own"), "test output", "manifest.json", is_own, overwrite=True)


def test_outputs_overlapping_an_input_are_refused_even_through_a_symlink(tmp_path):
    (tmp_path / "data").mkdir()
    os.symlink(tmp_path / "data", tmp_path / "alias")
    data = Storage(str(tmp_path / "data"))
    for output in (tmp_path / "alias" / "predictions", tmp_path / "data", tmp_path):
        with pytest.raises(StorageError, match="must not contain each other"):
            check_replaceable(Storage(str(output)), "test output", "manifest.json", is_own, True, {"data": data})
    assert not data.contains(Storage(str(tmp_path / "data-2")))  # a shared prefix is not containment


def test_a_bucket_or_filesystem_root_has_no_sibling():
    for location in ("/", "mock:///bucket"):  # mock: pyarrow's in-memory filesystem, as a bucket
        with pytest.raises(StorageError, match="root"):
            Storage(location).sibling("x")
