"""kdray.data.idx: IDX parsing, the import into shards, and fetch (local copies and a local HTTP server)."""

from __future__ import annotations

import functools
import gzip
import hashlib
import http.server
import os
import socket
import threading
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from kdray.data import idx
from kdray.data.idx import fetch, find_idx_files, import_idx, read_idx
from kdray.data.shards import DatasetError, read_manifest
from kdray.storage import Storage

DEBIAN_DIR = "/usr/share/datasets/fashion-mnist"
SPLIT = dict(validation_fraction=0.2, rows_per_shard=16, seed=0)
TRAIN_ROWS, TEST_ROWS = 50, 20


def idx_bytes(array: np.ndarray, code: int) -> bytes:
    """An IDX file written by hand (independent of the parser): magic, big-endian dims, big-endian values."""
    big_endian = array.dtype.newbyteorder(">")
    header = bytes([0, 0, code, array.ndim]) + np.asarray(array.shape, ">u4").tobytes()
    return header + array.astype(big_endian).tobytes()


def write_idx(path, array: np.ndarray, code: int = 0x08, compress: bool = False) -> str:
    data = idx_bytes(array, code)
    with open(path, "wb") as handle:
        handle.write(gzip.compress(data) if compress else data)
    return str(path)


def tiny_images(rows: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (rows, 28, 28), dtype=np.uint8)


@pytest.fixture
def idx_dir(tmp_path):
    """The four files of a 10-class set: 50 train rows (gzipped) and 20 test rows (raw)."""
    directory = tmp_path / "idx"
    directory.mkdir()
    write_idx(directory / "train-images-idx3-ubyte.gz", tiny_images(TRAIN_ROWS, 1), compress=True)
    write_idx(directory / "train-labels-idx1-ubyte.gz", np.arange(TRAIN_ROWS, dtype=np.uint8) % 10, compress=True)
    write_idx(directory / "t10k-images-idx3-ubyte", tiny_images(TEST_ROWS, 2))
    write_idx(directory / "t10k-labels-idx1-ubyte", (np.arange(TEST_ROWS, dtype=np.uint8) * 3) % 10)
    return directory


def read_split_rows(storage: Storage, manifest, split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    tables = [pq.read_table(storage.path(shard.file)) for shard in manifest.split_shards(split)]
    ids = np.concatenate([t.column("id").to_numpy() for t in tables])
    features = np.concatenate([np.stack(t.column("x").to_numpy(zero_copy_only=False)) for t in tables])
    labels = np.concatenate([t.column("y").to_numpy() for t in tables])
    return ids, features, labels


# ------------------------------------------------------------------------------------ read_idx
@pytest.mark.parametrize("compress", [False, True], ids=["raw", "gz"])
def test_read_idx_round_trips_images_and_labels(tmp_path, compress):
    images, labels = tiny_images(12, 0), np.arange(12, dtype=np.uint8) % 10
    suffix = ".gz" if compress else ""
    got_images = read_idx(write_idx(tmp_path / f"images{suffix}", images, compress=compress))
    got_labels = read_idx(write_idx(tmp_path / f"labels{suffix}", labels, compress=compress))
    assert got_images.dtype == np.uint8 and got_images.shape == (12, 28, 28)
    np.testing.assert_array_equal(got_images, images)
    np.testing.assert_array_equal(got_labels, labels)


@pytest.mark.parametrize("code,dtype", [(0x09, np.int8), (0x0B, np.int16), (0x0C, np.int32),
                                        (0x0D, np.float32), (0x0E, np.float64)])
def test_read_idx_decodes_every_dtype_big_endian(tmp_path, code, dtype):
    values = (np.arange(24).reshape(2, 3, 4) - 7).astype(dtype) * 3
    got = read_idx(write_idx(tmp_path / "values", values, code=code))
    assert got.dtype == np.dtype(dtype) and got.dtype.isnative
    np.testing.assert_array_equal(got, values)


def test_read_idx_detects_gzip_by_content_not_name(tmp_path):
    labels = np.arange(7, dtype=np.uint8)
    gz_without_suffix = write_idx(tmp_path / "labels", labels, compress=True)
    raw_with_gz_suffix = write_idx(tmp_path / "labels.gz", labels, compress=False)
    np.testing.assert_array_equal(read_idx(gz_without_suffix), labels)
    np.testing.assert_array_equal(read_idx(raw_with_gz_suffix), labels)


@pytest.mark.parametrize("compress", [False, True], ids=["raw", "gz"])
def test_read_idx_rejects_a_truncated_file_naming_it(tmp_path, compress):
    data = idx_bytes(tiny_images(3, 0), 0x08)[:-100]
    path = tmp_path / "short-images-idx3-ubyte"
    path.write_bytes(gzip.compress(data) if compress else data)
    with pytest.raises(DatasetError, match="short-images-idx3-ubyte.*truncated"):
        read_idx(path)


def test_read_idx_rejects_a_cut_gzip_stream_naming_it(tmp_path):
    path = tmp_path / "cut.gz"
    path.write_bytes(gzip.compress(idx_bytes(tiny_images(3, 0), 0x08))[:200])
    with pytest.raises(DatasetError, match=r"cut\.gz.*gzip"):
        read_idx(path)


@pytest.mark.parametrize("data,message", [
    (b"\x01\x00\x08\x01" + bytes(8), "not an IDX file"),
    (b"PK\x03\x04zipzip", "not an IDX file"),
    (b"", "not an IDX file"),
    (b"\x00\x00\x0a\x01\x00\x00\x00\x01\x05", "unknown dtype code 0x0A"),
    (b"\x00\x00\x08\x03\x00\x00\x00\x01", "truncated inside its header"),
    (b"\x00\x00\x08\x01\x00\x00\x00\x02\x05\x06\x07", "longer than its header says"),
])
def test_read_idx_rejects_malformed_headers_naming_the_file(tmp_path, data, message):
    path = tmp_path / "broken-idx"
    path.write_bytes(data)
    with pytest.raises(DatasetError, match=f"broken-idx.*{message}"):
        read_idx(path)


def test_find_idx_files_lists_what_is_missing(idx_dir):
    found = find_idx_files(idx_dir)
    assert found["train-images-idx3-ubyte"].endswith(".gz")
    assert found["t10k-labels-idx1-ubyte"].endswith("t10k-labels-idx1-ubyte")
    os.remove(idx_dir / "t10k-images-idx3-ubyte")
    os.remove(idx_dir / "train-labels-idx1-ubyte.gz")
    with pytest.raises(DatasetError, match=r"lacks the IDX file\(s\) train-labels-idx1-ubyte\[\.gz\], t10k-images"):
        find_idx_files(idx_dir)


# ------------------------------------------------------------------------------------ import_idx
def test_import_idx_writes_disjoint_splits_of_scaled_images(idx_dir, tmp_path):
    storage = Storage(str(tmp_path / "out"))
    manifest = import_idx(str(idx_dir), storage, **SPLIT)

    assert {s: manifest.rows(s) for s in manifest.split_names()} == {"train": 40, "validation": 10, "test": 20}
    assert all(shard.rows <= 16 for shard in manifest.shards) and len(manifest.split_shards("train")) == 3
    assert manifest.feature_shape == (1, 28, 28) and manifest.num_classes == 10
    assert manifest.class_names[0] == "T-shirt/top" and manifest.class_names[9] == "Ankle boot"
    assert read_manifest(storage) == manifest

    rows = {split: read_split_rows(storage, manifest, split) for split in ("train", "validation", "test")}
    ids = np.concatenate([rows[split][0] for split in rows])
    assert sorted(ids) == list(range(TRAIN_ROWS + TEST_ROWS))  # unique, none lost
    np.testing.assert_array_equal(rows["test"][0], np.arange(TRAIN_ROWS, TRAIN_ROWS + TEST_ROWS))

    train_images, train_labels = tiny_images(TRAIN_ROWS, 1), np.arange(TRAIN_ROWS) % 10
    for split in ("train", "validation"):
        split_ids, features, labels = rows[split]
        assert features.dtype == np.float32 and 0 <= features.min() and features.max() <= 1
        np.testing.assert_array_equal(features * 255, train_images[split_ids].reshape(-1, 784).astype(np.float32))
        np.testing.assert_array_equal(labels, train_labels[split_ids])
    assert rows["test"][2].dtype == np.int64


def test_import_idx_records_the_source_files_and_writes_the_manifest_last(idx_dir, tmp_path):
    storage = Storage(str(tmp_path / "out"))
    storage.write_text("stale", "manifest.json")  # a previous import's manifest must not survive a failure
    os.remove(idx_dir / "t10k-labels-idx1-ubyte")
    write_idx(idx_dir / "t10k-labels-idx1-ubyte", np.full(TEST_ROWS + 1, 3, np.uint8))
    with pytest.raises(DatasetError, match="t10k-labels-idx1-ubyte: 21 labels for 20 images"):
        import_idx(str(idx_dir), storage, **SPLIT)
    write_idx(idx_dir / "t10k-labels-idx1-ubyte", np.full(TEST_ROWS, 3, np.uint8))

    manifest = import_idx(str(idx_dir), storage, **SPLIT)
    files = manifest.source["files"]
    assert manifest.source["kind"] == "idx" and manifest.source["name"] == "fashion-mnist"
    assert files["train-images-idx3-ubyte.gz"] == hashlib.sha256(
        (idx_dir / "train-images-idx3-ubyte.gz").read_bytes()).hexdigest()
    assert set(files) == {"train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
                          "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"}


def test_import_idx_is_reproducible_for_a_seed(idx_dir, tmp_path):
    def shards(seed, out):
        storage = Storage(str(tmp_path / out))
        manifest = import_idx(str(idx_dir), storage, **{**SPLIT, "seed": seed})
        return {s.file: s.sha256 for s in manifest.shards}, read_split_rows(storage, manifest, "validation")[0]

    first, validation = shards(0, "a")
    again, validation_again = shards(0, "b")
    other, validation_other = shards(1, "c")
    assert first == again
    np.testing.assert_array_equal(validation, validation_again)
    assert set(validation) != set(validation_other) and len(validation_other) == 10
    assert first["test-00000.parquet"] == other["test-00000.parquet"]  # the test split ignores the seed


def test_import_idx_rejects_labels_beyond_the_known_classes(idx_dir, tmp_path):
    write_idx(idx_dir / "train-labels-idx1-ubyte.gz", np.full(TRAIN_ROWS, 10, np.uint8), compress=True)
    with pytest.raises(DatasetError, match=r"train-labels-idx1-ubyte\.gz: label 10 outside \[0, 10\)"):
        import_idx(str(idx_dir), Storage(str(tmp_path / "out")), **SPLIT)


def test_import_idx_takes_class_names_and_validates_the_split(idx_dir, tmp_path):
    storage = Storage(str(tmp_path / "out"))
    manifest = import_idx(str(idx_dir), storage, **SPLIT, name="mnist")
    assert manifest.class_names == tuple("0123456789")
    names = [f"c{i}" for i in range(12)]
    assert import_idx(str(idx_dir), storage, **SPLIT, class_names=names).num_classes == 12
    with pytest.raises(ValueError, match="leaves an empty split"):
        import_idx(str(idx_dir), storage, **{**SPLIT, "validation_fraction": 0.001})


# ------------------------------------------------------------------------------------ fetch
@pytest.fixture
def http_dir(tmp_path):
    """A directory served by a local HTTP server on 127.0.0.1 (stopped after the test): (dir, url)."""
    served = tmp_path / "served"
    served.mkdir()

    class QuietHandler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):  # keep the test output clean
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(QuietHandler, directory=served))
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)  # fast shutdown
    thread.start()
    yield served, f"http://127.0.0.1:{server.server_address[1]}/mnist/"
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


def serve_gzipped(idx_dir, served) -> dict[str, str]:
    """Put gzipped copies of the four files under served/mnist; returns their {file: MD5}."""
    (served / "mnist").mkdir()
    checksums = {}
    for name, path in find_idx_files(idx_dir).items():
        raw = Path(path).read_bytes()
        data = gzip.compress(gzip.decompress(raw) if path.endswith(".gz") else raw)
        (served / "mnist" / f"{name}.gz").write_bytes(data)
        checksums[f"{name}.gz"] = hashlib.md5(data).hexdigest()
    return checksums


def closed_port_url() -> str:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}/"


def test_fetch_reads_the_given_source_and_never_looks_elsewhere(idx_dir, tmp_path):
    manifest = fetch("fashion-mnist", Storage(str(tmp_path / "out")), source=str(idx_dir), **SPLIT)
    assert manifest.rows() == TRAIN_ROWS + TEST_ROWS
    os.remove(idx_dir / "t10k-images-idx3-ubyte")
    with pytest.raises(DatasetError, match="lacks the IDX file.*t10k-images-idx3-ubyte"):
        fetch("fashion-mnist", Storage(str(tmp_path / "again")), source=str(idx_dir), **SPLIT)
    with pytest.raises(DatasetError, match="IDX directory .*nowhere does not exist"):
        fetch("fashion-mnist", Storage(str(tmp_path / "again")), source=str(tmp_path / "nowhere"), **SPLIT)


def test_fetch_downloads_verifies_and_then_reuses_the_cache(idx_dir, http_dir, tmp_path):
    served, url = http_dir
    checksums = serve_gzipped(idx_dir, served)
    cache = tmp_path / "cache"
    manifest = fetch("mnist", Storage(str(tmp_path / "out")), cache_dir=str(cache), base_url=url,
                     checksums=checksums, timeout=10, **SPLIT)
    assert sorted(os.listdir(cache)) == sorted(checksums)  # no temporary files left behind
    assert manifest.class_names == tuple("0123456789") and manifest.rows("test") == TEST_ROWS

    # The verified files in the cache are used as they are: the unreachable server is never asked.
    again = fetch("mnist", Storage(str(tmp_path / "again")), cache_dir=str(cache), base_url=closed_port_url(),
                  checksums=checksums, timeout=2, **SPLIT)
    assert [s.sha256 for s in again.shards] == [s.sha256 for s in manifest.shards]


def test_fetch_deletes_a_download_that_fails_its_checksum(idx_dir, http_dir, tmp_path):
    served, url = http_dir
    checksums = serve_gzipped(idx_dir, served)
    checksums["t10k-images-idx3-ubyte.gz"] = "0" * 32
    cache = tmp_path / "cache"
    with pytest.raises(DatasetError, match=r"t10k-images-idx3-ubyte\.gz fails its checksum.*deleted"):
        fetch("mnist", Storage(str(tmp_path / "out")), cache_dir=str(cache), base_url=url,
              checksums=checksums, timeout=10, **SPLIT)
    assert "t10k-images-idx3-ubyte.gz" not in os.listdir(cache)
    assert all(not name.startswith(".") for name in os.listdir(cache))
    assert not (tmp_path / "out").exists()


def test_fetch_says_what_to_do_when_the_download_fails(http_dir, tmp_path, monkeypatch):
    _, url = http_dir  # nothing is served: 404
    with pytest.raises(DatasetError, match=r"could not download .*train-images-idx3-ubyte\.gz: HTTP 404 .*\. Put"):
        fetch("mnist", Storage(str(tmp_path / "out")), cache_dir=str(tmp_path / "cache"), base_url=url,
              timeout=10, **SPLIT)

    monkeypatch.setitem(idx.SYSTEM_DIRS, "fashion-mnist", ())  # as on a machine without the Debian package
    with pytest.raises(DatasetError, match=r"could not download http://127\.0\.0\.1:\d+/train-images.*"
                                           r"apt-get install -y dataset-fashion-mnist\) or pass --source DIR"):
        fetch("fashion-mnist", Storage(str(tmp_path / "out")), cache_dir=str(tmp_path / "cache"),
              base_url=closed_port_url(), timeout=2, **SPLIT)
    assert os.listdir(tmp_path / "cache") == []


def test_fetch_rejects_a_system_copy_that_is_not_the_release(idx_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(idx.SYSTEM_DIRS, "fashion-mnist", (str(idx_dir),))
    with pytest.raises(DatasetError, match=r"train-images-idx3-ubyte\.gz is not the published fashion-mnist"):
        fetch("fashion-mnist", Storage(str(tmp_path / "out")), **SPLIT)
    with pytest.raises(ValueError, match="unknown IDX dataset 'kmnist'"):
        fetch("kmnist", Storage(str(tmp_path / "out")), **SPLIT)


# ------------------------------------------------------------------------------------ the Debian copy
debian = pytest.mark.skipif(not os.path.isdir(DEBIAN_DIR), reason="apt-get install -y dataset-fashion-mnist")


@debian
def test_debian_fashion_mnist_test_labels_are_balanced():
    labels = read_idx(find_idx_files(DEBIAN_DIR)["t10k-labels-idx1-ubyte"])
    assert labels.shape == (10_000,) and labels.dtype == np.uint8
    assert np.bincount(labels).tolist() == [1000] * 10


@debian
def test_fetch_imports_the_debian_fashion_mnist(tmp_path):  # about 3 s on 2 cores
    storage = Storage(str(tmp_path / "fashion"))
    manifest = fetch("fashion-mnist", storage, validation_fraction=1 / 12, rows_per_shard=20_000, seed=0)
    assert {s: manifest.rows(s) for s in manifest.split_names()} == {"train": 55_000, "validation": 5_000,
                                                                     "test": 10_000}
    assert manifest.class_names[9] == "Ankle boot" and manifest.feature_shape == (1, 28, 28)
    ids, features, labels = read_split_rows(storage, manifest, "test")
    assert ids[0] == 60_000 and features.max() == 1.0 and features.min() == 0.0
    assert np.bincount(labels).tolist() == [1000] * 10
