"""``audience-pipeline``: demo | sync | validate | plan | sandbox."""

from __future__ import annotations

import argparse
import dataclasses
import os
import secrets
import shlex
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from audience_pipeline.feeds.loader import FEEDS_ENV_VAR, FeedsFileError, load_feeds
from audience_pipeline.storage import HOME_ENV_VAR, STORAGE_ENV_VAR, storage_url

if TYPE_CHECKING:
    from audience_pipeline.sandbox.app import SandboxSettings

HOME_HELP = (
    f"working folder (default: ${HOME_ENV_VAR} or ./.audience_pipeline): the SQLite instance without "
    f"$DAGSTER_HOME, and the storage unless ${STORAGE_ENV_VAR} or the feeds file's storage names one"
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="audience-pipeline", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="run the bundled demo feeds against a local sandbox")
    demo.add_argument(
        "--home",
        type=Path,
        help=f"working folder, and the storage unless ${STORAGE_ENV_VAR} is set (default: a temp dir)",
    )
    demo.add_argument("--pace", type=float, default=0.3, help="sandbox seconds per import-job state")

    sync = sub.add_parser("sync", help="run your feeds once against their configured endpoints")
    sync.add_argument("--feeds", type=Path, help=f"feeds file (default: ${FEEDS_ENV_VAR})")
    sync.add_argument("--feed", action="append", help="only this feed (repeatable)")
    sync.add_argument("--home", type=Path, help=HOME_HELP)
    sync.add_argument("--timeout", type=float, default=3600.0, help="seconds to wait for imports to end")
    sync.add_argument("--poll-interval", type=float, default=10.0)

    validate = sub.add_parser("validate", help="check one HR file against a feed's mapping, offline")
    validate.add_argument("file", type=Path)
    validate.add_argument("--feeds", type=Path)
    validate.add_argument("--feed", required=True)
    validate.add_argument("--out", type=Path, help="write the rejected rows to this CSV")

    plan = sub.add_parser(
        "plan", help="dry run: what the next import of each feed would send; no vendor is called"
    )
    plan.add_argument("--feeds", type=Path, help=f"feeds file (default: ${FEEDS_ENV_VAR})")
    plan.add_argument("--feed", action="append", help="only this feed (repeatable)")
    plan.add_argument("--file", type=Path, help="this HR file instead of the newest in each feed's source")
    plan.add_argument("--home", type=Path, help=HOME_HELP)

    sandbox = sub.add_parser("sandbox", help="serve the vendor API emulator on 127.0.0.1")
    sandbox.add_argument("--port", type=int, default=8765)
    sandbox.add_argument("--pace", type=float, default=1.0)

    args = parser.parse_args(argv)
    try:
        commands = {"demo": _demo, "sync": _sync, "validate": _validate, "plan": _plan, "sandbox": _sandbox}
        return commands[args.command](args)
    except FeedsFileError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def _demo(args: argparse.Namespace) -> int:
    home = args.home or Path(tempfile.mkdtemp(prefix="audience-demo-"))
    return run_demo(home, pace=args.pace)


def run_demo(home: Path, *, pace: float = 0.3, settings: SandboxSettings | None = None) -> int:
    """The bundled feeds against a sandbox started here, with fresh random credentials unless
    ``settings`` (tests) fixes them."""
    from audience_pipeline.sandbox.app import SandboxSettings
    from audience_pipeline.sandbox.server import SandboxServer

    settings = settings or random_credentials(SandboxSettings(pace_seconds=pace))
    with SandboxServer(settings) as server:
        for name, vendor in server.app.vendors.items():
            os.environ.update(vendor.demo_env(server.vendor_url(name)))
        feeds = load_feeds()
        print(f"sandbox listening on {server.url}; working folder {home}; storage {storage_url(feeds, home)}")
        # The instance of $DAGSTER_HOME/dagster.yaml when it is set (Postgres, say), as for sync.
        return _run(feeds, home, feed_names=None, timeout=120.0, poll_interval=0.2)


SECRET_FIELD_SUFFIXES = ("_key", "_secret", "_token", "_client_id", "_api_user")


def random_credentials(settings: SandboxSettings) -> SandboxSettings:
    """Fresh random values for every sandbox credential, so no demo run shares a secret with another
    and a leak test can look for values that appear nowhere else."""
    fresh = {
        f.name: secrets.token_urlsafe(24)
        for f in dataclasses.fields(settings)
        if f.name.endswith(SECRET_FIELD_SUFFIXES)
    }
    return dataclasses.replace(settings, **fresh)


def _sync(args: argparse.Namespace) -> int:
    home = args.home or Path(os.environ.get(HOME_ENV_VAR) or Path.cwd() / ".audience_pipeline")
    return _run(
        load_feeds(args.feeds),
        home,
        feed_names=args.feed,
        timeout=args.timeout,
        poll_interval=args.poll_interval,
    )


def _run(feeds, home: Path, *, feed_names, timeout: float, poll_interval: float) -> int:
    """Only the selected feeds are built, so one feed's run needs only its own variables; a
    missing variable is one line per key, before anything starts."""
    from audience_pipeline.definitions import build_definitions
    from audience_pipeline.feeds.loader import check_environment, register_feed_secrets, select_feeds
    from audience_pipeline.instance import open_instance
    from audience_pipeline.redact import install_log_redaction
    from audience_pipeline.runner import NEEDS_A_PERSON_NOW, format_summaries, run_feeds

    feeds = select_feeds(feeds, feed_names)
    problems = check_environment(feeds)
    if problems:
        for line in problems:
            print(f"error: {line}", file=sys.stderr)
        return 2
    install_log_redaction()
    register_feed_secrets(feeds)
    defs = build_definitions(feeds, home)
    instance = open_instance(home)
    try:
        summaries = run_feeds(defs, feeds, instance, timeout=timeout, poll_interval=poll_interval)
    finally:
        instance.dispose()
    print()
    print(format_summaries(summaries) if summaries else "no new files, and nothing unfinished")
    return 1 if any(s.status in NEEDS_A_PERSON_NOW for s in summaries) else 0


def _validate(args: argparse.Namespace) -> int:
    from audience_pipeline.csv_reader import CsvFileError
    from audience_pipeline.normalize import MappingError
    from audience_pipeline.reports import REPORT_COLUMNS, write_report
    from audience_pipeline.validation import validate_for_feed

    feeds = load_feeds(args.feeds)
    feed = next((f for f in feeds.feeds if f.name == args.feed), None)
    if feed is None:
        print(f"error: no feed {args.feed!r}; known: {[f.name for f in feeds.feeds]}", file=sys.stderr)
        return 2
    try:
        result = validate_for_feed(args.file, feed)
    except (CsvFileError, MappingError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    rate, threshold = result.rejection_rate, feed.max_rejection_rate
    print(
        f"{args.file}: {result.source_rows} rows, {len(result.valid)} valid, {len(result.rejects)} rejected "
        f"({rate:.2%}; feed threshold {threshold:.2%})"
    )
    if result.header_line > 1:
        print(f"  header read from line {result.header_line}; the lines above it are skipped")
    for mapped, found in result.header_matches.items():
        print(f"  mapped header {mapped!r} matched {found!r} (case or spacing differs)")
    for row in result.rejects.head(50).itertuples(index=False):
        print(f"  line {row.source_line}: {row.reason}" + (f" [{row.value}]" if row.value else ""))
    if len(result.rejects) > 50:
        print(f"  … {len(result.rejects) - 50} more")
    if args.out:
        write_report(result.rejects.assign(stage="validation", outcome="rejected")[REPORT_COLUMNS], args.out)
        print(f"rejected rows written to {args.out}")
    # The same rule as the validate asset's blocking rejection-rate check (rate <= threshold passes).
    if rate > threshold:
        print(
            f"BLOCKED: {rate:.2%} of the rows would be rejected, over the feed's max_rejection_rate of "
            f"{threshold:.2%}; the pipeline would stop this file before sending anything to "
            f"{feed.destination}"
        )
        return 1
    print(f"OK: {rate:.2%} rejected is within the feed's max_rejection_rate of {threshold:.2%}")
    return 0


def _plan(args: argparse.Namespace) -> int:
    """Per feed: rows that would be added, changed, removed and rejected, and the checks; exit 1
    when a check would block a file. Reads the source and the snapshot; never calls a vendor."""
    from audience_pipeline.dry_run import format_plan, plan_feed
    from audience_pipeline.feeds.loader import register_feed_secrets, select_feeds
    from audience_pipeline.redact import install_log_redaction

    home = args.home or Path(os.environ.get(HOME_ENV_VAR) or Path.cwd() / ".audience_pipeline")
    feeds = select_feeds(load_feeds(args.feeds), args.feed)
    install_log_redaction()
    register_feed_secrets(feeds)
    blocked = False
    for feed in feeds.feeds:
        plan = plan_feed(feed, feeds, storage_url(feeds, home), args.file)
        print("\n".join(format_plan(plan)))
        blocked = blocked or plan.blocked
    print("dry run: nothing was sent to any destination")
    return 1 if blocked else 0


def _sandbox(args: argparse.Namespace) -> int:
    from audience_pipeline.sandbox.app import SandboxSettings, build_vendors
    from audience_pipeline.sandbox.server import serve_forever

    settings = SandboxSettings(pace_seconds=args.pace)
    base = f"http://127.0.0.1:{args.port}"
    print(f"sandbox on {base}; for `dagster dev` with the demo feeds, export (sandbox-only credentials):")
    for vendor in build_vendors(settings):
        for var, value in vendor.demo_env(base + vendor.prefix).items():
            print(f"export {var}={shlex.quote(value)}")
    serve_forever("127.0.0.1", args.port, settings)
    return 0


if __name__ == "__main__":
    sys.exit(main())
