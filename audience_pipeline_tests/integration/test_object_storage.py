"""The pipeline with ``s3://`` storage (moto's server), as containers run it: every run in its own
process, with its own empty working directory, ``DAGSTER_HOME`` and temp folder, sharing only
the Postgres instance (``deploy/dagster.yaml``) and the buckets. If any step still read or wrote
a local file that another step needs, the next process could not find it.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import dagster as dg
import pytest

from audience_pipeline.assets import latest_metadata
from audience_pipeline.feeds.loader import DEMO_FEEDS
from audience_pipeline.sandbox import SandboxServer
from audience_pipeline.storage import HOME_ENV_VAR, STORAGE_ENV_VAR
from audience_pipeline.tags import PROCESS_TAG
from audience_pipeline_tests.conftest import STORAGE_BUCKET, S3Server
from audience_pipeline_tests.integration.conftest import API_KEY, DEMO_CSV, DEMO_MAPPING, FEED
from audience_pipeline_tests.integration.test_pipeline import EXPECTED_REPORT
from audience_pipeline_tests.postgres import DEPLOY_DAGSTER_YAML, PostgresCluster

pytestmark = pytest.mark.integration

HR_BUCKET = "hr-drop"
CSV_NAME = "employees_2026-11-01.csv"
FEEDS = f"""\
sources:
  hr_bucket:
    type: s3
    bucket: {HR_BUCKET}
    prefix: outbound
    endpoint_url: ${{HR_S3_ENDPOINT}}
    access_key_id: ${{HR_S3_KEY_ID}}
    secret_access_key: ${{HR_S3_SECRET}}
destinations:
  cxi:
    type: communicate_xi
    base_url: ${{CXI_BASE_URL}}
    api_key: ${{CXI_API_KEY}}
    timeout_seconds: 5
feeds:
  - name: {FEED}
    source: hr_bucket
    destination: cxi
{DEMO_MAPPING}    options:
      import_name: All staff
"""


@dataclass
class Container:
    """One process's world: an empty working directory, ``DAGSTER_HOME`` and temp folder."""

    root: Path
    env: dict[str, str]

    @property
    def workdir(self) -> Path:
        return self.root / "work"

    @property
    def dagster_home(self) -> Path:
        return self.root / "dagster_home"

    @property
    def tmp(self) -> Path:
        return self.root / "tmp"

    def run(self, *args: str, timeout: float = 180) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, *args],
            cwd=self.workdir,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def left_behind(self) -> dict[str, list[str]]:
        """Files under the three folders, except the feeds file and ``dagster.yaml`` put there."""
        found = {}
        for name, folder in (
            ("workdir", self.workdir),
            ("dagster_home", self.dagster_home),
            ("tmp", self.tmp),
        ):
            files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
            found[name] = [f for f in files if f not in ("feeds.yaml", "dagster.yaml")]
        return found


@pytest.fixture
def containers(
    tmp_path: Path,
    s3: S3Server,
    s3_storage: str,
    sandbox_server: SandboxServer,
    postgres_server: PostgresCluster,
    postgres_database: str,
):
    """A factory of fresh containers, all pointed at the same instance, buckets and sandbox."""
    sandbox_server.reset()
    base = {k: v for k, v in os.environ.items() if k not in ("DAGSTER_HOME", HOME_ENV_VAR, STORAGE_ENV_VAR)}
    base = {k: v for k, v in base.items() if not k.startswith("AWS_")}
    shared = {
        **postgres_server.env(postgres_database),
        **s3.storage_env(),
        STORAGE_ENV_VAR: s3_storage,
        "HR_S3_ENDPOINT": s3.endpoint_url,
        "HR_S3_KEY_ID": s3.access_key_id,
        "HR_S3_SECRET": s3.secret_access_key,
        "CXI_BASE_URL": sandbox_server.vendor_url("cxi"),
        "CXI_API_KEY": API_KEY,
    }
    made: list[Container] = []

    def make() -> Container:
        root = tmp_path / f"container{len(made)}"
        container = Container(root, {})
        for folder in (container.workdir, container.dagster_home, container.tmp):
            folder.mkdir(parents=True)
        shutil.copy(DEPLOY_DAGSTER_YAML, container.dagster_home / "dagster.yaml")
        (container.workdir / "feeds.yaml").write_text(FEEDS, "utf-8")
        container.env = {
            **base,
            **shared,
            "DAGSTER_HOME": str(container.dagster_home),
            "TMPDIR": str(container.tmp),
        }
        made.append(container)
        return container

    yield make


def _instance(tmp_path: Path, container: Container, monkeypatch: pytest.MonkeyPatch) -> dg.DagsterInstance:
    """The shared instance, read from this test's process."""
    for name, value in container.env.items():
        if name.startswith("DAGSTER_PG_"):
            monkeypatch.setenv(name, value)
    home = tmp_path / "reader_home"
    home.mkdir(exist_ok=True)
    shutil.copy(DEPLOY_DAGSTER_YAML, home / "dagster.yaml")
    return dg.DagsterInstance.from_config(str(home))


def _runs(result: subprocess.CompletedProcess) -> list[dict]:
    return [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]


def test_each_run_in_its_own_process_shares_only_the_instance_and_the_buckets(
    containers, s3: S3Server, s3_storage: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hr = s3.client()
    hr.create_bucket(Bucket=HR_BUCKET)
    hr.put_object(Bucket=HR_BUCKET, Key=f"outbound/{CSV_NAME}", Body=DEMO_CSV.read_bytes())
    run_alone = str(Path(__file__).with_name("run_alone.py"))  # imports only the installed package

    ingest = containers()
    result = ingest.run(run_alone, "feeds.yaml", "tick", f"{FEED}__new_files")
    assert result.returncode == 0, result.stdout + result.stderr
    assert [r["job"] for r in _runs(result)] == [f"{FEED}__ingest"]

    report = containers()  # `sync` finds nothing new, polls the import and runs the report
    result = report.run(
        "-m", "audience_pipeline.cli", "sync", "--feeds", "feeds.yaml", "--poll-interval", "0.2"
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "completed_with_failures" in result.stdout
    assert f"failure report: {s3_storage}/reports/{FEED}/" in result.stdout

    hr.delete_object(Bucket=HR_BUCKET, Key=f"outbound/{CSV_NAME}")  # gone from the source
    rerun = containers()  # a re-run of the partition reads the staged copy from the bucket
    with _instance(tmp_path, rerun, monkeypatch) as instance:
        (partition,) = instance.get_dynamic_partitions(f"{FEED}__files")
    result = rerun.run(run_alone, "feeds.yaml", "backfill", f"{FEED}__ingest", partition)
    assert result.returncode == 0, result.stdout + result.stderr

    with _instance(tmp_path, rerun, monkeypatch) as instance:
        runs = instance.get_runs()
        assert len(runs) == 3 and all(run.is_success for run in runs)
        assert len({run.tags[PROCESS_TAG] for run in runs}) == 3  # three processes, one run each
        metadata = latest_metadata(instance, dg.AssetKey([FEED, "failure_report"]), partition)
        reused = latest_metadata(instance, dg.AssetKey([FEED, "import_job"]), partition)
        staged = latest_metadata(instance, dg.AssetKey([FEED, "hr_file"]), partition)
        record = instance.fetch_materializations(
            dg.AssetRecordsFilter(asset_key=dg.AssetKey([FEED, "failure_report"])), limit=1
        ).records[0]
    assert metadata is not None and reused is not None and staged is not None
    assert reused["reused_previous_import"] is True
    assert isinstance(record.asset_materialization.metadata["report_path"], dg.UrlMetadataValue)
    url = metadata["report_path"]
    assert url.startswith(f"{s3_storage}/reports/{FEED}/") and url.endswith("/failures.csv")
    assert s3.access_key_id not in url and s3.secret_access_key not in url

    key = url.removeprefix(f"s3://{STORAGE_BUCKET}/")
    body = s3.client().get_object(Bucket=STORAGE_BUCKET, Key=key)["Body"].read().decode("utf-8")
    rows = list(csv.DictReader(io.StringIO(body)))
    assert [(r["source_line"], r["unique_id"], r["stage"], r["outcome"], r["column"]) for r in rows] == (
        EXPECTED_REPORT
    )
    keys = s3.keys(STORAGE_BUCKET)
    tops = {k.removeprefix("prod/").split("/")[0] for k in keys}
    assert tops == {"staging", "assets", "reports", "sync", "snapshots"}, keys  # no lock left behind
    assert any(k.endswith(f"/{CSV_NAME}") for k in keys if k.startswith("prod/staging/"))

    for container in (ingest, report, rerun):
        left = container.left_behind()
        assert left["workdir"] == [] and left["tmp"] == [], left
        assert all(f.startswith(DAGSTER_KEEPS) for f in left["dagster_home"]), left


DAGSTER_KEEPS = ("storage/",)
"""What Dagster itself writes under a Postgres instance's ``DAGSTER_HOME``: its compute logs."""


def test_sync_and_plan_run_on_s3_storage(
    tmp_path: Path,
    s3: S3Server,
    s3_storage: str,
    sandbox_server: SandboxServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``sync`` on its own SQLite instance with the storage in a bucket: only the instance stays
    in the working folder; ``plan`` then reads the snapshot from the bucket."""
    sandbox_server.reset()
    work = tmp_path / "work"
    (work / "incoming").mkdir(parents=True)
    shutil.copy(DEMO_CSV, work / "incoming" / CSV_NAME)
    old = 1_700_000_000
    os.utime(work / "incoming" / CSV_NAME, (old, old))
    feeds = DEMO_FEEDS.read_text("utf-8").replace("path: incoming", f"path: {work / 'incoming'}")
    (work / "feeds.yaml").write_text(feeds, "utf-8")
    env = {k: v for k, v in os.environ.items() if k not in ("DAGSTER_HOME", HOME_ENV_VAR)}
    env.update(s3.storage_env(), **{STORAGE_ENV_VAR: s3_storage})
    env.update(CXI_BASE_URL=sandbox_server.vendor_url("cxi"), CXI_API_KEY=API_KEY)
    cli = [sys.executable, "-m", "audience_pipeline.cli"]

    sync = subprocess.run(
        [*cli, "sync", "--feeds", "feeds.yaml", "--feed", FEED, "--poll-interval", "0.2"],
        cwd=work, env=env, capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    plan = subprocess.run(
        [*cli, "plan", "--feeds", "feeds.yaml", "--feed", FEED],
        cwd=work, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip

    assert sync.returncode == 0, sync.stdout + sync.stderr
    assert f"failure report: {s3_storage}/reports/{FEED}/" in sync.stdout
    assert plan.returncode == 0, plan.stdout + plan.stderr
    assert "0 of the 192 employees in the snapshot" in plan.stdout, plan.stdout  # read from the bucket
    keys = s3.keys(STORAGE_BUCKET)
    assert any(k.startswith(f"prod/snapshots/{FEED}") for k in keys), keys
    home = work / ".audience_pipeline"
    local = sorted(str(p.relative_to(home)) for p in home.rglob("*") if p.is_file())
    assert all(f.startswith(("dagster/", "locks/instance.lock")) for f in local), local
