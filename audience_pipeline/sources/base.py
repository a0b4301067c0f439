"""What every HR source offers: list the files it holds and stream one of them.

Partitions are keyed by file name plus a short content hash, so a re-sent file with new
content is a new partition while the same bytes under the same name are recognised.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol

from pydantic import BaseModel

HASH_CHARS = 10
_CHUNK = 1 << 20


@dataclass(frozen=True)
class SourceFile:
    name: str
    size: int
    modified_ns: int


class HRSource(Protocol):
    def list_files(self) -> list[SourceFile]: ...

    def open(self, name: str) -> BinaryIO: ...

    def describe(self) -> str: ...


class StagedFile(BaseModel):
    """A source file copied into staging: the only copy later steps read."""

    name: str
    path: str
    sha256: str
    size: int


def partition_key(name: str, sha256: str) -> str:
    return f"{name}@{sha256[:HASH_CHARS]}"


def split_partition_key(key: str) -> tuple[str, str]:
    name, _, short_hash = key.rpartition("@")
    if not name or len(short_hash) != HASH_CHARS:
        raise ValueError(f"partition key {key!r} is not '<file name>@<{HASH_CHARS} hex chars>'")
    return name, short_hash


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
    with source.open(name) as src, partial.open("wb") as out:
        while chunk := src.read(_CHUNK):
            digest.update(chunk)
            out.write(chunk)
            size += len(chunk)
    partial.replace(target)
    return StagedFile(name=name, path=str(target), sha256=digest.hexdigest(), size=size)
