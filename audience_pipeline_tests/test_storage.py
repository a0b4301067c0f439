"""The IO manager and folders: what one step writes, the next one (or a person) reads back."""

from __future__ import annotations

import json
from pathlib import Path

import dagster as dg
import pandas as pd
import pyarrow.parquet as pq
import pytest

from audience_pipeline.destinations.base import ChunkJob, JobHandle
from audience_pipeline.sources.base import StagedFile
from audience_pipeline.storage import AudienceIOManager, PipelineStorage, safe_name
from audience_pipeline_tests.conftest import STORAGE_BUCKET, S3Server

PARTITION = "hr/exports/employees 2026-11-01.csv@49e9cfa5cc"
PARTITIONS = dg.DynamicPartitionsDefinition(name="files")
SEEN: dict[str, object] = {}


def employees() -> pd.DataFrame:
    """A validated frame as ``validate_file`` returns it: Arrow strings with nulls, int64 lines."""
    return pd.DataFrame(
        {
            "source_line": pd.Series([2, 3, 9_000_000_000], dtype="int64"),
            "unique_id": pd.Series(["E1", "E2", "E3"], dtype="str"),
            "email": pd.Series(["ann@x.org", None, "ç@x.fr"], dtype="str"),
            "note": pd.Series([None, None, None], dtype="str"),
        }
    )


def handle() -> JobHandle:
    return JobHandle(
        vendor="communicate_xi",
        feed="all_staff",
        partition=PARTITION,
        jobs=[
            ChunkJob(job_id="J1", first_row=0, row_count=2),
            ChunkJob(job_id="J2", first_row=2, row_count=1),
        ],
        submitted_rows=3,
        submitted_at=1_790_000_000.25,
        extra={"import_id": 7},
    )


@dg.asset(key=["feed", "rows"], partitions_def=PARTITIONS, io_manager_key="audience_io")
def rows_asset() -> pd.DataFrame:
    return employees()


@dg.asset(key=["feed", "job"], partitions_def=PARTITIONS, io_manager_key="audience_io")
def job_asset() -> JobHandle:
    return handle()


@dg.asset(key=["feed", "staged"], partitions_def=PARTITIONS, io_manager_key="audience_io")
def staged_asset() -> StagedFile:
    return StagedFile(name="e.csv", path="/staging/e.csv", sha256="ab" * 32, size=10)


@dg.asset(
    key=["feed", "report"],
    partitions_def=PARTITIONS,
    ins={
        "rows": dg.AssetIn(key=["feed", "rows"]),
        "job": dg.AssetIn(key=["feed", "job"]),
        "staged": dg.AssetIn(key=["feed", "staged"]),
    },
)
def report_asset(rows: pd.DataFrame, job: JobHandle, staged: StagedFile) -> None:
    SEEN.update(rows=rows, job=job, staged=staged)


@dg.asset(
    key=["feed", "ids"],
    partitions_def=PARTITIONS,
    ins={"ids": dg.AssetIn(key=["feed", "rows"], metadata={"columns": ["source_line", "unique_id"]})},
)
def ids_asset(ids: pd.DataFrame) -> None:
    """As ``failure_report`` reads ``validated_rows``: two columns of a possibly large frame."""
    SEEN["ids"] = ids


ALL = [rows_asset, job_asset, staged_asset, report_asset, ids_asset]


def run(tmp_path: Path, assets: list, partition: str | None = PARTITION) -> dg.ExecuteInProcessResult:
    with dg.instance_for_test() as instance:
        if partition is not None:
            instance.add_dynamic_partitions("files", [partition])
        return dg.materialize(
            assets,
            partition_key=partition,
            instance=instance,
            resources={"audience_io": AudienceIOManager(base_dir=str(tmp_path))},
            raise_on_error=False,
        )


@pytest.fixture(scope="module")
def materialized(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dg.ExecuteInProcessResult, dict]:
    """One run of every asset above (a Dagster run costs about a second; the tests share it)."""
    base = tmp_path_factory.mktemp("io")
    SEEN.clear()
    result = run(base, ALL)
    return base, result, dict(SEEN)


def test_frames_and_models_round_trip_between_assets(materialized) -> None:
    _, result, seen = materialized

    assert result.success
    pd.testing.assert_frame_equal(seen["rows"], employees())
    assert seen["rows"]["email"].dtype.storage == "pyarrow"
    assert seen["job"] == handle()
    assert seen["staged"] == StagedFile(name="e.csv", path="/staging/e.csv", sha256="ab" * 32, size=10)


def test_an_input_with_columns_metadata_loads_only_those_columns(materialized) -> None:
    _, _, seen = materialized

    pd.testing.assert_frame_equal(seen["ids"], employees()[["source_line", "unique_id"]])


def test_files_are_parquet_and_readable_json_under_assets(materialized) -> None:
    base, result, _ = materialized

    folder = base / "assets" / "feed"
    parquet = folder / "rows" / f"{safe_name(PARTITION)}.parquet"
    handle_json = folder / "job" / f"{safe_name(PARTITION)}.json"
    staged_json = folder / "staged" / f"{safe_name(PARTITION)}.json"
    assert sorted(p for p in base.rglob("*") if p.is_file()) == sorted([parquet, handle_json, staged_json])
    pd.testing.assert_frame_equal(pq.read_table(parquet).to_pandas(), employees())
    assert pq.read_schema(parquet).field("source_line").type == "int64"
    assert json.loads(handle_json.read_text("utf-8"))["jobs"][1] == {
        "job_id": "J2",
        "first_row": 2,
        "row_count": 1,
    }
    path_metadata = result.asset_materializations_for_node("feed__rows")[0].metadata["path"]
    assert path_metadata == dg.MetadataValue.path(str(parquet))


def test_an_empty_frame_keeps_its_columns_and_dtypes(tmp_path: Path) -> None:
    SEEN.clear()

    @dg.asset(key=["feed", "rows"], partitions_def=PARTITIONS, io_manager_key="audience_io")
    def no_rows() -> pd.DataFrame:
        return employees().iloc[:0]

    run(tmp_path, [no_rows, ids_asset])

    pd.testing.assert_frame_equal(SEEN["ids"], employees().iloc[:0][["source_line", "unique_id"]])


def test_an_unpartitioned_asset_is_stored_as_all(tmp_path: Path) -> None:
    @dg.asset(key=["feed", "rows"], io_manager_key="audience_io")
    def whole() -> pd.DataFrame:
        return employees()

    assert run(tmp_path, [whole], partition=None).success
    assert (tmp_path / "assets" / "feed" / "rows" / "all.parquet").is_file()


def test_other_values_are_refused(tmp_path: Path) -> None:
    @dg.asset(key=["feed", "rows"], io_manager_key="audience_io")
    def plain() -> dict:
        return {"rows": 1}

    result = run(tmp_path, [plain], partition=None)

    assert not result.success
    error = result.get_step_failure_events()[0].step_failure_data.error
    assert "stores DataFrames and pydantic models, not <class 'dict'>" in str(error.cause or error)


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        ("employees.csv@49e9cfa5cc", "employees.csv@49e9cfa5cc"),
        ("2026/11/employees.csv@49e9cfa5cc", "2026%2F11%2Femployees.csv@49e9cfa5cc"),
        ("dir\\e.csv@1", "dir%5Ce.csv@1"),
        ("100%.csv@1", "100%25.csv@1"),
        ("..", "%2E%2E"),
        (".", "%2E"),
    ],
)
def test_safe_name_is_one_path_component(key: str, expected: str) -> None:
    assert safe_name(key) == expected


def test_distinct_partitions_never_share_a_folder(tmp_path: Path) -> None:
    storage = PipelineStorage(base_dir=str(tmp_path))
    keys = ["a/b.csv@1", "a_b.csv@1", "a%2Fb.csv@1", "..", "...", "a\\b.csv@1"]

    staging = [storage.staging_dir("feed", k) for k in keys]
    reports = [storage.report_dir("feed", k) for k in keys]

    assert len(set(staging)) == len(keys) and len(set(reports)) == len(keys)
    assert all(p.parent == tmp_path / "staging" / "feed" for p in staging)
    assert all(p.parent == tmp_path / "reports" / "feed" for p in reports)
    assert all(p.resolve().parent == (tmp_path / "reports" / "feed").resolve() for p in reports)


@pytest.mark.integration  # moto's S3 server
def test_asset_values_round_trip_through_s3_storage(s3: S3Server, s3_storage: str) -> None:
    SEEN.clear()
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions("files", [PARTITION])
        result = dg.materialize(
            ALL,
            partition_key=PARTITION,
            instance=instance,
            resources={"audience_io": AudienceIOManager(base_dir=s3_storage)},
        )

    assert result.success
    pd.testing.assert_frame_equal(SEEN["rows"], employees())
    pd.testing.assert_frame_equal(SEEN["ids"], employees()[["source_line", "unique_id"]])
    assert SEEN["job"] == handle()
    name = safe_name(PARTITION)
    assert s3.keys(STORAGE_BUCKET) == [
        f"prod/assets/feed/job/{name}.json",
        f"prod/assets/feed/rows/{name}.parquet",
        f"prod/assets/feed/staged/{name}.json",
    ]
    path_metadata = result.asset_materializations_for_node("feed__rows")[0].metadata["path"]
    assert path_metadata == dg.MetadataValue.url(f"{s3_storage}/assets/feed/rows/{name}.parquet")
