"""Benchmark the changed-rows diff against a bare ``pyarrow.csv.read_csv`` of the same file.

The generated export (``bench_validate``'s file, cached) is validated once and its valid rows
stored as parquet, the way ``import_job`` receives them; a snapshot of as many employees is built
from them, with ``--changed`` of the rows edited (a department), ``--added`` of them left out
(so the file adds them) and ``--removed`` extra employees (who left). Each measurement then runs
in a fresh subprocess, as in ``bench_validate``:

1. **bare**: ``pyarrow.csv.read_csv`` of the CSV export: the floor.
2. **diff**: with the valid rows already loaded (not timed, as the IO manager hands them over),
   hash every row (``row_hash.hash_rows``), read the snapshot's ids and hashes and classify every
   row (``changes.diff_rows``): what ``import_job`` does before it sends anything.

The two alternate (bare, diff, bare, diff, …) and the time ratio is the median of the pairs'
ratios, so a machine shared with other work slows both sides of a pair alike.

Peak memory is ``VmHWM``. The diff child's own cost is its peak after the diff minus its resident
memory just before it (interpreter, imports and the loaded rows are the caller's, not the diff's).

Usage: ``python -m benchmarks.bench_diff --rows 1000000 [--repeat 3] [--json] [--strict]``
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.bench_validate import DEFAULT_DATA_DIR, MB, REPO_ROOT, RESULT_MARKER, _log, _max_rss_bytes

TIME_RATIO_TARGET = 2.0  # diff seconds / bare read seconds
RSS_RATIO_TARGET = 3.0  # diff's own peak memory / file size
PREPARED_VERSION = 2


def _rss_bytes() -> int:
    """Resident memory now (``VmRSS``): what the process holds before the measured call."""
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return _max_rss_bytes()


# --------------------------------------------------------------------------- child side


def _child_prepare(csv: Path, out: Path, changed: float, added: float, removed: float, seed: int) -> dict:
    """Valid rows as parquet, and a snapshot differing from them by the given fractions."""
    import numpy as np
    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq

    from audience_pipeline.row_hash import hash_rows
    from audience_pipeline.snapshot import SnapshotInfo, snapshot_schema, write_snapshot
    from audience_pipeline.validation import validate_file
    from benchmarks.bench_validate import benchmark_mapping

    mapping = benchmark_mapping()
    valid = validate_file(csv, mapping, default_region="US").valid
    pq.write_table(pa.Table.from_pandas(valid, preserve_index=False), out / "valid.parquet")
    n = len(valid)
    rng = np.random.default_rng(seed)
    order = rng.permutation(n)
    n_changed, n_added, n_removed = int(n * changed), int(n * added), int(n * removed)
    changed_rows, added_rows = order[:n_changed], order[n_changed : n_changed + n_added]
    before = valid.copy()
    before.loc[before.index[changed_rows], "department"] = "Before " + before["department"].iloc[changed_rows]
    keep = np.ones(n, dtype=bool)
    keep[added_rows] = False
    leavers = valid.iloc[order[-n_removed:]].assign(unique_id=[f"LEFT{i:08d}" for i in range(n_removed)])
    snapshot_rows = pd.concat([before[keep], leavers], ignore_index=True)
    columns = mapping.output_columns()
    hashes = hash_rows(snapshot_rows, columns, per_column=True, first_column=True)
    table = pa.table(
        {
            "unique_id": pa.array(snapshot_rows["unique_id"], pa.large_string()),
            "row_hash": hashes.rows,
            "id_hash": hashes.first,
            **{f"col:{c}": hashes.columns[c] for c in columns},
        },
        schema=snapshot_schema(columns),
    )
    write_snapshot(out / "snapshot.parquet", table, SnapshotInfo("bench", "bench", "bench", 0.0, len(table)))
    return {
        "valid_rows": n,
        "snapshot_rows": len(table),
        "expected": {
            "added": n_added,
            "changed": n_changed,
            "unchanged": n - n_added - n_changed,
            "removed": n_removed,
        },
    }


def _child_bare(csv: Path) -> dict[str, Any]:
    import pyarrow.csv as pa_csv

    baseline = _rss_bytes()
    started = time.perf_counter()
    table = pa_csv.read_csv(csv)
    seconds = time.perf_counter() - started
    return {
        "seconds": seconds,
        "before_rss_bytes": baseline,
        "peak_rss_bytes": _max_rss_bytes(),
        "rows": table.num_rows,
    }


def _child_diff(prepared: Path) -> dict[str, Any]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from audience_pipeline.changes import diff_rows
    from audience_pipeline.row_hash import hash_rows
    from audience_pipeline.snapshot import HASH, ID, ID_HASH, read_snapshot
    from benchmarks.bench_validate import benchmark_mapping

    columns = benchmark_mapping().output_columns()
    rows = pq.read_table(prepared / "valid.parquet").to_pandas()  # what the IO manager hands over
    before = _rss_bytes()
    loaded_peak = _max_rss_bytes()
    started = time.perf_counter()
    hashes = hash_rows(rows, columns, first_column=True)
    hashed = time.perf_counter()
    snapshot = read_snapshot(prepared / "snapshot.parquet", [ID, HASH, ID_HASH])
    ids = pa.array(rows["unique_id"], pa.large_string())
    changes = diff_rows(ids, hashes.rows, snapshot, id_hash=hashes.first)
    seconds = time.perf_counter() - started
    return {
        "seconds": seconds,
        "hash_seconds": hashed - started,
        "before_rss_bytes": before,
        "loaded_peak_rss_bytes": loaded_peak,
        "peak_rss_bytes": _max_rss_bytes(),
        "counts": {
            "added": changes.added,
            "changed": changes.changed,
            "unchanged": changes.unchanged,
            "removed": changes.removed,
        },
    }


def _run_child(args: argparse.Namespace) -> None:
    if args.child == "prepare":
        payload = _child_prepare(args.path, args.out, args.changed, args.added, args.removed, args.seed)
    elif args.child == "bare":
        payload = _child_bare(args.path)
    else:
        payload = _child_diff(args.out)
    sys.stdout.write("\n" + RESULT_MARKER + json.dumps(payload) + "\n")
    sys.stdout.flush()


# --------------------------------------------------------------------------- parent side


def _child(args: list[str], timeout: float) -> dict[str, Any]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
    cmd = [sys.executable, "-m", "benchmarks.bench_diff", *args]
    try:
        proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise SystemExit(f"child {args[:2]} timed out after {timeout:.0f} s") from None
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_MARKER):
            return json.loads(line[len(RESULT_MARKER) :])
    tail = " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-5:])
    raise SystemExit(f"child {args[:2]} exited {proc.returncode}: {tail}")


def prepare(
    csv: Path, rows: int, seed: int, fractions: dict[str, float], timeout: float
) -> tuple[Path, dict]:
    """The valid rows and the snapshot, cached beside the generated file."""
    key = f"{csv.stem}_diff_c{fractions['changed']}_a{fractions['added']}_r{fractions['removed']}"
    out = csv.parent / key
    sidecar = out / "prepared.json"
    if sidecar.is_file():
        cached = json.loads(sidecar.read_text())
        if cached.get("version") == PREPARED_VERSION and cached.get("csv_bytes") == csv.stat().st_size:
            return out, cached
    out.mkdir(parents=True, exist_ok=True)
    _log(f"preparing valid rows and a snapshot in {out}")
    args = ["--child", "prepare", "--path", str(csv), "--out", str(out), "--seed", str(seed)]
    args += [f"--{k}={v}" for k, v in fractions.items()]
    prepared = {**_child(args, timeout), "version": PREPARED_VERSION, "csv_bytes": csv.stat().st_size}
    sidecar.write_text(json.dumps(prepared, indent=2) + "\n")
    return out, prepared


def _summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    summary: dict[str, Any] = {"runs": runs}
    for key in ("seconds", "hash_seconds", "before_rss_bytes", "peak_rss_bytes"):
        if key in runs[0]:
            summary[key] = statistics.median(r[key] for r in runs)
    summary["own_peak_bytes"] = statistics.median(r["peak_rss_bytes"] - r["before_rss_bytes"] for r in runs)
    if "counts" in runs[-1]:
        summary["counts"] = runs[-1]["counts"]
    return summary


def run_benchmark(rows: int, repeat: int, seed: int, data_dir: Path, fractions: dict, timeout: float) -> dict:
    from benchmarks.bench_validate import ensure_file

    generated, _ = ensure_file(rows, seed, data_dir)
    out, prepared = prepare(generated.path, rows, seed, fractions, timeout)
    bare_runs, diff_runs = [], []
    for i in range(repeat):  # alternately, so both see the same machine (it may be shared)
        bare_runs.append(_child(["--child", "bare", "--path", str(generated.path)], timeout))
        diff_runs.append(_child(["--child", "diff", "--out", str(out)], timeout))
        b, d = bare_runs[-1], diff_runs[-1]
        _log(
            f"pair {i + 1}/{repeat}: bare {b['seconds']:.3f} s, diff {d['seconds']:.3f} s "
            f"(ratio {d['seconds'] / b['seconds']:.2f}), diff peak RSS {d['peak_rss_bytes'] / MB:.0f} MB"
        )
    bare, diff = _summary(bare_runs), _summary(diff_runs)
    size = generated.bytes
    checks = {
        "time_ratio": statistics.median(
            d["seconds"] / b["seconds"] for b, d in zip(bare_runs, diff_runs, strict=True)
        ),
        "own_peak_ratio": diff["own_peak_bytes"] / size,
        "counts_match": diff["counts"] == prepared["expected"],
    }
    ok = (
        checks["time_ratio"] <= TIME_RATIO_TARGET
        and checks["own_peak_ratio"] <= RSS_RATIO_TARGET
        and checks["counts_match"]
    )
    return {
        "file": {"path": str(generated.path), "bytes": size, "rows": rows},
        "prepared": prepared,
        "repeat": repeat,
        "bare": bare,
        "diff": diff,
        "checks": checks,
        "ok": ok,
    }


def format_report(report: dict[str, Any]) -> str:
    f, p, bare, diff, checks = (
        report["file"],
        report["prepared"],
        report["bare"],
        report["diff"],
        report["checks"],
    )
    size = f["bytes"]
    lines = [
        f"file      {f['path']} ({size / MB:.1f} MB, {f['rows']:,} rows; {p['valid_rows']:,} valid)",
        f"snapshot  {p['snapshot_rows']:,} employees; expected {p['expected']}",
        f"runs      median of {report['repeat']}, each in a fresh subprocess",
        "",
        f"{'measurement':<28}{'seconds':>9}{'peak RSS MB':>13}{'before MB':>11}{'own MB':>9}"
        f"{'peak/file':>11}",
    ]
    for label, m in (("bare pyarrow read_csv", bare), ("diff (hash + snapshot + join)", diff)):
        lines.append(
            f"{label:<28}{m['seconds']:>9.3f}{m['peak_rss_bytes'] / MB:>13.0f}"
            f"{m['before_rss_bytes'] / MB:>11.0f}{m['own_peak_bytes'] / MB:>9.0f}"
            f"{m['peak_rss_bytes'] / size:>11.2f}"
        )
    lines += [
        f"  of which hashing the rows {diff['hash_seconds']:.3f} s",
        "",
        f"diff time / bare time (median of pairs) {checks['time_ratio']:>5.2f}   "
        f"target <= {TIME_RATIO_TARGET:g}",
        f"diff's own peak memory / file          {checks['own_peak_ratio']:>5.2f}   "
        f"target <= {RSS_RATIO_TARGET:g}",
        f"counts {diff['counts']} {'match' if checks['counts_match'] else 'DIFFER'}",
        "",
        "overall: " + ("PASS" if report["ok"] else "FAIL"),
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Benchmark the changed-rows diff against a bare CSV read.")
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    parser.add_argument("--changed", type=float, default=0.02, help="share of rows edited since the snapshot")
    parser.add_argument("--added", type=float, default=0.01, help="share of rows not in the snapshot")
    parser.add_argument("--removed", type=float, default=0.01, help="leavers, as a share of the rows")
    parser.add_argument("--timeout", type=float, default=900.0)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--strict", action="store_true", help="exit 1 unless every check passes")
    parser.add_argument("--child", choices=("prepare", "bare", "diff"), help=argparse.SUPPRESS)
    parser.add_argument("--path", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        _run_child(args)
        return 0
    fractions = {"changed": args.changed, "added": args.added, "removed": args.removed}
    report = run_benchmark(args.rows, args.repeat, args.seed, args.data_dir, fractions, args.timeout)
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 1 if args.strict and not report["ok"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
