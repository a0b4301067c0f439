"""The ``audience-pipeline`` command line: ``validate`` offline and ``sync`` against a real sandbox."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from audience_pipeline.cli import main
from audience_pipeline.feeds.loader import DEMO_FEEDS
from audience_pipeline.sandbox import SandboxSettings
from audience_pipeline_tests.sandboxes import SandboxPool

DEMO_CSV = DEMO_FEEDS.parent / "incoming" / "employees_2026-11-01.csv"


def test_validate_lists_rejects_by_line_and_writes_them(tmp_path: Path, capsys) -> None:
    out = tmp_path / "rejects.csv"

    code = main(["validate", str(DEMO_CSV), "--feed", "all_staff_cxi", "--out", str(out)])

    printed = capsys.readouterr().out
    assert code == 0
    assert "200 rows, 194 valid, 6 rejected (3.00%; feed threshold 5.00%)" in printed
    assert "line 94: Employee ID duplicates a value first seen on line 14 [E01013]" in printed
    lines = out.read_text("utf-8").splitlines()
    assert lines[0] == "source_line,unique_id,stage,outcome,column,value,reason"
    assert [line.split(",")[0] for line in lines[1:]] == ["43", "60", "76", "94", "121", "143"]


def test_validate_exit_codes_say_what_went_wrong(tmp_path: Path, capsys) -> None:
    broken = tmp_path / "broken.csv"
    lines = DEMO_CSV.read_text("utf-8").splitlines()
    # every email and phone broken: nothing left to reach anyone, so the rows are rejects
    broken.write_text(
        "\n".join([lines[0]] + [line.replace("@", "@@").replace(",+", ",+0") for line in lines[1:]]) + "\n"
    )
    workbook = tmp_path / "export.csv"
    workbook.write_bytes(b"PK\x03\x04" + b"\x00" * 60 + b"[Content_Types].xml" + b"\x00" * 200)

    assert main(["validate", str(broken), "--feed", "all_staff_cxi"]) == 1
    assert "feed threshold 5.00%" in capsys.readouterr().out
    assert main(["validate", str(workbook), "--feed", "all_staff_cxi"]) == 1
    err = capsys.readouterr().err
    assert str(workbook) in err and "not a CSV" in err
    assert main(["validate", str(DEMO_CSV), "--feed", "nope"]) == 2
    assert "no feed 'nope'" in capsys.readouterr().err


def _export(path: Path, *, blank_ids: int, above: tuple[str, ...] = (), header: str = "") -> Path:
    """200 rows under the demo header (or ``header``); the first ``blank_ids`` lack their id, a
    reject whatever the feed does with invalid optional values."""
    header = header or DEMO_CSV.read_text("utf-8").splitlines()[0]
    rows = [
        f"{'' if i < blank_ids else f'E{i:04d}'},p{i}@acme-corp.com,,Ann,Lee,Sales,2020-01-02,Austin"
        for i in range(200)
    ]
    path.write_text("\n".join([*above, header, *rows]) + "\n", "utf-8")
    return path


def test_validate_says_plainly_when_the_rejection_threshold_would_block_the_file(
    tmp_path: Path, capsys
) -> None:
    at_limit = _export(tmp_path / "at_limit.csv", blank_ids=10)  # 5.00%: the threshold passes
    over = _export(tmp_path / "over.csv", blank_ids=11)

    assert main(["validate", str(at_limit), "--feed", "all_staff_cxi"]) == 0
    printed = capsys.readouterr().out
    assert printed.splitlines()[-1] == "OK: 5.00% rejected is within the feed's max_rejection_rate of 5.00%"
    assert main(["validate", str(over), "--feed", "all_staff_cxi"]) == 1
    printed = capsys.readouterr().out
    assert printed.splitlines()[-1] == (
        "BLOCKED: 5.50% of the rows would be rejected, over the feed's max_rejection_rate of 5.00%; "
        "the pipeline would stop this file before sending anything to cxi"
    )


def test_validate_names_the_header_line_and_inexact_header_matches(tmp_path: Path, capsys) -> None:
    header = DEMO_CSV.read_text("utf-8").splitlines()[0].replace("Email", "EMAIL")
    titled = _export(
        tmp_path / "titled.csv", blank_ids=2, above=("Employee Report 2026-11-01",), header=header
    )

    assert main(["validate", str(titled), "--feed", "all_staff_cxi"]) == 0

    printed = capsys.readouterr().out
    assert "200 rows, 198 valid, 2 rejected (1.00%; feed threshold 5.00%)" in printed
    assert "  header read from line 2; the lines above it are skipped" in printed
    assert "  mapped header 'Email' matched 'EMAIL' (case or spacing differs)" in printed
    assert "  line 3: Employee ID is empty but required" in printed


@pytest.mark.integration
def test_sync_imports_new_files_once(
    tmp_path: Path, sandbox_pool: SandboxPool, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    sandbox_server = sandbox_pool.get(SandboxSettings(pace_seconds=0.05))
    sandbox_server.reset()
    for name, vendor in sandbox_server.app.vendors.items():
        for var, value in vendor.demo_env(sandbox_server.vendor_url(name)).items():
            monkeypatch.setenv(var, value)
    monkeypatch.delenv("DAGSTER_HOME", raising=False)
    (tmp_path / "incoming").mkdir()
    shutil.copy(DEMO_CSV, tmp_path / "incoming")
    feeds = tmp_path / "feeds.yaml"
    feeds.write_text(DEMO_FEEDS.read_text("utf-8"), "utf-8")
    args = ["sync", "--feeds", str(feeds), "--feed", "all_staff_cxi", "--home", str(tmp_path / "home")]
    args += ["--poll-interval", "0.05", "--timeout", "30"]

    assert main(args) == 0
    first = capsys.readouterr().out
    assert main(args) == 0
    second = capsys.readouterr().out

    summary = [line for line in first.splitlines() if line.startswith("all_staff_cxi ")]
    counts = ["200", "6", "192", "2", "0", "completed_with_failures"]
    assert len(summary) == 1 and summary[0].split()[2:8] == counts
    assert (tmp_path / "home" / "reports" / "all_staff_cxi").is_dir()
    assert second.strip().endswith("no new files, and nothing unfinished")


DEMO_VARS = ("CXI_", "APSIS_", "ALTCRAFT_", "AEP_", "YESMAIL_")


def _without_vendor_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith(DEMO_VARS):
            monkeypatch.delenv(name)


def test_sync_names_each_missing_variable_in_one_line_and_only_for_the_chosen_feed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    _without_vendor_env(monkeypatch)
    feeds = tmp_path / "feeds.yaml"
    feeds.write_text(DEMO_FEEDS.read_text("utf-8"), "utf-8")
    (tmp_path / "incoming").mkdir()

    code = main(["sync", "--feeds", str(feeds), "--feed", "all_staff_cxi", "--home", str(tmp_path / "h")])

    err = capsys.readouterr().err
    assert code == 2
    assert err.splitlines() == [
        "error: feed all_staff_cxi: destinations.cxi.base_url needs environment variable CXI_BASE_URL, "
        "which is not set",
        "error: feed all_staff_cxi: destinations.cxi.api_key needs environment variable CXI_API_KEY, "
        "which is not set",
    ]
    assert not (tmp_path / "h").exists()  # nothing started

    monkeypatch.setenv("CXI_BASE_URL", "ftp://files.example.com")
    monkeypatch.setenv("CXI_API_KEY", "k")
    assert (
        main(["sync", "--feeds", str(feeds), "--feed", "all_staff_cxi", "--home", str(tmp_path / "h")]) == 2
    )
    assert "CXI_BASE_URL is 'ftp://files.example.com', not an http(s) URL" in capsys.readouterr().err


def test_a_literal_secret_is_refused_with_the_reason(tmp_path: Path, capsys) -> None:
    feeds = tmp_path / "feeds.yaml"
    text = DEMO_FEEDS.read_text("utf-8").replace("api_key: ${CXI_API_KEY}", "api_key: abc123", 1)
    feeds.write_text(text, "utf-8")

    code = main(["sync", "--feeds", str(feeds), "--home", str(tmp_path / "h")])

    err = capsys.readouterr().err
    assert code == 2
    assert "destinations.cxi.api_key: a secret must come from the environment, write ${CXI_API_KEY}" in err
    assert "abc123" not in err and "Traceback" not in err
