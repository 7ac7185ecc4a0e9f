"""MNIST and Fashion-MNIST: find or download the four IDX files and import them as a kdray dataset.

The IDX format (LeCun's MNIST release) is a 4-byte magic -- two zero bytes, a dtype code and the
number of dimensions -- then one big-endian uint32 per dimension, then the values, big-endian. The
files come gzipped or raw; `read_idx` tells them apart by the gzip magic bytes, not by the name.

`fetch` takes the first local copy it finds (``source``, then the Debian package's directory, then
earlier downloads in the cache), and only then downloads the release, checking every file's MD5
against the published checksums below. It never substitutes other data for a missing file.
`import_idx` turns the files into shards: the train file is split into train and validation by a
seeded permutation, the t10k file is the test split; images become float32 in [0, 1]. It writes
nothing until the options and all four files check out; `check_idx_source` runs the same checks
alone (streaming the images, writing nothing), for a caller to run before it prepares the output.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import http.client
import io
import math
import numbers
import os
import tempfile
import urllib.error
import urllib.request
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from kdray.data.sampling import seed_entropy
from kdray.data.shards import (
    MANIFEST,
    DatasetError,
    DatasetManifest,
    ShardInfo,
    shard_name,
    shard_table,
    write_manifest,
    write_shard,
)
from kdray.runtime.storage import Storage

TRAIN_IMAGES, TRAIN_LABELS = "train-images-idx3-ubyte", "train-labels-idx1-ubyte"
TEST_IMAGES, TEST_LABELS = "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"
IDX_FILES = (TRAIN_IMAGES, TRAIN_LABELS, TEST_IMAGES, TEST_LABELS)
IMAGE_SHAPE = (28, 28)
FEATURE_SHAPE = (1, *IMAGE_SHAPE)

CLASS_NAMES = {
    "fashion-mnist": ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                      "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"),
    "mnist": tuple(str(digit) for digit in range(10)),
}

BASE_URLS = {
    "fashion-mnist": "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
    "mnist": "https://ossci-datasets.s3.amazonaws.com/mnist/",
}

# MD5 of the published .gz files: what a download must match.
GZ_MD5 = {
    "fashion-mnist": {
        f"{TRAIN_IMAGES}.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
        f"{TRAIN_LABELS}.gz": "25c81989df183df01b3e8a0aad5dffbe",
        f"{TEST_IMAGES}.gz": "bef4ecab320f06d8554ea6380940ec79",
        f"{TEST_LABELS}.gz": "bb300cfdad3c16e7a12a480ee83cd310",
    },
    "mnist": {
        f"{TRAIN_IMAGES}.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
        f"{TRAIN_LABELS}.gz": "d53e105ee54ea40749a09fcbcd1e9432",
        f"{TEST_IMAGES}.gz": "9fb629c4189551a2d022fa330f9573f3",
        f"{TEST_LABELS}.gz": "ec29112dd5afa0611ce80d1b7f02629c",
    },
}

# MD5 of the decompressed files. Debian recompresses the .gz files (their MD5s differ from the
# release's) but the contents are identical, so a system copy is checked against these instead.
CONTENT_MD5 = {
    "fashion-mnist": {
        TRAIN_IMAGES: "f4a8712d7a061bf5bd6d2ca38dc4d50a",
        TRAIN_LABELS: "9018921c3c673c538a1fc5bad174d6f9",
        TEST_IMAGES: "8181f5470baa50b63fa0f6fddb340f0a",
        TEST_LABELS: "15d484375f8d13e6eb1aabb0c3f46965",
    },
    "mnist": {
        TRAIN_IMAGES: "6bbc9ace898e44ae57da46a324031adb",
        TRAIN_LABELS: "a25bea736e30d166cdddb491f175f624",
        TEST_IMAGES: "2646ac647ad5339dbf082846283269ea",
        TEST_LABELS: "27ae3e4e09519cfbb04c329615203637",
    },
}

# Where distribution packages put the files. Debian's dataset-fashion-mnist installs the four .gz
# files here; Debian and Ubuntu have no MNIST package (apt-cache search mnist), hence no entry.
SYSTEM_DIRS = {
    "fashion-mnist": ("/usr/share/datasets/fashion-mnist",),
    "mnist": (),
}

INSTEAD = {
    "fashion-mnist": "Install the Debian package dataset-fashion-mnist (apt-get install -y dataset-fashion-mnist) "
                     "or pass --source DIR (data.path in a config) with the four IDX files.",
    "mnist": "Put the four MNIST IDX files (train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, "
             "t10k-labels-idx1-ubyte, gzipped or not) in a directory and pass --source DIR (data.path in a config).",
}

_GZIP_MAGIC = b"\x1f\x8b"
_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_CHUNK = 1 << 20
_GZIP_ERRORS = (EOFError, OSError, zlib.error)  # BadGzipFile is an OSError


# ------------------------------------------------------------------------------------ reading
@dataclass(frozen=True)
class IdxFile:
    """An IDX file's header, read after checking that the file holds exactly what it declares."""

    path: str
    dtype: np.dtype
    shape: tuple[int, ...]


def _read_file(path: str | os.PathLike, size: int = -1) -> bytes:
    """The file's bytes (its first `size` bytes if given); DatasetError naming it if it cannot be read."""
    try:
        with open(path, "rb") as handle:
            return handle.read(size)
    except OSError as error:
        raise DatasetError(f"cannot read IDX file {path}: {error.strerror}") from None


def _gzip_error(error: Exception, where: str | os.PathLike) -> DatasetError:
    return DatasetError(f"IDX file {where} is a damaged or truncated gzip file: {error}")


def _decompress(data: bytes, where: str | os.PathLike) -> bytes:
    """The IDX bytes of `data`, gunzipped if it starts with the gzip magic."""
    if not data.startswith(_GZIP_MAGIC):
        return data
    try:
        return gzip.decompress(data)
    except _GZIP_ERRORS as error:
        raise _gzip_error(error, where) from None


def _read_header(read: Callable[[int], bytes], where: str | os.PathLike,
                 packed: bool) -> tuple[np.dtype, tuple[int, ...], int]:
    """(dtype, shape, header bytes) from the start of an IDX stream (gunzipped if `packed`), which
    `read(n)` continues."""
    magic = read(4)
    if len(magic) < 4 or magic[:2] != b"\0\0":
        gz = " (nor gzip, though named .gz)" if str(where).endswith(".gz") and not packed else ""
        raise DatasetError(f"{where} is not an IDX file{gz} (magic bytes {magic.hex() or 'missing'})")
    code, ndim = magic[2], magic[3]
    if code not in _DTYPES:
        raise DatasetError(f"IDX file {where} has unknown dtype code 0x{code:02X} "
                           f"(known: {', '.join(f'0x{c:02X}' for c in _DTYPES)})")
    dims = read(4 * ndim)
    if len(dims) < 4 * ndim:
        raise DatasetError(f"IDX file {where} is truncated inside its header ({4 + len(dims)} bytes)")
    return np.dtype(_DTYPES[code]), tuple(int(d) for d in np.frombuffer(dims, ">u4")), 4 + 4 * ndim


def _check_length(size: int, header: int, dtype: np.dtype, shape: tuple[int, ...], where) -> None:
    expected = header + math.prod(shape) * dtype.itemsize
    if size != expected:
        problem = "truncated" if size < expected else "longer than its header says"
        raise DatasetError(f"IDX file {where} is {problem}: {size} bytes, shape {shape} "
                           f"of {dtype.name} needs {expected}")


def parse_idx(data: bytes, where: str | os.PathLike) -> np.ndarray:
    """IDX bytes (gzipped or raw) -> an array in native byte order; `where` names the file in errors."""
    packed = data.startswith(_GZIP_MAGIC)
    data = _decompress(data, where)
    dtype, shape, header = _read_header(io.BytesIO(data).read, where, packed)
    _check_length(len(data), header, dtype, shape, where)
    values = np.frombuffer(data, dtype, offset=header).reshape(shape)
    return values.astype(dtype.newbyteorder("="))  # a native, writable copy


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file, gzipped or raw. Shape and dtype come from its header; DatasetError names the file."""
    return parse_idx(_read_file(path), path)


def scan_idx(path: str | os.PathLike) -> IdxFile:
    """Check an IDX file whole -- gzip stream, header, length -- streaming it (nothing is kept)."""
    packed = _read_file(path, 2) == _GZIP_MAGIC
    try:
        with open(path, "rb") as handle, (gzip.GzipFile(fileobj=handle) if packed else
                                          contextlib.nullcontext(handle)) as stream:
            dtype, shape, header = _read_header(stream.read, path, packed)
            size = header + sum(len(chunk) for chunk in iter(lambda: stream.read(_CHUNK), b""))
    except _GZIP_ERRORS as error:  # BadGzipFile (a CRC or length mismatch) is an OSError
        raise (_gzip_error(error, path) if packed else DatasetError(f"cannot read IDX file {path}: {error}")) from None
    _check_length(size, header, dtype, shape, path)
    return IdxFile(str(path), dtype, shape)


def find_idx_files(directory: str | os.PathLike) -> dict[str, str]:
    """The four canonical IDX files in `directory`, raw or ``.gz``: {canonical name: path}.

    Raises DatasetError listing the missing ones.
    """
    if not os.path.isdir(directory):
        raise DatasetError(f"IDX directory {directory} does not exist")
    found, missing = {}, []
    for name in IDX_FILES:
        candidates = [os.path.join(directory, name + suffix) for suffix in ("", ".gz")]
        present = [path for path in candidates if os.path.isfile(path)]
        if present:
            found[name] = present[0]  # a raw copy beside the .gz is usually the user's gunzip of it
        else:
            missing.append(f"{name}[.gz]")
    if missing:
        raise DatasetError(f"{directory} lacks the IDX file(s) {', '.join(missing)}")
    return found


# ------------------------------------------------------------------------------------ checking
@dataclass(frozen=True)
class IdxSource:
    """A checked IDX directory: its four files and the class names the import will record."""

    files: dict[str, IdxFile]  # canonical name -> file
    class_names: tuple[str, ...]

    @property
    def train_rows(self) -> int:
        return self.files[TRAIN_IMAGES].shape[0]


def check_idx_options(*, validation_fraction: float, rows_per_shard: int, seed: int,
                      class_names: Sequence[str] | None = None) -> None:
    """Refuse import options out of range, naming the option; reads nothing."""
    if not _is_real(validation_fraction) or not 0 < validation_fraction < 1:
        raise DatasetError(f"validation_fraction must be a number in (0, 1), got {validation_fraction!r}")
    if not _is_integer(rows_per_shard) or rows_per_shard <= 0:
        raise DatasetError(f"rows_per_shard must be a positive integer, got {rows_per_shard!r}")
    if not _is_integer(seed):
        raise DatasetError(f"seed must be an integer, got {seed!r}")
    if class_names is not None and (isinstance(class_names, str) or not class_names
                                    or not all(isinstance(n, str) for n in class_names)):
        raise DatasetError(f"class_names must be a non-empty list of strings, got {class_names!r}")


def _is_integer(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _check_images(images: IdxFile) -> None:
    if images.dtype != np.uint8 or images.shape[1:] != IMAGE_SHAPE:
        raise DatasetError(f"{images.path}: expected uint8 images of shape [N, 28, 28], "
                           f"got {images.dtype} {images.shape}")
    if not images.shape[0]:
        raise DatasetError(f"{images.path} holds no images")


def _check_labels(labels: np.ndarray, images: IdxFile, num_classes: int | None, where: str) -> np.ndarray:
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise DatasetError(f"{where}: expected a 1-D integer label vector, got {labels.dtype} {labels.shape}")
    if len(labels) != images.shape[0]:
        raise DatasetError(f"{where}: {len(labels)} labels for {images.shape[0]} images")
    labels = labels.astype(np.int64)
    bad = labels[(labels < 0) | (labels >= (num_classes if num_classes is not None else np.inf))]
    if bad.size:
        raise DatasetError(f"{where}: label {bad[0]} outside [0, {num_classes if num_classes is not None else 'inf'})")
    return labels


def _resolve_classes(name: str, class_names: Sequence[str] | None) -> tuple[str, ...] | None:
    """The class names, or None when only the labels can tell (an unknown dataset, no names given)."""
    if class_names is not None:
        return tuple(class_names)
    return CLASS_NAMES.get(name)


def _check_files(files: Mapping[str, IdxFile], labels: Mapping[str, np.ndarray], name: str,
                 class_names: Sequence[str] | None) -> tuple[dict[str, np.ndarray], tuple[str, ...]]:
    """Check the four files agree (image shapes, one label per image, labels within the classes);
    -> the labels as int64 by canonical name, and the class names."""
    names = _resolve_classes(name, class_names)
    limit = len(names) if names is not None else None
    checked = {}
    for images, key in ((TRAIN_IMAGES, TRAIN_LABELS), (TEST_IMAGES, TEST_LABELS)):
        _check_images(files[images])
        checked[key] = _check_labels(labels[key], files[images], limit, files[key].path)
    if names is None:  # an IDX set kdray does not know: the labels define the classes
        names = tuple(str(c) for c in range(int(max(part.max() for part in checked.values())) + 1))
    return checked, names


def _check_split(validation_fraction: float, train: IdxFile) -> None:
    try:
        validation_size(train.shape[0], validation_fraction)
    except ValueError as error:
        raise DatasetError(f"{train.path}: {error}") from None


def check_idx_source(src_dir: str, *, validation_fraction: float, rows_per_shard: int, seed: int,
                     name: str = "fashion-mnist", class_names: Sequence[str] | None = None) -> IdxSource:
    """What `import_idx` checks of its options and source, without writing anything: the options,
    then the four files whole (gzip streams, headers, lengths, one label per image, labels within
    the classes) and that the split leaves rows on both sides; where the output may go is
    `check_source_and_output`'s. DatasetError naming the option or file at fault.

    Streams the image files; only the labels (a byte per image) are held in memory.
    """
    check_idx_options(validation_fraction=validation_fraction, rows_per_shard=rows_per_shard, seed=seed,
                      class_names=class_names)
    paths = find_idx_files(src_dir)
    files = {key: scan_idx(path) for key, path in paths.items()}
    _, names = _check_files(files, {key: read_idx(paths[key]) for key in (TRAIN_LABELS, TEST_LABELS)}, name,
                            class_names)
    _check_split(validation_fraction, files[TRAIN_IMAGES])
    return IdxSource(files, names)


def check_source_and_output(source: str | os.PathLike, output: Storage) -> None:
    """Refuse an output dataset directory that is the IDX source, lies inside it or contains it
    (symlinks resolved): replacing the output would delete the source files, and shards written
    into the source would mix with them."""
    src = Storage(os.fspath(source))
    if src.contains(output) or output.contains(src):
        raise DatasetError(f"the IDX source {source} and the output directory {output.location} must not contain "
                           "each other (or be one directory): give an output directory apart from the source")


# ------------------------------------------------------------------------------------ importing
def validation_size(rows: int, validation_fraction: float) -> int:
    """round(validation_fraction * rows), the validation split's size; ValueError if a split would be empty."""
    if not 0 < validation_fraction < 1:
        raise ValueError(f"validation_fraction must be in (0, 1), got {validation_fraction}")
    count = round(validation_fraction * rows)
    if not 0 < count < rows:
        raise ValueError(f"validation_fraction {validation_fraction} of {rows} rows leaves an empty split")
    return count


def split_train_validation(rows: int, validation_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Row indices (sorted) of the train file for the train and validation splits.

    round(validation_fraction * rows) rows go to validation, chosen by a permutation seeded with
    `seed`; the two sets are disjoint and together cover every row.
    """
    count = validation_size(rows, validation_fraction)
    order = np.random.default_rng(seed_entropy(seed)).permutation(rows)
    # Sorted, so each shard holds ids in file order: stable, readable, easy to diff.
    return np.sort(order[count:]), np.sort(order[:count])


def _write_split(storage: Storage, split: str, ids: np.ndarray, images: np.ndarray, labels: np.ndarray,
                 rows_per_shard: int) -> list[ShardInfo]:
    """Write `images[i]` for the rows i of one split as shards of <= rows_per_shard rows."""
    shards = []
    for index, start in enumerate(range(0, len(ids), rows_per_shard)):
        rows = slice(start, start + rows_per_shard)
        # Converted shard by shard so at most one shard of float32 features is in memory at once.
        features = images[rows].reshape(-1, math.prod(IMAGE_SHAPE)).astype(np.float32) / np.float32(255)
        table = shard_table(ids[rows], features, labels[rows])
        shards.append(write_shard(storage, shard_name(split, index), split, table))
    return shards


def import_idx(src_dir: str, storage: Storage, *, validation_fraction: float, rows_per_shard: int, seed: int,
               name: str = "fashion-mnist", class_names: Sequence[str] | None = None) -> DatasetManifest:
    """Import the four IDX files in `src_dir` into a kdray dataset at `storage`; returns its manifest.

    Rows are x: [784] float32 in [0, 1] (feature_shape (1, 28, 28)), y: int64. Train-file rows keep
    their index as id (0..N-1), test rows follow (N..N+M-1), so ids are unique across the splits.
    The manifest is written last and records the SHA-256 of each IDX file. Nothing is written
    unless the options, the files (as `check_idx_source` checks them) and `storage` (apart from
    `src_dir`, see `check_source_and_output`) are sound: DatasetError naming what is not.
    """
    check_idx_options(validation_fraction=validation_fraction, rows_per_shard=rows_per_shard, seed=seed,
                      class_names=class_names)
    check_source_and_output(src_dir, storage)
    paths = find_idx_files(src_dir)
    raw = {key: _read_file(path) for key, path in paths.items()}
    arrays = {key: parse_idx(data, paths[key]) for key, data in raw.items()}
    files = {key: IdxFile(paths[key], array.dtype, array.shape) for key, array in arrays.items()}
    labels, names = _check_files(files, arrays, name, class_names)
    _check_split(validation_fraction, files[TRAIN_IMAGES])
    train_images, test_images = arrays[TRAIN_IMAGES], arrays[TEST_IMAGES]
    train_labels, test_labels = labels[TRAIN_LABELS], labels[TEST_LABELS]

    # Everything is checked: only now is the output touched.
    train_rows, validation_rows = split_train_validation(len(train_images), validation_fraction, seed)
    test_ids = len(train_images) + np.arange(len(test_images))
    storage.delete(MANIFEST)  # until the new manifest lands the directory reads as unfinished
    shards = []
    for split, rows in (("train", train_rows), ("validation", validation_rows)):
        shards += _write_split(storage, split, rows, train_images[rows], train_labels[rows], rows_per_shard)
    shards += _write_split(storage, "test", test_ids, test_images, test_labels, rows_per_shard)
    manifest = DatasetManifest(
        num_classes=len(names), feature_shape=FEATURE_SHAPE, shards=tuple(shards), class_names=names,
        source={"kind": "idx", "name": name, "seed": seed, "validation_fraction": validation_fraction,
                "files": {os.path.basename(paths[key]): hashlib.sha256(raw[key]).hexdigest() for key in IDX_FILES}},
    )
    write_manifest(storage, manifest)
    return manifest


# ------------------------------------------------------------------------------------ fetching
def _md5(path: str) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def verify_contents(paths: Mapping[str, str], name: str) -> None:
    """Check the decompressed IDX files against the release's checksums; DatasetError naming a mismatch."""
    for key, path in paths.items():
        md5 = hashlib.md5(_decompress(_read_file(path), path)).hexdigest()
        if md5 != CONTENT_MD5[name][key]:
            raise DatasetError(f"{path} is not the published {name} {key} (MD5 of its contents {md5}, "
                               f"expected {CONTENT_MD5[name][key]}). Reinstall it or pass --source DIR.")


def _stream_to(url: str, handle, timeout: float) -> str:
    """Copy the body of `url` into the open file `handle`; returns its MD5."""
    digest = hashlib.md5()
    with handle, urllib.request.urlopen(url, timeout=timeout) as response:
        while chunk := response.read(_CHUNK):
            digest.update(chunk)
            handle.write(chunk)
    return digest.hexdigest()


def _download(url: str, destination: str, expected_md5: str, timeout: float, instead: str) -> None:
    """Download `url` to `destination` via a temporary sibling, renamed in only if its MD5 matches."""
    handle = tempfile.NamedTemporaryFile(dir=os.path.dirname(destination),
                                         prefix=f".{os.path.basename(destination)}.", delete=False)
    try:
        md5 = _stream_to(url, handle, timeout)
        if md5 != expected_md5:
            raise DatasetError(f"download of {url} fails its checksum (MD5 {md5}, expected {expected_md5}); "
                               f"it was deleted. Try again, or: {instead}")
        os.replace(handle.name, destination)
    # URLError/HTTPError and socket timeouts are OSErrors; a cut connection can be an HTTPException;
    # a malformed base_url is a ValueError.
    except (OSError, http.client.HTTPException, ValueError) as error:
        reason = f"HTTP {error.code} {error.reason}" if isinstance(error, urllib.error.HTTPError) else (
            getattr(error, "reason", None) or error)
        raise DatasetError(f"could not download {url}: {reason}. {instead}") from None
    finally:
        if os.path.exists(handle.name):  # anything but a verified download is removed
            os.unlink(handle.name)


def download_idx_files(name: str, cache_dir: str, *, base_url: str, checksums: Mapping[str, str],
                       timeout: float) -> str:
    """Make `cache_dir` hold the four verified .gz files, downloading those absent or damaged."""
    try:
        os.makedirs(cache_dir, exist_ok=True)
    except OSError as error:
        raise DatasetError(f"cannot create the download cache {cache_dir}: {error.strerror}; pass cache_dir") from None
    for file, expected in checksums.items():
        destination = os.path.join(cache_dir, file)
        if os.path.isfile(destination) and _md5(destination) == expected:
            continue  # an earlier, verified download
        _download(base_url.rstrip("/") + "/" + file, destination, expected, timeout, INSTEAD[name])
    return cache_dir


def locate_idx_files(name: Literal["fashion-mnist", "mnist"], *, source: str | None = None,
                     cache_dir: str | None = None, base_url: str | None = None,
                     checksums: Mapping[str, str] | None = None, timeout: float = 60.0) -> str:
    """A directory holding the four IDX files of `name`: `source`, a system copy, or a download."""
    if name not in CLASS_NAMES:
        raise ValueError(f"unknown IDX dataset {name!r}; known: {sorted(CLASS_NAMES)}")
    if source is not None:
        find_idx_files(source)  # the user named it: missing files are an error, not a reason to look elsewhere
        return source
    for directory in SYSTEM_DIRS[name]:
        if os.path.isdir(directory):
            verify_contents(find_idx_files(directory), name)
            return directory
    cache_dir = cache_dir or os.path.join(os.path.expanduser("~"), ".cache", "kdray", name)
    return download_idx_files(name, cache_dir, base_url=base_url or BASE_URLS[name],
                              checksums=checksums or GZ_MD5[name], timeout=timeout)


def fetch(name: Literal["fashion-mnist", "mnist"], storage: Storage, *, validation_fraction: float,
          rows_per_shard: int, seed: int, class_names: Sequence[str] | None = None, source: str | None = None,
          cache_dir: str | None = None, base_url: str | None = None, checksums: Mapping[str, str] | None = None,
          timeout: float = 60.0) -> DatasetManifest:
    """Get Fashion-MNIST or MNIST as a kdray dataset at `storage`; returns its manifest.

    The files come from the first of: `source` (DatasetError if it lacks any), the Debian package's
    directory, `cache_dir` (default ``~/.cache/kdray/NAME``), a download from `base_url` (default the
    official mirror) checked against `checksums` ({file name: MD5}, default the published ones).
    The split options go to `import_idx`, and are checked before any file is looked for.
    """
    options = dict(validation_fraction=validation_fraction, rows_per_shard=rows_per_shard, seed=seed,
                   class_names=class_names)
    check_idx_options(**options)
    directory = locate_idx_files(name, source=source, cache_dir=cache_dir, base_url=base_url,
                                 checksums=checksums, timeout=timeout)
    return import_idx(directory, storage, name=name, **options)
