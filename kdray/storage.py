"""Every artifact kdray writes goes through here: a root that is a local path or a URI.

`Storage` wraps a pyarrow filesystem (local, ``file://``, ``s3://``, ``gs://``, ...) rooted at one
directory. Paths handed to it are relative to that root and may not escape it. Writes are atomic:
the bytes go to a temporary sibling that is renamed into place, so a reader never sees half a file
and a crash leaves at most an orphaned ``.tmp-*`` file, never a truncated artifact.
"""

from __future__ import annotations

import io
import json
import os
import posixpath
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pyarrow.fs as pafs


class StorageError(Exception):
    """A storage location cannot be used (unwritable, unresolvable, or a path escapes the root)."""


def _is_uri(location: str) -> bool:
    return "://" in location


class Storage:
    """A directory on a pyarrow filesystem; all paths are relative to it."""

    def __init__(self, location: str):
        if not location:
            raise StorageError("storage location is empty")
        self.location = location if _is_uri(location) else os.path.abspath(os.path.expanduser(location))
        try:
            self.filesystem, self.root = pafs.FileSystem.from_uri(self.location)
        except (ValueError, OSError) as error:  # pyarrow's ArrowInvalid subclasses ValueError
            raise StorageError(f"cannot resolve storage location {location!r}: {error}") from error

    # Pickle as the location only: filesystems with credentials re-resolve on the worker.
    def __reduce__(self):
        return (Storage, (self.location,))

    def __repr__(self) -> str:
        return f"Storage({self.location!r})"

    # ----------------------------------------------------------------- paths
    def path(self, *parts: str) -> str:
        """Filesystem path of `parts` under the root; rejects absolute parts and `..`."""
        relative = posixpath.normpath(posixpath.join(*parts)) if parts else "."
        if relative.startswith("/") or relative == ".." or relative.startswith("../"):
            raise StorageError(f"path {posixpath.join(*parts)!r} escapes storage root {self.location}")
        return self.root if relative == "." else posixpath.join(self.root, relative)

    def uri(self, *parts: str) -> str:
        """A location string for `parts` that `Storage()` and Ray accept (path or URI)."""
        path = self.path(*parts)
        if not _is_uri(self.location):
            return path
        scheme = self.location.split("://", 1)[0]
        return f"{scheme}://{path.lstrip('/')}" if scheme != "file" else f"file://{path}"

    def child(self, *parts: str) -> Storage:
        return Storage(self.uri(*parts))

    # ----------------------------------------------------------------- queries
    def exists(self, *parts: str) -> bool:
        return self.filesystem.get_file_info(self.path(*parts)).type != pafs.FileType.NotFound

    def is_dir(self, *parts: str) -> bool:
        return self.filesystem.get_file_info(self.path(*parts)).type == pafs.FileType.Directory

    def size(self, *parts: str) -> int:
        return self.filesystem.get_file_info(self.path(*parts)).size

    def list(self, *parts: str) -> list[str]:
        """Names directly under a directory, sorted; [] if it does not exist."""
        if not self.is_dir(*parts):
            return []
        selector = pafs.FileSelector(self.path(*parts), recursive=False)
        return sorted(info.base_name for info in self.filesystem.get_file_info(selector))

    # ----------------------------------------------------------------- writes
    def makedirs(self, *parts: str) -> None:
        self.filesystem.create_dir(self.path(*parts), recursive=True)

    @contextmanager
    def atomic_output(self, *parts: str) -> Iterator[str]:
        """Yield a temporary path to write `parts` to; it is renamed into place on success."""
        final = self.path(*parts)
        self.filesystem.create_dir(posixpath.dirname(final), recursive=True)
        temporary = f"{final}.tmp-{uuid.uuid4().hex[:12]}"
        try:
            yield temporary
            self.filesystem.move(temporary, final)
        except BaseException:
            if self.filesystem.get_file_info(temporary).type != pafs.FileType.NotFound:
                self.filesystem.delete_file(temporary)
            raise

    def write_bytes(self, data: bytes, *parts: str) -> None:
        with self.atomic_output(*parts) as temporary:
            with self.filesystem.open_output_stream(temporary) as stream:
                stream.write(data)

    def write_json(self, value: Any, *parts: str) -> None:
        self.write_bytes(json.dumps(value, indent=2, sort_keys=True).encode() + b"\n", *parts)

    def write_text(self, text: str, *parts: str) -> None:
        self.write_bytes(text.encode(), *parts)

    def delete(self, *parts: str) -> None:
        """Delete a file or a directory tree if it exists."""
        info = self.filesystem.get_file_info(self.path(*parts))
        if info.type == pafs.FileType.Directory:
            self.filesystem.delete_dir(info.path)
        elif info.type != pafs.FileType.NotFound:
            self.filesystem.delete_file(info.path)

    # ----------------------------------------------------------------- reads
    def read_bytes(self, *parts: str) -> bytes:
        try:
            with self.filesystem.open_input_stream(self.path(*parts)) as stream:
                return stream.read()
        except FileNotFoundError as error:
            raise FileNotFoundError(f"{self.uri(*parts)} does not exist") from error

    def read_json(self, *parts: str) -> Any:
        return json.loads(self.read_bytes(*parts))

    def read_text(self, *parts: str) -> str:
        return self.read_bytes(*parts).decode()

    def open_input(self, *parts: str) -> io.RawIOBase:
        return self.filesystem.open_input_file(self.path(*parts))

    # ----------------------------------------------------------------- checks
    def check_writable(self) -> None:
        """Create the root and round-trip a probe file; StorageError naming the root if that fails."""
        probe = f".write-probe-{uuid.uuid4().hex[:8]}"
        try:
            self.makedirs()
            self.write_bytes(b"ok", probe)
            self.delete(probe)
        except OSError as error:
            raise StorageError(f"storage path {self.location} is not writable: {error}") from error
