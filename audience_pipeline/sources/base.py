"""What every HR source offers: list the files it holds and stream one of them.

Partitions are keyed by file name, so a person scanning forty files in the UI's picker reads
names, not hashes: a file's first content is ``employees_2026-11-01.csv``. A later content under
a name already taken gets 8 hex chars of its sha256, ``employees.csv@49e9cfa5``, so a re-sent
file with new content is a new partition while the same bytes under the same name are
recognised. What content a bare key stands for is recorded in the instance when the key is made
(``partition_content.py``), so ``hr_file`` still refuses a file that changed after it was
discovered. Keys of earlier releases, ``<name>@<10 hex chars>``, still parse and run.

File-drop sources (folder, SFTP, S3) share three arrival rules, applied here and by the
new-file sensor: ``glob`` picks the data files (flat, no sub-folders, hidden files skipped);
``ready_marker`` (e.g. ``.done``) makes a file wait for its companion marker
(``export.csv.done`` or ``export.done``); without a marker a file must have kept its size and
mtime across two listings, or be untouched for ``stable_after_seconds``, before it is read.
"""

from __future__ import annotations

import fnmatch
import hashlib
import io
import re
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO, Protocol, runtime_checkable

from pydantic import BaseModel

HASH_CHARS = 8
"""Hex chars of sha256 in a key that needs them (a new content under a name already taken)."""
CURSOR_HASH_CHARS = 16
"""Hex chars of sha256 the new-file sensor keeps per listed file."""
_HASHED = re.compile(r"(?P<name>.+)@(?P<hash>[0-9a-f]{8,64})")
"""``<name>@<hex>``: 8 (or 12, 16, 64 after a collision) chars, 10 in keys of earlier releases."""
_CHUNK = 1 << 20


@dataclass(frozen=True)
class SourceFile:
    """One listed data file. ``marked`` is None when the source uses no ready marker, else
    whether the marker is there (the writer's promise that the file is complete)."""

    name: str
    size: int
    modified_ns: int
    marked: bool | None = None


class SourceUnavailable(Exception):
    """The source cannot be reached or refused us; the message names it and never a credential."""


@runtime_checkable
class HRSource(Protocol):
    def list_files(self) -> list[SourceFile]: ...

    def open(self, name: str) -> BinaryIO: ...

    def describe(self) -> str: ...


@runtime_checkable
class FileDropSource(HRSource, Protocol):
    """A source that files are dropped into: arrival rules plus what to do once imported."""

    stable_after_seconds: float

    def processed_action(self) -> str | None:
        """A short description of what :meth:`mark_processed` does, or None when it does nothing."""
        ...

    def mark_processed(self, name: str) -> None:
        """Move or tag a file whose import was submitted; its staged copy stays the one re-read."""
        ...


class StagedFile(BaseModel):
    """A source file copied into staging: the only copy later steps read."""

    name: str
    path: str
    sha256: str
    size: int


def partition_key(name: str, sha256: str, chars: int = HASH_CHARS) -> str:
    """The hashed key of a file's content: ``<name>@<chars hex chars of sha256>``."""
    return f"{name}@{sha256[:chars]}"


def split_partition_key(key: str) -> tuple[str, str | None]:
    """``(file name, hash prefix)`` of a key; the prefix is None for a bare file name."""
    found = _HASHED.fullmatch(key)
    if found:
        return found["name"], found["hash"]
    if not key:
        raise ValueError("an empty partition key names no file")
    return key, None


def same_content(a: str, b: str) -> bool:
    """Whether two sha256 prefixes (of 8 chars or more) can be the same content."""
    return len(a) >= HASH_CHARS and len(b) >= HASH_CHARS and (a.startswith(b) or b.startswith(a))


def choose_partition_key(
    name: str, sha256: str, same_name: Mapping[str, str | None], taken: Collection[str]
) -> str:
    """The key of ``name`` with content ``sha256`` (a prefix of 16 chars or more will do).

    ``same_name`` maps the existing keys of this file name to the content recorded for them
    (``None``: unknown, e.g. a key added by hand). A key already holding this content is
    returned as it is; otherwise the bare name when no key has that name yet (and the name
    cannot be read as a hashed key), else 8 hex chars of the hash, more if those are ``taken``.
    """
    for key, recorded in same_name.items():
        known = recorded or split_partition_key(key)[1]
        if known and same_content(known, sha256):
            return key
    if not same_name and name not in taken and not _HASHED.fullmatch(name):
        return name
    for chars in (HASH_CHARS, 12, 16, 64):
        key = partition_key(name, sha256, chars)
        if key not in taken:
            return key
    raise ValueError(f"{name}: every key for content {sha256[:16]}… is taken")


def select_files(
    entries: Iterable[tuple[str, int, int]], glob: str, ready_marker: str | None
) -> list[SourceFile]:
    """Data files among ``(name, size, modified_ns)`` directory entries, sorted by name.

    Hidden files, partial uploads named ``.*`` and the markers themselves never count as data.
    """
    entries = [e for e in entries if not e[0].startswith(".")]
    names = {e[0] for e in entries}
    files = []
    for name, size, modified_ns in sorted(entries):
        if not fnmatch.fnmatchcase(name, glob) or (ready_marker and name.endswith(ready_marker)):
            continue
        marked = None
        if ready_marker:
            marked = f"{name}{ready_marker}" in names or f"{PurePosixPath(name).stem}{ready_marker}" in names
        files.append(SourceFile(name, size, modified_ns, marked))
    return files


def check_name(name: str, where: str) -> str:
    """A partition's file name is a plain name in the drop location, never a path out of it."""
    if not name or "/" in name or "\\" in name or name in (".", ".."):
        raise FileNotFoundError(f"{name!r} is not a file name in {where}")
    return name


def fingerprint(source: HRSource, name: str) -> str:
    """sha256 of a source file, streamed."""
    digest = hashlib.sha256()
    with source.open(name) as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def hash_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def stage_or_reuse(source: HRSource, name: str, dest_dir: Path) -> StagedFile:
    """Re-processing a partition re-reads its staged copy, even after the source moved the file."""
    staged = dest_dir / Path(name).name
    if staged.is_file():
        return StagedFile(name=name, path=str(staged), sha256=hash_file(staged), size=staged.stat().st_size)
    return stage(source, name, dest_dir)


def stage(source: HRSource, name: str, dest_dir: Path) -> StagedFile:
    """Stream the file into ``dest_dir`` while hashing it; a partial copy never keeps the final name."""
    dest_dir.mkdir(parents=True, exist_ok=True)
    target = dest_dir / Path(name).name
    partial = target.with_name(target.name + ".partial")
    digest = hashlib.sha256()
    size = 0
    try:
        with source.open(name) as src, partial.open("wb") as out:
            while chunk := src.read(_CHUNK):
                digest.update(chunk)
                out.write(chunk)
                size += len(chunk)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    partial.replace(target)
    return StagedFile(name=name, path=str(target), sha256=digest.hexdigest(), size=size)


class ChunkStream(io.RawIOBase):
    """A read-only binary file over an iterator of byte chunks (a streamed download), so
    :func:`stage` can copy it without holding the whole body in memory."""

    def __init__(self, chunks: Iterator[bytes], on_close: Callable[[], None] = lambda: None) -> None:
        self._chunks = chunks
        self._buffer = b""
        self._on_close = on_close

    def readable(self) -> bool:
        return True

    def readinto(self, target: bytearray | memoryview) -> int:  # type: ignore[override]
        while not self._buffer:
            try:
                self._buffer = next(self._chunks)
            except StopIteration:
                return 0
        n = min(len(target), len(self._buffer))
        target[:n] = self._buffer[:n]
        self._buffer = self._buffer[n:]
        return n

    def close(self) -> None:
        if not self.closed:
            try:
                self._on_close()
            finally:
                super().close()
