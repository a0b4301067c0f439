"""The storage layer on a local folder and on S3 (moto's server): the same calls, the same results,
and what only S3 needs (URLs without credentials, run-local copies, no half-written objects)."""

from __future__ import annotations

import io
from pathlib import Path

import dagster as dg
import pandas as pd
import pyarrow as pa
import pyarrow.fs as pafs
import pytest

from audience_pipeline.feeds.loader import DEMO_FEEDS, load_feeds
from audience_pipeline.feeds.model import FeedsFile
from audience_pipeline.object_store import (
    ObjectPath,
    S3Settings,
    StorePath,
    local_copy,
    metadata_value,
    put_file,
    read_parquet,
    storage_path,
    write_file,
    write_parquet,
)
from audience_pipeline.reports import write_report
from audience_pipeline.sources.base import stage, stage_or_reuse
from audience_pipeline.storage import (
    HOME_ENV_VAR,
    STORAGE_ENV_VAR,
    PipelineStorage,
    storage_location,
    storage_url,
)
from audience_pipeline_tests.conftest import STORAGE_BUCKET, S3Server

pytestmark = pytest.mark.integration  # the s3 half starts moto's server

FAKE_FS = pafs.LocalFileSystem()  # path arithmetic never touches it


# -- URLs, settings and precedence (no server) ---------------------------------------------------


def test_an_s3_url_is_an_object_path_and_anything_else_a_local_path(tmp_path: Path) -> None:
    root = storage_path("s3://bucket/team/prod/")
    assert isinstance(root, ObjectPath) and (root.bucket, root.key) == ("bucket", "team/prod")
    assert storage_path("s3://bucket").url == "s3://bucket"
    assert storage_path(str(tmp_path)) == tmp_path
    assert storage_path(f"file://{tmp_path}") == tmp_path
    assert storage_path("relative/folder") == Path("relative/folder")


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("gs://bucket/x", "gs:// is not supported"),
        ("s3:///prefix", "names no bucket"),
        ("s3://AKIAEXAMPLE:wJalrXUtnFEMI@bucket/x", "must not hold credentials"),
    ],
)
def test_unusable_urls_are_refused_without_echoing_credentials(url: str, message: str) -> None:
    with pytest.raises(ValueError, match=message) as info:
        storage_path(url)
    assert "wJalrXUtnFEMI" not in str(info.value)


def test_object_paths_behave_like_posix_paths() -> None:
    path = ObjectPath("b", "root/staging/feed", FAKE_FS) / "employees.csv"

    assert path.url == str(path) == "s3://b/root/staging/feed/employees.csv"
    assert (path.name, path.stem, path.suffix) == ("employees.csv", "employees", ".csv")
    assert path.parent == ObjectPath("b", "root/staging/feed", FAKE_FS)
    assert path.with_name("x.partial").url == "s3://b/root/staging/feed/x.partial"
    assert (
        ObjectPath("b", "", FAKE_FS).joinpath("assets", "f", "a.parquet").arrow_path == "b/assets/f/a.parquet"
    )
    assert ObjectPath("b", "k", FAKE_FS).parent.url == "s3://b"


def test_settings_come_from_the_standard_aws_variables() -> None:
    both = {"AWS_ENDPOINT_URL": "http://general", "AWS_ENDPOINT_URL_S3": "http://s3-only"}
    assert S3Settings.from_env(both).endpoint_url == "http://s3-only"
    assert S3Settings.from_env({"AWS_ENDPOINT_URL": "http://general"}).endpoint_url == "http://general"
    assert S3Settings.from_env({"AWS_REGION": "eu-west-1", "AWS_DEFAULT_REGION": "x"}).region == "eu-west-1"
    assert S3Settings.from_env({"AWS_DEFAULT_REGION": "ap-south-1"}).region == "ap-south-1"
    assert S3Settings.from_env({}) == S3Settings(None, None)


def _feeds_with_storage(tmp_path: Path, url: str | None) -> FeedsFile:
    text = DEMO_FEEDS.read_text("utf-8")
    if url is not None:
        text += f"storage:\n  url: {url}\n"
    (tmp_path / "feeds.yaml").write_text(text, "utf-8")
    return load_feeds(tmp_path / "feeds.yaml")


def test_the_environment_wins_over_the_feeds_file_which_wins_over_the_home(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(STORAGE_ENV_VAR, raising=False)
    monkeypatch.setenv(HOME_ENV_VAR, str(tmp_path / "home"))
    plain = _feeds_with_storage(tmp_path, None)
    in_file = _feeds_with_storage(tmp_path, "s3://from-file/prod")

    assert storage_location(plain) == str(tmp_path / "home")
    assert storage_location(plain, tmp_path / "explicit") == str(tmp_path / "explicit")
    assert storage_location(in_file, tmp_path / "explicit") == "s3://from-file/prod"
    monkeypatch.setenv(STORAGE_ENV_VAR, "s3://from-env/prod")
    assert storage_location(in_file, tmp_path / "explicit") == "s3://from-env/prod"


def test_a_feeds_file_variable_is_resolved_late_and_a_relative_folder_beside_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(STORAGE_ENV_VAR, raising=False)
    with_var = _feeds_with_storage(tmp_path, "${PIPELINE_BUCKET_URL}")
    location = storage_location(with_var)
    assert isinstance(location, dg.EnvVar) and location.env_var_name == "PIPELINE_BUCKET_URL"
    with pytest.raises(ValueError, match="PIPELINE_BUCKET_URL is not set"):
        storage_url(with_var)
    monkeypatch.setenv("PIPELINE_BUCKET_URL", "s3://late/prod")
    assert storage_url(with_var) == "s3://late/prod"

    relative = _feeds_with_storage(tmp_path, "shared-store")
    assert storage_url(relative) == str((tmp_path / "shared-store").resolve())


# -- the same operations on both kinds of storage ------------------------------------------------


@pytest.fixture(params=["local", "s3"])
def root(request: pytest.FixtureRequest, tmp_path: Path) -> StorePath:
    if request.param == "local":
        (tmp_path / "store").mkdir()
        return storage_path(str(tmp_path / "store"))
    return storage_path(request.getfixturevalue("s3_storage"))


def _files(root: StorePath) -> list[str]:
    if isinstance(root, ObjectPath):
        selector = pafs.FileSelector(root.arrow_path, recursive=True, allow_not_found=True)
        infos = root.fs.get_file_info(selector)
        return sorted(i.path[len(root.arrow_path) + 1 :] for i in infos if i.type == pafs.FileType.File)
    return sorted(str(p.relative_to(root)) for p in Path(root).rglob("*") if p.is_file())


def test_bytes_text_and_file_facts(root: StorePath) -> None:
    path = root / "a" / "b.txt"
    assert not path.is_file() and not path.exists()

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("héllo", encoding="utf-8")

    assert path.is_file() and path.read_text("utf-8") == "héllo"
    assert path.stat().st_size == len("héllo".encode())
    moved = path.replace(root / "c.txt")
    assert moved.read_bytes() == "héllo".encode() and not path.is_file()
    moved.unlink()
    moved.unlink(missing_ok=True)
    with pytest.raises(FileNotFoundError):
        moved.unlink()
    assert _files(root) == []


def test_a_write_that_fails_leaves_nothing(root: StorePath) -> None:
    (root / "keep.txt").write_text("old", encoding="utf-8")

    with pytest.raises(RuntimeError), write_file(root / "keep.txt") as fh:
        fh.write(b"half of the new")
        raise RuntimeError("disk full")
    with pytest.raises(RuntimeError), write_file(root / "new.txt") as fh:
        fh.write(b"half")
        raise RuntimeError("killed")

    if isinstance(root, ObjectPath):  # an upload that failed is deleted, not kept half-written
        assert _files(root) == []
    else:  # a local file is written aside: the old content stays
        assert _files(root) == ["keep.txt"] and (root / "keep.txt").read_text() == "old"


def test_parquet_round_trips_and_reads_only_the_columns_asked_for(root: StorePath) -> None:
    table = pa.table({"unique_id": ["E1", "E2"], "n": [1, 2], "big": ["x" * 10, "y"]})
    path = root / "assets" / "rows.parquet"

    write_parquet(table, path)

    assert read_parquet(path).equals(table)
    assert read_parquet(path, columns=["unique_id"]).column_names == ["unique_id"]
    assert _files(root) == ["assets/rows.parquet"]


def test_reports_are_csv_and_their_metadata_names_the_object(root: StorePath) -> None:
    report = pd.DataFrame({"source_line": [2], "value": ["=HYPERLINK(1)"]})

    path = write_report(report, root / "reports" / "f" / "failures.csv")

    assert pd.read_csv(io.BytesIO(path.read_bytes())).iloc[0]["value"] == "'=HYPERLINK(1)"
    value = metadata_value(path)
    if isinstance(root, ObjectPath):
        assert value == dg.MetadataValue.url(f"s3://{STORAGE_BUCKET}/prod/reports/f/failures.csv")
        assert "AWS" not in value.value and "secret" not in value.value
    else:
        assert value == dg.MetadataValue.path(str(path))


def test_a_local_copy_streams_the_object_and_is_removed_after(root: StorePath, tmp_path: Path) -> None:
    data = bytes(range(256)) * 8192  # 2 MiB: more than one chunk
    source = tmp_path / "employees.csv"
    source.write_bytes(data)
    path = root / "staging" / "employees.csv"
    put_file(source, path)

    with local_copy(path) as local:
        assert isinstance(local, Path) and local.read_bytes() == data
        kept = local
    assert kept.exists() == (not isinstance(root, ObjectPath))  # the folder's own file stays


class _Source:
    """An HR source of one file, as ``stage`` reads it."""

    def __init__(self, data: bytes, fail: bool = False) -> None:
        self.data, self.fail = data, fail

    def open(self, name: str) -> io.RawIOBase:
        if not self.fail:
            return io.BytesIO(self.data)

        class Broken(io.BytesIO):
            def read(self, n: int = -1) -> bytes:
                if self.tell():
                    raise ConnectionError("dropped")
                return super().read(4)

        return Broken(self.data)


def test_staging_writes_through_the_storage_and_a_broken_download_leaves_nothing(root: StorePath) -> None:
    folder = root / "staging" / "feed" / "employees.csv@1"
    with pytest.raises(ConnectionError):
        stage(_Source(b"id\n1\n2\n", fail=True), "employees.csv", folder)
    assert _files(root) == []

    staged = stage(_Source(b"id\n1\n2\n"), "employees.csv", folder)
    again = stage_or_reuse(_Source(b"other"), "employees.csv", folder)

    assert staged.path == str(folder / "employees.csv")
    assert again == staged and staged.size == 7
    assert _files(root) == ["staging/feed/employees.csv@1/employees.csv"]


def test_pipeline_storage_lays_out_the_same_tree_on_both(root: StorePath) -> None:
    storage = PipelineStorage(base_dir=str(root))

    assert storage.root == root
    assert storage.staging_dir("f", "a/b.csv") == root / "staging" / "f" / "a%2Fb.csv"
    assert storage.snapshot_path("f") == root / "snapshots" / "f.parquet"
    assert storage.lock_dir() == root / "locks"


def test_the_s3_storage_uses_only_the_environment_for_endpoint_and_credentials(
    s3: S3Server, s3_storage: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = storage_path(s3_storage) / "probe.txt"
    path.write_text("ok")
    assert s3.keys(STORAGE_BUCKET) == ["prod/probe.txt"]

    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:9")  # nothing listens there
    with pytest.raises(OSError):
        storage_path(s3_storage).joinpath("probe.txt").read_text()
