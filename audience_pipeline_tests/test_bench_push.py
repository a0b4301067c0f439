"""Fast smoke test of the push benchmark (small row count, no timing assertions)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
ROWS = 3000


def test_bench_push_cli_emits_json(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "benchmarks.bench_push", "--rows", str(ROWS), "--repeat", "1"]
    cmd += ["--batch", "400", "--in-flight", "3", "--json", "--data-dir", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)

    assert report["source_rows"] == ROWS
    assert ROWS * 0.95 < report["rows"] < ROWS  # about 1% of generated rows are rejected
    assert report["batches"] == -(-report["rows"] // 400)
    assert report["encode_pack_seconds"] > 0
    bare = max(report["bare_async_rows_per_s"], report["bare_threads_rows_per_s"])
    assert min(report["bare_async_rows_per_s"], report["bare_threads_rows_per_s"]) > 0
    # The target is judged against the faster bare loop.
    assert abs(report["ratio"] - report["client_rows_per_s"] / bare) < 0.01
    assert report["ratio"] <= min(report["ratio_to_async"], report["ratio_to_threads"]) + 0.001
    assert report["encode_then_bare_rows_per_s"] > 0
    assert report["result"] in {"PASS", "FAIL"}
