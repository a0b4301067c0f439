"""The code location loads the way `dagster dev -w workspace.yaml` loads it."""

from __future__ import annotations

import importlib
from pathlib import Path

import dagster as dg
import pytest
import yaml

from audience_pipeline.feeds.loader import FEEDS_ENV_VAR, FeedsFileError, load_feeds, secret_refs

ROOT = Path(__file__).resolve().parents[1]


def _workspace_module() -> str:
    workspace = yaml.safe_load((ROOT / "workspace.yaml").read_text("utf-8"))
    return workspace["load_from"][0]["python_module"]["module_name"]


@pytest.fixture
def placeholder_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Every ``${VAR}`` of the bundled feeds set to a placeholder, as on a machine with no vendor."""
    monkeypatch.delenv(FEEDS_ENV_VAR, raising=False)
    for ref in secret_refs(load_feeds()):
        monkeypatch.setenv(ref.env_var, f"placeholder-{ref.env_var.lower()}")
    monkeypatch.setenv("CXI_BASE_URL", "http://127.0.0.1:9/cxi")
    monkeypatch.setenv("CXI_API_KEY", "placeholder-key")
    monkeypatch.setenv("AUDIENCE_PIPELINE_HOME", str(tmp_path))


def test_workspace_module_loads_all_definitions(placeholder_env: None) -> None:
    module = importlib.import_module(_workspace_module())
    defs = module.defs() if not isinstance(module.defs, dg.Definitions) else module.defs
    assert isinstance(defs, dg.Definitions)
    dg.Definitions.validate_loadable(defs)
    feeds = load_feeds()
    assert len(feeds.feeds) >= 1
    keys = {k.to_user_string() for k in defs.resolve_all_asset_keys()}
    assert keys == {
        f"{feed.name}/{a}"
        for feed in feeds.feeds
        for a in ("hr_file", "validated_rows", "rejected_rows", "import_job", "failure_report")
    }
    sensors = {s.name for s in defs.sensors}
    checks = {c.name for c in defs.resolve_asset_graph().asset_check_keys}
    assert checks == {
        "rejection_rate_within_threshold",
        "removed_rate_within_threshold",
        "row_accounting_adds_up",
    }
    for feed in feeds.feeds:
        assert f"{feed.name}__import_status" in sensors
        assert defs.resolve_job_def(f"{feed.name}__ingest").partitions_def is not None
        import_job = defs.resolve_assets_def(dg.AssetKey([feed.name, "import_job"]))
        assert import_job.op.pool == f"{feeds.destination_for(feed).type}_api"
    assert "all_staff_cxi__new_files" in sensors


def test_secrets_stay_env_vars_in_resource_config(placeholder_env: None) -> None:
    module = importlib.import_module(_workspace_module())
    defs = module.defs()
    resource = defs.resources["destination_cxi"]
    assert isinstance(resource.api_key, dg.EnvVar) and resource.api_key == "CXI_API_KEY"
    assert isinstance(resource.base_url, dg.EnvVar)
    assert "placeholder-key" not in repr(resource)


def test_bad_feeds_file_fails_loading_with_its_name(
    placeholder_env: None, monkeypatch, tmp_path: Path
) -> None:
    bad = tmp_path / "feeds.yaml"
    bad.write_text("sources: {}\ndestinations: {}\nfeeds:\n  - name: x\n", "utf-8")
    monkeypatch.setenv(FEEDS_ENV_VAR, str(bad))
    module = importlib.import_module(_workspace_module())
    with pytest.raises(FeedsFileError, match=str(bad)):
        module.defs()
