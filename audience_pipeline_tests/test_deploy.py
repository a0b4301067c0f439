"""``deploy/dagster.yaml`` against this Dagster's instance schema, offline (no server needed;
``integration/test_postgres.py`` runs the pipeline on it against a real PostgreSQL)."""

from __future__ import annotations

import re
from pathlib import Path

import dagster as dg
import pytest
from dagster._core.instance.config import dagster_instance_config

from audience_pipeline.definitions import build_definitions
from audience_pipeline.feeds.loader import DEMO_FEEDS, load_feeds
from audience_pipeline_tests.postgres import DEPLOY_DAGSTER_YAML, PG_ENV_VARS

VENDOR_POOLS = {
    f"{vendor}_api"
    for vendor in ("communicate_xi", "adobe_experience_platform", "apsis_one", "yesmail", "altcraft")
}


def test_deploy_dagster_yaml_is_valid_for_this_dagster(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in PG_ENV_VARS:
        monkeypatch.setenv(name, "5432" if name.endswith("PORT") else "value")

    config, instance_class = dagster_instance_config(str(DEPLOY_DAGSTER_YAML.parent), "dagster.yaml")

    assert instance_class is None
    assert config["storage"]["postgres"]["postgres_db"]["scheme"] == "postgresql+psycopg2"
    expected = {"storage", "run_coordinator", "concurrency", "run_retries", "run_monitoring", "retention"}
    assert set(config) >= expected


def test_deploy_dagster_yaml_names_every_variable_it_reads() -> None:
    text = DEPLOY_DAGSTER_YAML.read_text("utf-8")
    read = set(re.findall(r"\{env: (\w+)\}", text))

    assert read == set(PG_ENV_VARS)
    assert all(text.count(name) >= 2 for name in read)  # read, and listed in the header comment


def test_the_pools_in_dagster_yaml_are_the_ones_the_vendor_steps_use(tmp_path: Path) -> None:
    defs = build_definitions(load_feeds(DEMO_FEEDS), tmp_path)
    pools = {a.op.pool for a in defs.assets or [] if isinstance(a, dg.AssetsDefinition) and a.op.pool}

    assert pools == VENDOR_POOLS  # the demo has one feed per vendor
    assert set(re.findall(r"\b\w+_api\b", DEPLOY_DAGSTER_YAML.read_text("utf-8"))) == VENDOR_POOLS
