"""kdray.storage: one API over a local path or a URI, atomic writes, paths confined to the root."""

from __future__ import annotations

import os
import pickle

import pytest

from kdray.storage import Storage, StorageError


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
