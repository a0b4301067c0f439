"""Benchmark CSV validation against a bare ``pyarrow.csv.read_csv`` of the same file.

Each measurement runs in a fresh subprocess so its peak RSS is its own (a process's high-water
mark never goes down, so sharing one process would hide everything but the first peak).
The child reports its RSS after imports (baseline) and after the measured call (peak), and the
parent takes the median over ``--repeat`` children.

Only the standard library is imported at module level: the child for the bare read must not pay
for pandas or the package, and the package may not exist yet.

Usage: ``python -m benchmarks.bench_validate --rows 1000000 [--repeat 3] [--json] [--strict]
[--phones national-mix]``
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from audience_pipeline.feeds.model import FieldMapping
    from benchmarks.generate_employees import GeneratedFile

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA_DIR = REPO_ROOT / "benchmarks" / "data"
TIME_RATIO_TARGET = 10.0  # pipeline seconds / bare pyarrow seconds
RSS_RATIO_TARGET = 6.0  # pipeline peak RSS / file size
RESULT_MARKER = "BENCH_RESULT "
MB = 1_000_000


def benchmark_mapping() -> FieldMapping:
    """The feed mapping for the generated file's headers (imports the package, so call it in the child)."""
    from audience_pipeline.feeds.model import AttributeSpec, FieldMapping

    return FieldMapping(
        unique_id="Employee ID",
        email="Email",
        mobile_phone="Mobile Phone",
        first_name="First Name",
        last_name="Last Name",
        attributes={
            "department": "Department",
            "job_title": "Job Title",
            "start_date": AttributeSpec(header="Start Date", type="date"),
            "office_city": "Office City",
        },
    )


# --------------------------------------------------------------------------- child side


def _max_rss_bytes() -> int:
    """This process's peak RSS so far.

    On Linux this is ``VmHWM``, the high-water mark of the process's own address space.
    ``ru_maxrss`` is not usable there: execve keeps the pre-exec high-water mark, so a child
    spawned from a parent that just generated a large file would start with the parent's peak.
    """
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return peak if sys.platform == "darwin" else peak * 1024


def _child_bare(path: Path) -> dict[str, Any]:
    started = time.perf_counter()
    import pyarrow.csv as pa_csv

    import_seconds = time.perf_counter() - started
    baseline = _max_rss_bytes()
    started = time.perf_counter()
    table = pa_csv.read_csv(path)
    seconds = time.perf_counter() - started
    return {
        "status": "ok",
        "seconds": seconds,
        "import_seconds": import_seconds,
        "baseline_rss_bytes": baseline,
        "peak_rss_bytes": _max_rss_bytes(),
        "rows": table.num_rows,
    }


def _child_pipeline(path: Path, default_region: str) -> dict[str, Any]:
    started = time.perf_counter()
    try:
        from audience_pipeline.validation import validate_file
    except ImportError as exc:
        return {"status": "skipped", "reason": f"cannot import audience_pipeline.validation: {exc}"}
    try:
        mapping = benchmark_mapping()
    except Exception as exc:  # the lead's model may not match the expected API yet
        return {"status": "error", "reason": f"building the mapping failed: {exc!r}"}
    import_seconds = time.perf_counter() - started
    baseline = _max_rss_bytes()
    started = time.perf_counter()
    try:
        result = validate_file(path, mapping, default_region=default_region)
    except Exception as exc:
        return {"status": "error", "reason": f"validate_file raised {exc!r}"}
    seconds = time.perf_counter() - started
    peak = _max_rss_bytes()
    rejects = result.rejects
    columns = set(getattr(rejects, "columns", ()))
    rejected_rows = int(rejects["source_line"].nunique()) if "source_line" in columns else len(rejects)
    warnings = getattr(result, "warnings", None)
    warned_rows = int(warnings["source_line"].nunique()) if warnings is not None else 0
    by_column: dict[str, int] = {}
    if "column" in columns:
        by_column = {str(k): int(v) for k, v in rejects["column"].value_counts().items()}
    return {
        "status": "ok",
        "seconds": seconds,
        "import_seconds": import_seconds,
        "baseline_rss_bytes": baseline,
        "peak_rss_bytes": peak,
        "source_rows": int(result.source_rows),
        "valid_rows": len(result.valid),
        "reject_records": len(rejects),
        "rejected_rows": rejected_rows,
        "warned_rows": warned_rows,
        "rejects_by_column": by_column,
    }


def _run_child(kind: str, path: Path, default_region: str) -> None:
    payload = _child_bare(path) if kind == "bare" else _child_pipeline(path, default_region)
    # A marker line, so anything the package prints to stdout cannot be mistaken for the result.
    sys.stdout.write("\n" + RESULT_MARKER + json.dumps(payload) + "\n")
    sys.stdout.flush()


# --------------------------------------------------------------------------- parent side


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def ensure_file(
    rows: int, seed: int, data_dir: Path, phones: str = "default"
) -> tuple[GeneratedFile, float | None]:
    """Return the cached file for ``(rows, seed, phones)``, generating it if missing or stale.

    The second value is the generation time in seconds, or ``None`` when the cache was used.
    """
    from benchmarks.generate_employees import GENERATOR_VERSION, GeneratedFile, generate

    style = "" if phones == "default" else f"_{phones}"
    path = data_dir.resolve() / f"employees_{rows}_seed{seed}{style}.csv"
    sidecar = path.with_suffix(".json")
    if path.exists() and sidecar.exists():
        try:
            cached = GeneratedFile.from_json(json.loads(sidecar.read_text()))
            if (
                cached.generator_version == GENERATOR_VERSION
                and cached.rows == rows
                and cached.seed == seed
                and cached.bad_fraction == 0.01
                and cached.phones == phones
                and path.stat().st_size == cached.bytes
            ):
                return dataclasses.replace(cached, path=path), None
        except (ValueError, TypeError, KeyError):
            pass  # unreadable sidecar: regenerate
    _log(f"generating {rows:,} rows -> {path}")
    started = time.perf_counter()
    generated = generate(path, rows, bad_fraction=0.01, seed=seed, phones=phones)
    seconds = time.perf_counter() - started
    sidecar.write_text(json.dumps(generated.to_json(), indent=2) + "\n")
    return generated, seconds


def _measure_once(kind: str, path: Path, default_region: str, timeout: float) -> dict[str, Any]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
    cmd = [sys.executable, "-m", "benchmarks.bench_validate", "--child", kind, "--path", str(path)]
    cmd += ["--default-region", default_region]
    try:
        proc = subprocess.run(
            cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired:
        return {"status": "error", "reason": f"timed out after {timeout:.0f} s"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_MARKER):
            return json.loads(line[len(RESULT_MARKER) :])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
    return {"status": "error", "reason": f"child exited {proc.returncode}: " + " | ".join(tail)}


def _measure(kind: str, path: Path, repeat: int, default_region: str, timeout: float) -> dict[str, Any]:
    """Run ``repeat`` fresh children and summarise with medians; stop early on skip/error."""
    runs: list[dict[str, Any]] = []
    for i in range(repeat):
        run = _measure_once(kind, path, default_region, timeout)
        if run["status"] != "ok":
            _log(f"{kind}: {run['status']}: {run.get('reason', '')}")
            return {"status": run["status"], "reason": run.get("reason", ""), "runs": runs}
        peak_mb = run["peak_rss_bytes"] / MB
        _log(f"{kind} run {i + 1}/{repeat}: {run['seconds']:.3f} s, peak RSS {peak_mb:.0f} MB")
        runs.append(run)
    summary: dict[str, Any] = {"status": "ok", "runs": runs}
    for key in ("seconds", "import_seconds", "peak_rss_bytes", "baseline_rss_bytes"):
        summary[key] = statistics.median(r[key] for r in runs)
    summary["peak_rss_mb"] = summary["peak_rss_bytes"] / MB
    summary["baseline_rss_mb"] = summary["baseline_rss_bytes"] / MB
    # Counts are deterministic; report the last run's.
    for key, value in runs[-1].items():
        if key not in summary and key != "status":
            summary[key] = value
    return summary


def _check(value: float | None, target: float, *, at_most: bool = True) -> dict[str, Any]:
    if value is None:
        return {"value": None, "target": target, "result": "SKIP"}
    ok = value <= target if at_most else value == target
    return {"value": value, "target": target, "result": "PASS" if ok else "FAIL"}


def run_benchmark(
    rows: int,
    repeat: int,
    seed: int,
    data_dir: Path,
    default_region: str,
    timeout: float,
    phones: str = "default",
) -> dict[str, Any]:
    """Generate (or reuse) the file, measure both steps and evaluate the targets."""
    generated, gen_seconds = ensure_file(rows, seed, data_dir, phones)
    bare = _measure("bare", generated.path, repeat, default_region, timeout)
    pipeline = _measure("pipeline", generated.path, repeat, default_region, timeout)
    from benchmarks.generate_employees import BAD_KIND_COLUMN

    expected_by_column: dict[str, int] = {}
    for kind, count in generated.rejected_by_kind.items():
        column = BAD_KIND_COLUMN[kind]
        expected_by_column[column] = expected_by_column.get(column, 0) + count

    both = bare["status"] == "ok" and pipeline["status"] == "ok"
    checks = {
        "time_ratio": _check(pipeline["seconds"] / bare["seconds"] if both else None, TIME_RATIO_TARGET),
        "rss_ratio": _check(
            pipeline["peak_rss_bytes"] / generated.bytes if pipeline["status"] == "ok" else None,
            RSS_RATIO_TARGET,
        ),
        "rejects": _check(
            pipeline.get("rejected_rows") if pipeline["status"] == "ok" else None,
            generated.expected_rejects,
            at_most=False,
        ),
        "warnings": _check(
            pipeline.get("warned_rows") if pipeline["status"] == "ok" else None,
            generated.expected_warnings,
            at_most=False,
        ),
    }
    return {
        "file": {
            **generated.to_json(),
            "mb": generated.bytes / MB,
            "generated_seconds": gen_seconds,
            "expected_rejects": generated.expected_rejects,
            "expected_warnings": generated.expected_warnings,
            "expected_rejects_by_column": expected_by_column,
        },
        "repeat": repeat,
        "default_region": default_region,
        "bare": bare,
        "pipeline": pipeline,
        "bare_rss_ratio": bare["peak_rss_bytes"] / generated.bytes if bare["status"] == "ok" else None,
        "checks": checks,
        "ok": both and all(c["result"] == "PASS" for c in checks.values()),
    }


def format_report(report: dict[str, Any]) -> str:
    """Human-readable table of :func:`run_benchmark`'s result."""
    f, bare, pipe, checks = report["file"], report["bare"], report["pipeline"], report["checks"]
    cache = "cached" if f["generated_seconds"] is None else f"generated in {f['generated_seconds']:.1f} s"
    lines = [
        f"file      {f['path']}",
        f"          {f['mb']:.1f} MB, {f['rows']:,} rows, phones {f['phones']}, "
        f"{f['expected_rejects']:,} rows to reject, {f['expected_warnings']:,} to warn about ({cache})",
        f"runs      median of {report['repeat']}, each in a fresh subprocess",
        "",
        f"{'measurement':<22}{'seconds':>10}{'peak RSS MB':>14}{'baseline RSS MB':>18}{'peak/file':>12}",
    ]
    for label, m in (("bare pyarrow read_csv", bare), ("pipeline validate_file", pipe)):
        if m["status"] == "ok":
            ratio = m["peak_rss_bytes"] / f["bytes"]
            lines.append(
                f"{label:<22}{m['seconds']:>10.3f}{m['peak_rss_mb']:>14.0f}"
                f"{m['baseline_rss_mb']:>18.0f}{ratio:>12.2f}"
            )
        else:
            lines.append(f"{label:<22}  {m['status'].upper()}: {m.get('reason', '')}")
    lines += ["", f"{'check':<36}{'value':>10}{'target':>10}  result"]
    rows = (
        ("pipeline time / bare time", checks["time_ratio"], "<= {:g}", "{:.2f}"),
        ("pipeline peak RSS / file size", checks["rss_ratio"], "<= {:g}", "{:.2f}"),
        ("rows rejected / expected", checks["rejects"], "{:,}", "{:,}"),
        ("rows with warnings / expected", checks["warnings"], "{:,}", "{:,}"),
    )
    for label, check, target_fmt, value_fmt in rows:
        value = "n/a" if check["value"] is None else value_fmt.format(check["value"])
        lines.append(f"{label:<36}{value:>10}{target_fmt.format(check['target']):>10}  {check['result']}")
    if pipe["status"] == "ok":
        lines.append("")
        lines.append(
            f"pipeline: {pipe['source_rows']:,} source rows, {pipe['valid_rows']:,} valid, "
            f"{pipe['rejected_rows']:,} rejected ({pipe['reject_records']:,} reject records), "
            f"{pipe['warned_rows']:,} with warnings"
        )
        expected = f["expected_rejects_by_column"]
        actual = pipe.get("rejects_by_column") or {}
        for column in sorted(set(expected) | set(actual)):
            got, want = actual.get(column, 0), expected.get(column, 0)
            lines.append(f"  rejects on {column!r:<16}{got:>10,}  expected {want:,}")
    lines.append("")
    lines.append("overall: " + ("PASS" if report["ok"] else "FAIL"))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; see the module docstring."""
    parser = argparse.ArgumentParser(description="Benchmark validate_file against bare pyarrow.csv.read_csv.")
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=3, help="fresh subprocesses per measurement (median)")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument(
        "--data-dir", type=Path, default=DEFAULT_DATA_DIR, help="where generated files are cached"
    )
    parser.add_argument("--default-region", default="US")
    parser.add_argument(
        "--phones",
        choices=("default", "national-mix"),
        default="default",
        help="phone formats of the generated file (national-mix: no E.164 at all, seven countries)",
    )
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per child process")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON instead of a table")
    parser.add_argument("--strict", action="store_true", help="exit 1 unless every check passes")
    parser.add_argument("--child", choices=("bare", "pipeline"), help=argparse.SUPPRESS)
    parser.add_argument("--path", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child:
        _run_child(args.child, args.path, args.default_region)
        return 0
    if args.rows < 1 or args.repeat < 1:
        parser.error("--rows and --repeat must be at least 1")
    report = run_benchmark(
        args.rows, args.repeat, args.seed, args.data_dir, args.default_region, args.timeout, args.phones
    )
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 1 if args.strict and not report["ok"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
