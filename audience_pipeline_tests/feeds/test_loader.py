"""Feeds files as people write them: every mistake is reported with the file, key path and fix."""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import pytest
import yaml

from audience_pipeline.feeds.loader import (
    DEMO_FEEDS,
    FEEDS_ENV_VAR,
    FeedsFileError,
    feeds_path,
    load_feeds,
    register_feed_secrets,
    secret_refs,
)
from audience_pipeline.feeds.model import AttributeSpec, CommunicateXIDestination, FolderSource, SecretRef
from audience_pipeline.redact import GLOBAL_REDACTOR, redact

BASE: dict[str, Any] = {
    "sources": {"hr_drop": {"type": "folder", "path": "incoming"}},
    "destinations": {
        "cxi": {
            "type": "communicate_xi",
            "base_url": "${TEST_CXI_BASE_URL}",
            "api_key": "${TEST_CXI_API_KEY}",
        }
    },
    "feeds": [
        {
            "name": "all_staff",
            "source": "hr_drop",
            "destination": "cxi",
            "mapping": {
                "unique_id": "Employee ID",
                "email": "Email",
                "first_name": "First Name",
                "attributes": {"department": "Department", "start": {"header": "Start", "type": "date"}},
            },
            "options": {"import_name": "All staff"},
        }
    ],
}


def config() -> dict[str, Any]:
    return copy.deepcopy(BASE)


def write(tmp_path: Path, data: dict[str, Any] | str, name: str = "feeds.yaml") -> Path:
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        data if isinstance(data, str) else yaml.safe_dump(data, sort_keys=False), encoding="utf-8"
    )
    return path


def load_error(path: Path) -> str:
    with pytest.raises(FeedsFileError) as info:
        load_feeds(path)
    message = str(info.value)
    assert str(path) in message, message
    return message


def test_bundled_demo_loads_without_any_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in [v for v in os.environ if v.startswith(("CXI_", "AEP_", "APSIS_", "YESMAIL_", "ALTCRAFT_"))]:
        monkeypatch.delenv(var)

    feeds = load_feeds(DEMO_FEEDS)

    by_vendor = {feeds.destination_for(f).type: f for f in feeds.feeds}
    assert set(by_vendor) == {
        "communicate_xi",
        "adobe_experience_platform",
        "apsis_one",
        "yesmail",
        "altcraft",
    }
    assert all(f.source == "hr_drop" for f in feeds.feeds)
    feed = by_vendor["communicate_xi"]
    assert feed.name == "all_staff_cxi"
    destination = feeds.destination_for(feed)
    assert isinstance(destination, CommunicateXIDestination)
    assert destination.api_key == SecretRef(env_var="CXI_API_KEY")
    source = feeds.source_for(feed)
    assert isinstance(source, FolderSource)
    assert Path(str(source.path)) == (DEMO_FEEDS.parent / "incoming").resolve()
    assert list(Path(str(source.path)).glob(source.glob))
    assert feed.mapping.attributes["start_date"] == AttributeSpec(header="Start Date", type="date")
    assert feed.options["import_name"] == "All staff"


def test_whole_reference_stays_a_reference(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEST_CXI_API_KEY", "key-never-in-the-model-1234")

    feeds = load_feeds(write(tmp_path, config()))

    destination = feeds.destinations["cxi"]
    assert destination.api_key == SecretRef(env_var="TEST_CXI_API_KEY")
    assert str(destination.api_key) == "${TEST_CXI_API_KEY}"
    assert "key-never-in-the-model-1234" not in feeds.model_dump_json()
    assert {ref.env_var for ref in secret_refs(feeds)} == {"TEST_CXI_BASE_URL", "TEST_CXI_API_KEY"}


def test_embedded_reference_is_interpolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home = tmp_path / "home"
    monkeypatch.setenv("HOME", str(home))
    data = config()
    data["sources"]["hr_drop"]["path"] = "${HOME}/x"

    feeds = load_feeds(write(tmp_path, data))

    assert feeds.sources["hr_drop"].path == str((home / "x").resolve())


def test_missing_embedded_variable_names_file_and_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("NO_SUCH_DIR_VAR", raising=False)
    data = config()
    data["sources"]["hr_drop"]["path"] = "${NO_SUCH_DIR_VAR}/drop"

    message = load_error(write(tmp_path, data))

    assert "sources.hr_drop.path" in message
    assert "NO_SUCH_DIR_VAR is not set" in message


def test_relative_folder_is_anchored_at_the_feeds_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    data = config()
    data["sources"]["abs"] = {"type": "folder", "path": str(tmp_path / "absolute")}

    feeds = load_feeds(write(tmp_path, data, "conf/feeds.yaml"))

    assert feeds.sources["hr_drop"].path == str((tmp_path / "conf" / "incoming").resolve())
    assert feeds.sources["abs"].path == str((tmp_path / "absolute").resolve())


def test_invalid_yaml_reports_line_and_column(tmp_path: Path) -> None:
    path = write(tmp_path, "sources:\n  hr: {type: folder\nfeeds: []\n")

    message = load_error(path)

    assert "invalid YAML at line 3, column 6: expected ',' or '}', but got ':'" in message
    assert "(while parsing a flow mapping at line 2, column 7)" in message


def test_duplicate_yaml_key_is_not_silently_dropped(tmp_path: Path) -> None:
    text = yaml.safe_dump(config(), sort_keys=False)
    text = text.replace("sources:\n", "sources:\n  hr_drop:\n    type: folder\n    path: old\n", 1)

    message = load_error(write(tmp_path, text))

    assert "duplicate key 'hr_drop' (first on line 2)" in message
    assert "line 5" in message


def test_unknown_key_names_path_and_suggests_the_spelling(tmp_path: Path) -> None:
    data = config()
    data["sources"]["hr_drop"]["glb"] = "*.txt"

    message = load_error(write(tmp_path, data))

    assert "sources.hr_drop.glb: unknown key" in message
    assert "did you mean 'glob'?" in message
    expected = "glob, move_processed_to, path, ready_marker, stable_after_seconds, type"
    assert f"expected one of: {expected}" in message


def test_unknown_key_keeps_capitalised_user_keys(tmp_path: Path) -> None:
    data = config()
    data["sources"] = {"HR": {"type": "folder", "path": "in", "pth": "x"}}
    data["feeds"][0]["source"] = "HR"
    data["feeds"][0]["mapping"]["attributes"] = {"Dept": {"header": "D", "tpye": "string"}}

    message = load_error(write(tmp_path, data))

    assert "sources.HR.pth: unknown key" in message
    assert "feeds[0].mapping.attributes.Dept.tpye: unknown key" in message
    assert "HR.folder" not in message


def test_missing_required_key(tmp_path: Path) -> None:
    data = config()
    del data["feeds"][0]["mapping"]["unique_id"]
    del data["destinations"]["cxi"]["api_key"]

    message = load_error(write(tmp_path, data))

    assert "2 problem(s)" in message
    assert "feeds[0].mapping.unique_id: required key is missing" in message
    assert "destinations.cxi.api_key: required key is missing" in message


def test_unknown_destination_type(tmp_path: Path) -> None:
    data = config()
    data["destinations"]["cxi"]["type"] = "communicate_x"

    message = load_error(write(tmp_path, data))

    assert "destinations.cxi.type: unknown type 'communicate_x'; expected one of 'communicate_xi'" in message


def test_unknown_references_and_duplicate_names_are_all_reported(tmp_path: Path) -> None:
    data = config()
    twin = copy.deepcopy(data["feeds"][0])
    twin.update(source="hr", destination="cx")
    data["feeds"].append(twin)

    message = load_error(write(tmp_path, data))

    assert "feeds[1].name: duplicate feed name 'all_staff' (also feeds[0])" in message
    assert "feeds[1].source: unknown source 'hr'; expected one of ['hr_drop']" in message
    assert "feeds[1].destination: unknown destination 'cx'; expected one of ['cxi']" in message
    assert "(top level)" not in message


def test_bad_attribute_type(tmp_path: Path) -> None:
    data = config()
    data["feeds"][0]["mapping"]["attributes"]["start"]["type"] = "datetime"

    message = load_error(write(tmp_path, data))

    assert "feeds[0].mapping.attributes.start.type: Input should be 'string', 'date'" in message
    assert "(got 'datetime')" in message


def test_no_channel_mapped(tmp_path: Path) -> None:
    data = config()
    del data["feeds"][0]["mapping"]["email"]

    message = load_error(write(tmp_path, data))

    assert "feeds[0].mapping: map at least one of 'email' or 'mobile_phone'" in message


def test_cxi_options_missing_import_name_and_unknown_key(tmp_path: Path) -> None:
    data = config()
    data["feeds"][0]["options"] = {"imprt_name": "All staff"}

    message = load_error(write(tmp_path, data))

    assert "feeds[0].options.import_name: required key is missing" in message
    assert "feeds[0].options.imprt_name: unknown key" in message
    assert "did you mean 'import_name'?" in message


def test_cxi_option_field_must_name_a_mapped_column(tmp_path: Path) -> None:
    data = config()
    data["feeds"][0]["options"].update(email_field="Email", name_field="department")

    message = load_error(write(tmp_path, data))

    assert "feeds[0].options.email_field: 'Email' is not a column of this feed" in message
    assert "'unique_id', 'email', 'first_name', 'department', 'start'" in message
    assert "name_field" not in message


def test_cxi_options_must_leave_a_channel(tmp_path: Path) -> None:
    data = config()
    data["feeds"][0]["options"]["email_field"] = None

    message = load_error(write(tmp_path, data))

    assert "feeds[0].options: Communicate XI needs an email or mobile phone column" in message


def test_cxi_default_fields_for_unmapped_columns_are_fine(tmp_path: Path) -> None:
    feeds = load_feeds(write(tmp_path, config()))

    assert "mobile_phone" not in feeds.feeds[0].mapping.output_columns()


def test_env_var_selects_the_feeds_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = config()
    data["feeds"][0]["name"] = "from_env"
    path = write(tmp_path, data)

    monkeypatch.delenv(FEEDS_ENV_VAR, raising=False)
    assert feeds_path() == DEMO_FEEDS
    monkeypatch.setenv(FEEDS_ENV_VAR, str(path))

    assert feeds_path() == path
    assert [f.name for f in load_feeds().feeds] == ["from_env"]
    monkeypatch.setenv(FEEDS_ENV_VAR, str(tmp_path / "missing.yaml"))
    with pytest.raises(FeedsFileError, match=f"missing.yaml: not found \\(set {FEEDS_ENV_VAR}\\)"):
        load_feeds()


def test_register_feed_secrets_teaches_the_redactor(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    secret = "cxi-test-secret-7f3a9b2c4d"
    monkeypatch.setenv("TEST_CXI_API_KEY", secret)
    monkeypatch.setenv("TEST_CXI_BASE_URL", "https://cxi.example.test/api")
    feeds = load_feeds(write(tmp_path, config()))
    assert secret not in GLOBAL_REDACTOR

    register_feed_secrets(feeds)

    assert redact(f"rejected key {secret}!") == "rejected key ***!"
    assert redact("calling https://cxi.example.test/api") == "calling https://cxi.example.test/api"
