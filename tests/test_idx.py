"""kdray.data.idx: IDX parsing, the import into shards, and fetch (local copies and a local HTTP server)."""

from __future__ import annotations

import functools
import gzip
import hashlib
import http.server
import os
import re
import shutil
import socket
import threading
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from kdray.data import idx
from kdray.data.idx import check_idx_source, check_source_and_output, fetch, find_idx_files, import_idx, read_idx
from kdray.data.shards import DatasetError, read_manifest
from kdray.runtime.storage import Storage

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
    with pytest.raises(DatasetError, match=r"train-images-idx3-ubyte\.gz: validation_fraction 0\.001 of 50 rows "
                                           "leaves an empty split"):
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


# ------------------------------------------------------------------------------------ bad options and sources
BAD_OPTIONS = {  # an option out of range -> the error (literally)
    "no validation": ({"validation_fraction": 0}, "validation_fraction must be a number in (0, 1), got 0"),
    "all validation": ({"validation_fraction": 1.0}, "validation_fraction must be a number in (0, 1), got 1.0"),
    "fraction above 1": ({"validation_fraction": 1.5}, "validation_fraction must be a number in (0, 1), got 1.5"),
    "negative fraction": ({"validation_fraction": -0.1}, "validation_fraction must be a number in (0, 1), got -0.1"),
    "fraction nan": ({"validation_fraction": float("nan")}, "validation_fraction must be a number in (0, 1), got nan"),
    "fraction a string": ({"validation_fraction": "0.2"}, "validation_fraction must be a number in (0, 1), got '0.2'"),
    "no rows per shard": ({"rows_per_shard": 0}, "rows_per_shard must be a positive integer, got 0"),
    "negative rows per shard": ({"rows_per_shard": -16}, "rows_per_shard must be a positive integer, got -16"),
    "fractional rows per shard": ({"rows_per_shard": 2.5}, "rows_per_shard must be a positive integer, got 2.5"),
    "seed a float": ({"seed": 1.5}, "seed must be an integer, got 1.5"),
    "no class names": ({"class_names": []}, "class_names must be a non-empty list of strings, got []"),
}


@pytest.mark.parametrize("change,message", BAD_OPTIONS.values(), ids=BAD_OPTIONS.keys())
def test_bad_options_are_refused_before_anything_is_read_or_written(tmp_path, change, message):
    options = {**SPLIT, **change}
    out = Storage(str(tmp_path / "out"))
    for refuse in (lambda: import_idx(str(tmp_path / "no-such-source"), out, **options),
                   lambda: check_idx_source(str(tmp_path / "no-such-source"), **options),
                   lambda: fetch("mnist", out, cache_dir=str(tmp_path / "cache"), base_url=closed_port_url(),
                                 **options)):
        with pytest.raises(DatasetError, match=re.escape(message)):  # not the missing source: it was never looked at
            refuse()
    assert os.listdir(tmp_path) == []


def test_a_negative_seed_is_a_seed_like_any_other(idx_dir, tmp_path):
    def validation_ids(seed):
        manifest = import_idx(str(idx_dir), Storage(str(tmp_path / str(seed))), **{**SPLIT, "seed": seed})
        return set(read_split_rows(Storage(str(tmp_path / str(seed))), manifest, "validation")[0])

    assert validation_ids(-1) == validation_ids(-1) != validation_ids(1)


def _replace(name: str, data: bytes):
    """Damage: the file `name` (wherever it was, raw or .gz) becomes `data`, saved as `name`."""
    def damage(directory: Path) -> None:
        for old in directory.glob(name.removesuffix(".gz") + "*"):
            old.unlink()
        (directory / name).write_bytes(data)
    return damage


def _rewrite(name: str, edit):
    """Damage: the bytes of the file `name` (as stored) pass through `edit`."""
    def damage(directory: Path) -> None:
        (directory / name).write_bytes(edit((directory / name).read_bytes()))
    return damage


def _flip_middle_byte(data: bytes) -> bytes:
    return data[: len(data) // 2] + bytes([data[len(data) // 2] ^ 0xFF]) + data[len(data) // 2 + 1:]


TEST_IMAGES, TRAIN_IMAGES_GZ = "t10k-images-idx3-ubyte", "train-images-idx3-ubyte.gz"
BAD_SOURCES = {  # damage to idx_dir -> (the file the error names, what it says)
    "missing folder": (lambda d: shutil.rmtree(d), "", "does not exist"),
    "missing file": (lambda d: (d / "t10k-labels-idx1-ubyte").unlink(), "", "lacks the IDX file(s) t10k-labels"),
    "truncated raw": (_rewrite(TEST_IMAGES, lambda b: b[:-100]), TEST_IMAGES,
                      "is truncated: 15596 bytes, shape (20, 28, 28) of uint8 needs 15696"),
    "longer raw": (_rewrite(TEST_IMAGES, lambda b: b + b"\0"), TEST_IMAGES, "is longer than its header says"),
    "cut gzip": (_rewrite(TRAIN_IMAGES_GZ, lambda b: b[:-200]), TRAIN_IMAGES_GZ, "is a damaged or truncated gzip file"),
    "corrupt gzip": (_rewrite(TRAIN_IMAGES_GZ, _flip_middle_byte), TRAIN_IMAGES_GZ, "is a damaged or truncated gzip"),
    "wrong magic": (_rewrite(TEST_IMAGES, lambda b: b"\x01" + b[1:]), TEST_IMAGES, "is not an IDX file (magic bytes"),
    ".gz but neither": (_replace(TRAIN_IMAGES_GZ, b"<html>404</html>"), TRAIN_IMAGES_GZ,
                        "is not an IDX file (nor gzip, though named .gz) (magic bytes 3c68746d)"),
    "gzip of nothing": (_replace(TRAIN_IMAGES_GZ, gzip.compress(b"")), TRAIN_IMAGES_GZ, "is not an IDX file"),
    "more labels": (lambda d: write_idx(d / "t10k-labels-idx1-ubyte", np.zeros(TEST_ROWS + 1, np.uint8)),
                    "t10k-labels-idx1-ubyte", f"{TEST_ROWS + 1} labels for {TEST_ROWS} images"),
    "labels 2-D": (lambda d: write_idx(d / "t10k-labels-idx1-ubyte", np.zeros((TEST_ROWS, 1), np.uint8)),
                   "t10k-labels-idx1-ubyte", "expected a 1-D integer label vector"),
    "label beyond the classes": (lambda d: write_idx(d / "t10k-labels-idx1-ubyte", np.full(TEST_ROWS, 10, np.uint8)),
                                 "t10k-labels-idx1-ubyte", "label 10 outside [0, 10)"),
    "images 27 wide": (lambda d: write_idx(d / TEST_IMAGES, np.zeros((TEST_ROWS, 28, 27), np.uint8)),
                       TEST_IMAGES, "expected uint8 images of shape [N, 28, 28], got uint8 (20, 28, 27)"),
    "images of floats": (lambda d: write_idx(d / TEST_IMAGES, np.zeros((TEST_ROWS, 28, 28), np.float32), code=0x0D),
                         TEST_IMAGES, "expected uint8 images"),
    "no test images": (lambda d: (write_idx(d / TEST_IMAGES, np.zeros((0, 28, 28), np.uint8)),
                                  write_idx(d / "t10k-labels-idx1-ubyte", np.zeros(0, np.uint8))),
                       TEST_IMAGES, "holds no images"),
    "too few rows to split": (lambda d: (write_idx(d / TRAIN_IMAGES_GZ, tiny_images(1, 0), compress=True),
                                         write_idx(d / "train-labels-idx1-ubyte.gz", np.zeros(1, np.uint8),
                                                   compress=True)),
                              TRAIN_IMAGES_GZ, "validation_fraction 0.2 of 1 rows leaves an empty split"),
}


def tree(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in directory.rglob("*") if p.is_file()}


@pytest.mark.parametrize("damage,file,message", BAD_SOURCES.values(), ids=BAD_SOURCES.keys())
def test_a_bad_source_is_named_and_nothing_is_written(idx_dir, tmp_path, damage, file, message):
    damage(idx_dir)
    before = tree(idx_dir) if idx_dir.exists() else None
    for attempt in (lambda: check_idx_source(str(idx_dir), **SPLIT),
                    lambda: import_idx(str(idx_dir), Storage(str(tmp_path / "out")), **SPLIT)):
        with pytest.raises(DatasetError, match=re.escape(message)) as error:
            attempt()
        assert str(idx_dir / file) in str(error.value) and "\n" not in str(error.value)
    assert sorted(os.listdir(tmp_path)) == (["idx"] if before is not None else [])  # no output directory
    assert (tree(idx_dir) if idx_dir.exists() else None) == before


def test_check_idx_source_reports_the_files_and_classes_and_writes_nothing(idx_dir, tmp_path):
    before = tree(tmp_path)
    source = check_idx_source(str(idx_dir), **SPLIT, name="mnist")
    assert source.train_rows == TRAIN_ROWS and source.class_names == tuple("0123456789")
    assert source.files["t10k-images-idx3-ubyte"].shape == (TEST_ROWS, 28, 28)
    assert source.files["train-labels-idx1-ubyte"].path == str(idx_dir / "train-labels-idx1-ubyte.gz")
    assert tree(tmp_path) == before


@pytest.mark.parametrize("output", ["idx", "idx/out", ".", "alias", "alias/out"],
                         ids=["the source", "inside the source", "around the source", "a link to the source",
                              "inside a link to the source"])
def test_an_output_overlapping_the_source_is_refused_and_nothing_written(idx_dir, tmp_path, output):
    os.symlink(idx_dir, tmp_path / "alias")
    before = tree(tmp_path)
    storage = Storage(str(tmp_path / output))
    with pytest.raises(DatasetError, match="must not contain each other"):
        check_source_and_output(str(idx_dir), storage)
    with pytest.raises(DatasetError, match=re.escape(f"the IDX source {idx_dir} and the output directory")):
        import_idx(str(idx_dir), storage, **SPLIT)
    with pytest.raises(DatasetError, match="must not contain each other"):
        fetch("fashion-mnist", storage, source=str(idx_dir), **SPLIT)
    assert tree(tmp_path) == before


def test_an_output_beside_the_source_is_fine(idx_dir, tmp_path):
    check_source_and_output(str(idx_dir), Storage(str(tmp_path / "idx-out")))  # a shared name prefix is no nesting
