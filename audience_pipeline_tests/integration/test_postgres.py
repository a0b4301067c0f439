"""The pipeline on the instance production runs: ``deploy/dagster.yaml`` as shipped (Postgres
storage, queued runs with per-vendor pools, run retries and monitoring, tick retention), against
a throwaway PostgreSQL cluster started for the session (``postgres_server``).

The end-to-end scenarios of ``test_pipeline.py``, ``test_fault_matrix.py`` and
``test_sync_process.py`` are imported below and so collected again in this module, where
``dagster_storage`` is ``postgres`` and ``sync`` runs with ``DAGSTER_HOME`` holding the deploy
file: the same test code and the same proofs (every row accounted for, one import per file
content, every import reported) as on SQLite.
"""

from __future__ import annotations

import os
import shutil
from contextlib import closing
from dataclasses import dataclass, fields
from pathlib import Path

import dagster as dg
import pytest
from dagster._core.definitions.run_request import InstigatorType

from audience_pipeline.cli import run_demo
from audience_pipeline.sandbox import SandboxServer, SandboxSettings
from audience_pipeline_tests.integration.faults import cxi_feeds
from audience_pipeline_tests.integration.test_fault_matrix import (  # noqa: F401  (run here on Postgres)
    hook,
    test_a_failed_ingest_is_retried_until_it_imports,
    test_a_forced_reimport_gets_its_own_report_and_a_plain_rerun_says_it_reused,
    test_a_report_run_that_fails_is_retried_once_the_fault_clears,
    test_a_report_that_keeps_failing_needs_attention_and_alerts,
    test_a_second_file_is_not_taken_for_the_lost_one,
    test_an_accepted_but_unanswered_create_is_adopted_not_sent_again,
    test_an_import_that_never_ends_times_out_with_every_row_reported,
    test_an_ingest_that_keeps_failing_needs_attention,
    test_status_polls_that_keep_failing_end_the_import,
)
from audience_pipeline_tests.integration.test_pipeline import (  # noqa: F401  (run here on Postgres)
    test_blocking_check_stops_a_broken_export,
    test_mapping_to_a_missing_header_names_it,
    test_new_file_flows_to_failure_report,
    test_same_content_is_not_imported_twice_and_new_content_updates_the_import,
    test_source_that_is_down_skips_the_tick,
    test_status_sensor_keeps_a_small_cursor_and_requests_once,
    test_unreadable_file_fails_with_file_and_reason,
)
from audience_pipeline_tests.integration.test_sync_process import (  # noqa: F401  (run here on Postgres)
    SLOW,
    Sync,
    make_sync,
    test_killed_after_the_intent_before_the_vendor_got_anything,
    test_killed_between_the_vendors_answer_and_the_record,
    test_killed_while_polling_the_next_sync_finishes_it,
    test_sync_racing_a_materialization_imports_once,
    test_two_syncs_at_once_import_once,
)
from audience_pipeline_tests.postgres import DEPLOY_DAGSTER_YAML, PostgresCluster
from audience_pipeline_tests.sandboxes import SandboxPool

pytestmark = pytest.mark.integration


@pytest.fixture
def dagster_storage() -> str:
    """Every pipeline in this module runs on ``deploy/dagster.yaml`` with Postgres storage."""
    return "postgres"


def dagster_home_for(
    root: Path, cluster: PostgresCluster, database: str, monkeypatch: pytest.MonkeyPatch
) -> tuple[Path, dict[str, str]]:
    """A ``DAGSTER_HOME`` holding the deploy file, and the environment that points it at ``database``
    (set in this process too, so the test reads the same instance)."""
    home = root / "dagster_home"
    home.mkdir()
    shutil.copy(DEPLOY_DAGSTER_YAML, home / "dagster.yaml")
    env = {**cluster.env(database), "DAGSTER_HOME": str(home)}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return home, env


@dataclass
class PostgresSync(Sync):
    """``audience-pipeline sync`` with ``DAGSTER_HOME`` set: its instance is the Postgres one."""

    dagster_home: Path = Path()

    def instance(self) -> dg.DagsterInstance:
        return dg.DagsterInstance.from_config(str(self.dagster_home))


def postgres_sync(
    root: Path,
    sandbox: SandboxServer,
    cluster: PostgresCluster,
    database: str,
    monkeypatch: pytest.MonkeyPatch,
) -> PostgresSync:
    sync = make_sync(root, sandbox, cxi_feeds())
    home, env = dagster_home_for(root, cluster, database, monkeypatch)
    sync.env.update(env)
    return PostgresSync(**{f.name: getattr(sync, f.name) for f in fields(Sync)}, dagster_home=home)


@pytest.fixture
def sync(
    tmp_path: Path,
    sandbox_server: SandboxServer,
    postgres_server: PostgresCluster,
    postgres_database: str,
    monkeypatch: pytest.MonkeyPatch,
) -> PostgresSync:
    return postgres_sync(tmp_path, sandbox_server, postgres_server, postgres_database, monkeypatch)


@pytest.fixture
def slow_sync(
    tmp_path: Path,
    sandbox_pool: SandboxPool,
    postgres_server: PostgresCluster,
    postgres_database: str,
    monkeypatch: pytest.MonkeyPatch,
) -> PostgresSync:
    return postgres_sync(tmp_path, sandbox_pool.get(SLOW), postgres_server, postgres_database, monkeypatch)


def test_the_deploy_instance_creates_its_tables_and_has_queue_pools_retries_and_retention(
    tmp_path: Path, postgres_server: PostgresCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    empty = postgres_server.create_database()  # not the template: the instance creates its tables
    home, _ = dagster_home_for(tmp_path, postgres_server, empty, monkeypatch)

    with dg.DagsterInstance.get() as instance:
        assert str(instance.root_directory) == str(home)
        assert type(instance.run_storage).__name__ == "PostgresRunStorage"
        assert type(instance.event_log_storage).__name__ == "PostgresEventLogStorage"
        assert type(instance.schedule_storage).__name__ == "PostgresScheduleStorage"
        assert instance.event_log_storage._engine.dialect.driver == "psycopg2"
        assert type(instance.run_coordinator).__name__ == "QueuedRunCoordinator"
        pools = instance.get_concurrency_config().pool_config
        assert (pools.pool_granularity.value, pools.default_pool_limit) == ("run", 2)
        assert instance.get_concurrency_config().run_queue_config.max_concurrent_runs == 8
        assert instance.run_retries_enabled and instance.run_retries_max_retries == 1
        assert not instance.run_retries_retry_on_asset_or_op_failure
        assert instance.run_monitoring_enabled
        assert instance.event_log_storage.supports_global_concurrency_limits
        retention = instance.get_tick_retention_settings(InstigatorType.SENSOR)
        sensor_days = {status.value: days for status, days in retention.items()}
        assert sensor_days == {"SKIPPED": 7, "FAILURE": 30, "SUCCESS": 90, "STARTED": -1}
        assert instance.get_runs() == []
    with closing(postgres_server.connect(empty)) as connection, connection.cursor() as cursor:
        cursor.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
        tables = {row[0] for row in cursor.fetchall()}
    assert {"runs", "event_logs", "jobs", "job_ticks", "alembic_version", "concurrency_limits"} <= tables


def test_sync_keeps_its_runs_in_the_dagster_home_instance(sync: PostgresSync) -> None:
    code, out, err = sync.run()

    assert code == 0, out + err
    assert "completed_with_failures" in out
    assert not (sync.home / "dagster").exists()  # no SQLite instance beside the working folder
    sync.proof()
    code, out, err = sync.run()
    assert code == 0 and out.strip().endswith("no new files, and nothing unfinished"), out + err


def test_demo_uses_the_dagster_home_instance(
    tmp_path: Path, postgres_server: PostgresCluster, postgres_database: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    home, _ = dagster_home_for(tmp_path, postgres_server, postgres_database, monkeypatch)

    saved = dict(os.environ)
    try:
        code = run_demo(tmp_path / "work", settings=SandboxSettings(pace_seconds=0.05))
    finally:  # the demo exports the sandbox's credentials for its feeds
        os.environ.clear()
        os.environ.update(saved)

    assert code == 0
    assert not (tmp_path / "work" / "dagster").exists()
    with dg.DagsterInstance.from_config(str(home)) as instance:
        runs = instance.get_runs()
    assert len(runs) == 10 and all(run.is_success for run in runs)  # ingest + report, five vendors
    assert {run.job_name.rsplit("__", 1)[1] for run in runs} == {"ingest", "report"}
