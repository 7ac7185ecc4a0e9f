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
from collections.abc import Callable, Iterator
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

    @property
    def name(self) -> str:
        return posixpath.basename(self.root.rstrip("/"))

    def sibling(self, name: str) -> Storage:
        """`name` beside this directory, on the same filesystem (where a rename stays cheap)."""
        parent = posixpath.dirname(self.root.rstrip("/"))
        if not self.name or parent in ("", self.root.rstrip("/")):
            raise StorageError(f"{self.location} is a filesystem or bucket root: give a directory inside it")
        location = self.location.rstrip("/")
        return Storage(location[: len(location) - len(self.name)] + name)

    def contains(self, other: Storage) -> bool:
        """Whether `other` is this directory or lies under it, on the same filesystem (symlinks
        resolved for local paths, so a link cannot hide that two locations are one)."""
        mine, theirs = self._canonical(), other._canonical()
        return mine == theirs or theirs.startswith(mine.rstrip("/") + "/")

    def resolved(self) -> Storage:
        """This directory with symlinks resolved (local paths; other filesystems have none)."""
        if isinstance(self.filesystem, pafs.LocalFileSystem):
            return Storage(os.path.realpath(self.root))
        return self

    def _canonical(self) -> str:
        if isinstance(self.filesystem, pafs.LocalFileSystem):
            return "file://" + os.path.realpath(self.root)
        return f"{self.location.split('://', 1)[0]}://{self.root.rstrip('/')}"

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

    def replace_with(self, staging: Storage, manifest: str) -> None:
        """Make this directory hold exactly `staging`'s finished output (whose `manifest` was
        written last), then remove `staging`. Nothing of the old output is removed before the new
        one is complete: a local directory is swapped by two renames (a crash between them leaves
        both whole, beside each other); an object store, which has no rename, gets the new files
        copied over with the manifest last, and only then loses the old files the new output lacks."""
        if isinstance(self.filesystem, pafs.LocalFileSystem):
            old = self.sibling(f".{self.name}.kdray-old-{uuid.uuid4().hex[:8]}")
            if self.exists():
                self.filesystem.move(self.root, old.root)
            self.filesystem.move(staging.root, self.root)
            old.delete()
            return
        new_files = staging.files()
        self.delete(manifest)  # the old output reads as unfinished while files are copied
        for file in sorted(new_files, key=lambda name: name == manifest):  # the manifest last
            self.filesystem.copy_file(staging.path(file), self.path(file))
        for file in set(self.files()) - set(new_files):
            self.delete(file)
        staging.delete()

    def files(self) -> list[str]:
        """Every file under this directory, as paths relative to it."""
        if not self.is_dir():
            return []
        selector = pafs.FileSelector(self.root, recursive=True)
        return [posixpath.relpath(info.path, self.root) for info in self.filesystem.get_file_info(selector)
                if info.type == pafs.FileType.File]

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


# --------------------------------------------------------------------- outputs a command replaces
def check_replaceable(output: Storage, kind: str, manifest: str, is_own: Callable[[Any], bool], overwrite: bool,
                      inputs: dict[str, Storage] | None = None) -> None:
    """Refuse, before any work, an output directory a command must not replace: one that overlaps
    an input, one holding anything but kdray's own output of this `kind` (its `manifest` parsed as
    JSON satisfies `is_own`), or kdray's own output when `overwrite` is not set."""
    for role, location in (inputs or {}).items():
        if output.contains(location) or location.contains(output):
            raise StorageError(f"output {output.location} and the {role} {location.location} must not contain "
                               f"each other: choose an output directory outside it")
    if output.exists() and not output.is_dir():
        raise StorageError(f"output {output.location} is a file, not a directory")
    if not output.list():
        return
    if not _is_own_output(output, manifest, is_own):
        raise StorageError(f"output {output.location} holds files but no kdray {kind} ({manifest}): choose a new "
                           f"or empty directory")
    if not overwrite:
        raise StorageError(f"{output.uri(manifest)} exists; pass --overwrite to replace it")


def _is_own_output(output: Storage, manifest: str, is_own: Callable[[Any], bool]) -> bool:
    try:
        return output.exists(manifest) and bool(is_own(output.read_json(manifest)))
    except (ValueError, OSError):  # unreadable or not JSON: not a manifest kdray wrote
        return False


@contextmanager
def staged_output(output: Storage, manifest: str) -> Iterator[Storage]:
    """A new empty directory beside `output` to write the whole new output into, its `manifest`
    last; on success it replaces `output` (Storage.replace_with), on failure it is removed and
    `output` is as it was. A symlinked `output` keeps its link: what it points to is replaced."""
    output = output.resolved()
    staging = output.sibling(f".{output.name}.kdray-new-{uuid.uuid4().hex[:8]}")
    try:
        staging.check_writable()
        yield staging
        if not staging.exists(manifest):
            raise StorageError(f"{staging.location}: the output was not finished (no {manifest})")
        output.replace_with(staging, manifest)
    except BaseException:
        staging.delete()
        raise
