"""Paths in the pipeline's storage: a local folder, or a prefix in an S3-compatible bucket.

A local folder stays a plain ``pathlib.Path``. ``s3://bucket/prefix`` gives an :class:`ObjectPath`
with the few ``pathlib`` methods the pipeline calls (``/``, ``name``, ``parent``, ``is_file``,
``open``, ``stat``, ``replace``, ``unlink``, ``read_text`` …), so code written for a folder (staging
a file, say) works on a bucket unchanged. Parquet goes through :func:`read_parquet` and
:func:`write_parquet`, which hand pyarrow the filesystem (column projection by ranged reads).

The engine is pyarrow's ``S3FileSystem`` (the AWS C++ SDK that pyarrow ships): reads stream in one
GET, writes are multipart uploads that appear whole when closed. Not s3fs: it needs aiobotocore,
which pins botocore a release line behind boto3 (aiobotocore 3.10 wants botocore < 1.43.118, the
project runs boto3 1.44), so installing it downgrades boto3 and the resolver fights every upgrade;
pyarrow is a dependency already.

Endpoint, region and credentials come only from the standard AWS environment
(``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL``, ``AWS_REGION`` or ``AWS_DEFAULT_REGION``,
``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` / ``AWS_SESSION_TOKEN`` or the SDK's default
chain), never from the URL, so a storage URL is safe to show anywhere.
"""

from __future__ import annotations

import functools
import io
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO, Any, BinaryIO
from urllib.parse import urlsplit

import dagster as dg
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

S3_SCHEME = "s3://"
_CHUNK = 1 << 20


@dataclass(frozen=True)
class S3Settings:
    """Where S3 requests go, read from the standard AWS variables (credentials stay with the SDK)."""

    endpoint_url: str | None
    region: str | None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> S3Settings:
        env = os.environ if environ is None else environ
        endpoint = env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL") or None
        region = env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or None
        return cls(endpoint, region)


@functools.lru_cache(maxsize=8)
def s3_filesystem(settings: S3Settings) -> pafs.S3FileSystem:
    """One filesystem per endpoint and region (the SDK reads the credentials itself)."""
    return pafs.S3FileSystem(endpoint_override=settings.endpoint_url, region=settings.region)


class ObjectPath:
    """An object key (or a prefix) in a bucket, with the ``pathlib`` subset the pipeline uses.

    Prefixes need no folders, so :meth:`mkdir` does nothing; :meth:`replace` is a server-side copy
    and a delete (S3 has no rename); an object is visible only once its writer closed it.
    """

    __slots__ = ("bucket", "fs", "key")

    def __init__(self, bucket: str, key: str, fs: pafs.FileSystem) -> None:
        self.bucket = bucket
        self.key = key.strip("/")
        self.fs = fs

    @property
    def url(self) -> str:
        return f"{S3_SCHEME}{self.bucket}/{self.key}" if self.key else f"{S3_SCHEME}{self.bucket}"

    @property
    def arrow_path(self) -> str:
        """The path pyarrow's filesystem takes: ``bucket/key``."""
        return f"{self.bucket}/{self.key}" if self.key else self.bucket

    def __str__(self) -> str:
        return self.url

    def __repr__(self) -> str:
        return f"ObjectPath({self.url!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ObjectPath) and other.url == self.url

    def __hash__(self) -> int:
        return hash(self.url)

    def __truediv__(self, name: str | PurePosixPath) -> ObjectPath:
        part = str(name).strip("/")
        return ObjectPath(self.bucket, f"{self.key}/{part}" if self.key else part, self.fs)

    def joinpath(self, *parts: str) -> ObjectPath:
        path = self
        for part in parts:
            path = path / part
        return path

    @property
    def name(self) -> str:
        return PurePosixPath(self.key).name

    @property
    def stem(self) -> str:
        return PurePosixPath(self.key).stem

    @property
    def suffix(self) -> str:
        return PurePosixPath(self.key).suffix

    @property
    def parent(self) -> ObjectPath:
        parent = str(PurePosixPath(self.key).parent)
        return ObjectPath(self.bucket, "" if parent == "." else parent, self.fs)

    def with_name(self, name: str) -> ObjectPath:
        return self.parent / name

    def _info(self) -> pafs.FileInfo:
        return self.fs.get_file_info(self.arrow_path)

    def is_file(self) -> bool:
        return self._info().type == pafs.FileType.File

    def exists(self) -> bool:
        return self._info().type != pafs.FileType.NotFound

    def stat(self) -> os.stat_result:
        info = self._info()
        if info.type == pafs.FileType.NotFound:
            raise FileNotFoundError(self.url)
        mtime = info.mtime.timestamp() if info.mtime is not None else 0.0
        return os.stat_result((0o100644, 0, 0, 1, 0, 0, info.size or 0, mtime, mtime, mtime))

    def mkdir(self, mode: int = 0o777, parents: bool = False, exist_ok: bool = False) -> None:
        """Nothing to do: a key's prefix exists as soon as an object is under it."""

    def open(self, mode: str = "rb", encoding: str | None = None, newline: str | None = None) -> IO[Any]:
        """``rb`` streams the object (one GET, sequential reads); ``wb`` uploads as written."""
        if mode in ("rb", "r"):
            raw: Any = self.fs.open_input_stream(self.arrow_path)
        elif mode in ("wb", "w"):
            raw = self.fs.open_output_stream(self.arrow_path)
        else:
            raise ValueError(f"ObjectPath.open: mode {mode!r} is not supported (rb, wb, r, w)")
        if "b" in mode:
            return raw
        return io.TextIOWrapper(raw, encoding=encoding or "utf-8", newline=newline)

    def read_bytes(self) -> bytes:
        with self.open("rb") as fh:
            return fh.read()

    def read_text(self, encoding: str | None = None) -> str:
        return self.read_bytes().decode(encoding or "utf-8")

    def write_bytes(self, data: bytes) -> int:
        with self.open("wb") as fh:
            fh.write(data)
        return len(data)

    def write_text(self, text: str, encoding: str | None = None) -> int:
        return self.write_bytes(text.encode(encoding or "utf-8"))

    def replace(self, target: ObjectPath) -> ObjectPath:
        self.fs.move(self.arrow_path, target.arrow_path)
        return target

    def unlink(self, missing_ok: bool = False) -> None:
        try:
            self.fs.delete_file(self.arrow_path)
        except FileNotFoundError:
            if not missing_ok:
                raise


StorePath = Path | ObjectPath
"""A file or folder in the pipeline's storage."""


def storage_path(location: str | os.PathLike[str] | ObjectPath) -> StorePath:
    """``s3://bucket/prefix`` → :class:`ObjectPath`; ``file:///x`` or a plain path → ``Path``."""
    if isinstance(location, ObjectPath | Path):
        return location
    text = os.fspath(location)
    if text.startswith(S3_SCHEME):
        parts = urlsplit(text)
        if "@" in parts.netloc:
            raise ValueError(
                "the storage URL must not hold credentials: set AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY (or use the SDK's default chain) instead"
            )
        if not parts.netloc:
            raise ValueError(f"storage URL {text!r} names no bucket: expected s3://bucket/prefix")
        return ObjectPath(parts.netloc, parts.path, s3_filesystem(S3Settings.from_env()))
    if text.startswith("file://"):
        return Path(urlsplit(text).path)
    if "://" in text:
        raise ValueError(
            f"storage {text.split('://')[0]}:// is not supported: use s3://bucket/prefix or a local folder"
        )
    return Path(text)


def is_object(path: object) -> bool:
    return isinstance(path, ObjectPath)


def metadata_value(path: StorePath) -> dg.MetadataValue:
    """What the UI shows for a stored file: its object URL, or its local path."""
    return (
        dg.MetadataValue.url(path.url) if isinstance(path, ObjectPath) else dg.MetadataValue.path(str(path))
    )


def _arrow(path: StorePath) -> tuple[str, pafs.FileSystem | None]:
    return (path.arrow_path, path.fs) if isinstance(path, ObjectPath) else (str(path), None)


def remove_tree(path: StorePath) -> tuple[int, int]:
    """Delete a file, or a folder (an S3 prefix) and everything under it: ``(files, bytes)``
    removed; nothing there is ``(0, 0)``."""
    where, fs = _arrow(path)
    fs = fs or pafs.LocalFileSystem()
    info = fs.get_file_info(where)
    if info.type == pafs.FileType.NotFound:
        return 0, 0
    if info.type == pafs.FileType.File:
        fs.delete_file(where)
        return 1, info.size or 0
    selector = pafs.FileSelector(where, recursive=True, allow_not_found=True)
    inside = [i for i in fs.get_file_info(selector) if i.type == pafs.FileType.File]
    fs.delete_dir(where)
    return len(inside), sum(i.size or 0 for i in inside)


def read_parquet(path: StorePath, columns: list[str] | None = None) -> pa.Table:
    where, fs = _arrow(path)
    return pq.read_table(where, columns=columns, filesystem=fs)


def read_parquet_schema(path: StorePath) -> pa.Schema:
    where, fs = _arrow(path)
    return pq.read_schema(where, filesystem=fs)


@contextmanager
def write_file(path: StorePath) -> Iterator[BinaryIO]:
    """A binary stream whose content appears at ``path`` whole, or not at all if the block fails:
    a local file is written aside and renamed; an upload that failed is deleted (S3 completes
    an upload on close, even after an error)."""
    if isinstance(path, ObjectPath):
        try:
            with path.open("wb") as fh:
                yield fh
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        with partial.open("wb") as fh:
            yield fh
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def write_parquet(table: pa.Table, path: StorePath) -> None:
    with write_file(path) as fh:
        pq.write_table(table, fh)


def put_file(source: Path, target: StorePath) -> None:
    """Copy a local file into storage, streamed."""
    with source.open("rb") as src, write_file(target) as out:
        shutil.copyfileobj(src, out, _CHUNK)


@contextmanager
def local_copy(path: StorePath) -> Iterator[Path]:
    """A local file with ``path``'s content for readers that need one (the CSV reader maps it):
    the file itself when local, else a streamed copy in a temporary folder, deleted after."""
    if not isinstance(path, ObjectPath):
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="audience-object-") as tmp:
        local = Path(tmp) / (path.name or "object")
        with path.open("rb") as src, local.open("wb") as out:
            shutil.copyfileobj(src, out, _CHUNK)
        yield local
