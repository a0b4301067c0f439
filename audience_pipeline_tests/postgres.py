"""A throwaway PostgreSQL server for tests: Debian's server binaries (``apt-get install postgresql``),
a cluster made by ``initdb`` in a temporary folder, listening on 127.0.0.1 on a free port, stopped
and deleted at the end. No Docker, no system service.

``initdb`` and ``pg_ctl`` refuse to run as root, and CI runs as root: there the cluster belongs to
the ``postgres`` user that Debian's package creates (``runuser -u postgres``), in a folder under
``/tmp`` that user can reach. Clients connect over TCP with a password, as they would to a real
server.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

PG_BIN_GLOB = "/usr/lib/postgresql/*/bin"
PG_BIN_ENV = "AUDIENCE_PG_BIN"
"""Set to a folder holding ``initdb`` and ``pg_ctl`` to use that PostgreSQL build instead."""
DEPLOY_DAGSTER_YAML = Path(__file__).resolve().parent.parent / "deploy" / "dagster.yaml"
PG_ENV_VARS = (
    "DAGSTER_PG_HOST",
    "DAGSTER_PG_PORT",
    "DAGSTER_PG_USER",
    "DAGSTER_PG_PASSWORD",
    "DAGSTER_PG_DB",
)
SUPERUSER = "audience"
INSTALL_HINT = (
    "PostgreSQL's server binaries (initdb, pg_ctl) were not found under "
    f"{PG_BIN_GLOB} (or ${PG_BIN_ENV}): install them with `apt-get install -y postgresql` "
    "(.ci/run does), and the driver with `pip install -e '.[postgres]'`"
)


def find_bin_dir() -> Path | None:
    """The newest PostgreSQL bin folder holding ``initdb`` and ``pg_ctl``, or None."""
    if os.environ.get(PG_BIN_ENV):
        candidates = [os.environ[PG_BIN_ENV]]
    else:
        candidates = sorted(glob.glob(PG_BIN_GLOB), key=_major_version, reverse=True)
    for folder in map(Path, candidates):
        if (folder / "initdb").is_file() and (folder / "pg_ctl").is_file():
            return folder
    return None


def _major_version(path: str) -> int:
    name = Path(path).parent.name
    return int(name) if name.isdigit() else 0


def missing_requirement() -> str | None:
    """Why a cluster cannot start here (no server binaries, no psycopg2), or None."""
    if find_bin_dir() is None:
        return INSTALL_HINT
    try:
        import psycopg2  # noqa: F401
    except ImportError:
        return "psycopg2 is not installed: `pip install -e '.[postgres]'` (the dev extra includes it)"
    return None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class PostgresCluster:
    """A running cluster; :meth:`create_database` gives each test an empty database."""

    bin_dir: Path
    root: Path
    port: int
    password: str
    run_as: str | None
    host: str = "127.0.0.1"
    user: str = SUPERUSER
    _template: str | None = None

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def log_file(self) -> Path:
        return self.root / "server.log"

    # -- lifecycle -------------------------------------------------------------------------------

    @classmethod
    @contextlib.contextmanager
    def running(cls, bin_dir: Path) -> Iterator[PostgresCluster]:
        """Start a cluster in a fresh folder under the system temp dir; stop and delete it after."""
        run_as = _unprivileged_user() if os.geteuid() == 0 else None
        # Not under pytest's tmp_path: /tmp/pytest-of-root is 0700, out of the postgres user's reach.
        root = Path(tempfile.mkdtemp(prefix="audience-pg-"))
        cluster = cls(bin_dir, root, 0, secrets.token_urlsafe(18), run_as)
        try:
            cluster._init()
            cluster._start()
            cluster._set_password()
            yield cluster
        finally:
            cluster._stop()
            shutil.rmtree(root, ignore_errors=True)

    def _run(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        command = [*args]
        if self.run_as:
            command = ["runuser", "-u", self.run_as, "--", *command]
        result = subprocess.run(
            command, capture_output=True, text=True, timeout=timeout, cwd=self.root, stdin=subprocess.DEVNULL
        )
        if result.returncode != 0:
            log = self.log_file.read_text(errors="replace")[-3000:] if self.log_file.exists() else ""
            raise RuntimeError(
                f"{' '.join(args[:2])} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}\n{log}"
            )
        return result

    def _init(self) -> None:
        (self.root / "socket").mkdir()
        if self.run_as:
            entry = pwd.getpwnam(self.run_as)
            for path in (self.root, self.root / "socket"):
                os.chown(path, entry.pw_uid, entry.pw_gid)
        self._run(
            str(self.bin_dir / "initdb"),
            "--pgdata", str(self.data_dir),
            "--username", self.user,
            "--auth-local", "trust",
            "--auth-host", "md5",
            "--encoding", "UTF8",
            "--no-locale",
            "--no-sync",
        )  # fmt: skip

    def _set_password(self) -> None:
        """Clients over TCP need the password. md5 rather than scram-sha-256: Dagster opens a
        connection per query (no pool), and SCRAM's key stretching doubled the cost of each."""
        import psycopg2

        connection = psycopg2.connect(
            host=str(self.root / "socket"), port=self.port, user=self.user, dbname="postgres"
        )
        connection.autocommit = True
        try:
            with connection.cursor() as cursor:
                cursor.execute("SET password_encryption = 'md5'")
                cursor.execute(f'ALTER ROLE "{self.user}" PASSWORD %s', (self.password,))
        finally:
            connection.close()

    def _start(self) -> None:
        options = [
            "-c listen_addresses=127.0.0.1",
            f"-c unix_socket_directories={self.root / 'socket'}",
            "-c max_connections=300",
            # A throwaway cluster: durability buys nothing and costs seconds per test.
            "-c fsync=off",
            "-c synchronous_commit=off",
            "-c full_page_writes=off",
        ]
        for attempt in range(3):  # the free port may be taken before the server binds it
            self.port = free_port()
            try:
                self._run(
                    str(self.bin_dir / "pg_ctl"), "start", "--pgdata", str(self.data_dir),
                    "--log", str(self.log_file), "--wait", "--timeout", "60",
                    "-o", " ".join([f"-p {self.port}", *options]),
                )  # fmt: skip
                return
            except RuntimeError:
                if attempt == 2:
                    raise

    def _stop(self) -> None:
        if not (self.data_dir / "postmaster.pid").exists():
            return
        with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
            self._run(
                str(self.bin_dir / "pg_ctl"), "stop", "--pgdata", str(self.data_dir),
                "--mode", "immediate", "--wait", "--timeout", "30",
            )  # fmt: skip

    # -- databases -------------------------------------------------------------------------------

    def connect(self, database: str = "postgres") -> Any:
        import psycopg2

        connection = psycopg2.connect(
            host=self.host, port=self.port, user=self.user, password=self.password, dbname=database
        )
        connection.autocommit = True
        return connection

    def create_database(self, prefix: str = "test", *, template: str | None = None) -> str:
        """A new database: empty, or a copy of ``template`` (a file copy, much faster than
        letting Dagster create and stamp its tables again)."""
        import psycopg2.errors

        name = f"{prefix}_{secrets.token_hex(6)}"
        copy = f' TEMPLATE "{template}"' if template else ""
        connection = self.connect()
        try:
            for attempt in range(50):
                try:
                    with connection.cursor() as cursor:
                        cursor.execute(f'CREATE DATABASE "{name}"{copy}')
                    break
                except psycopg2.errors.ObjectInUse:  # a closed client's backend has not exited yet
                    if attempt == 49:
                        raise
                    time.sleep(0.1)
        finally:
            connection.close()
        return name

    def dagster_template(self) -> str:
        """A database holding Dagster's tables and nothing else, made once per cluster, to copy
        with ``create_database(template=...)``."""
        if self._template is None:
            import dagster as dg

            name = self.create_database("dagster_template")
            with tempfile.TemporaryDirectory() as home:
                storage = {"storage": {"postgres": {"postgres_url": self.url(name)}}}
                with dg.instance_for_test(temp_dir=home, overrides=storage):
                    pass  # creating the instance creates the tables; closing it closes every connection
            self._template = name
        return self._template

    def env(self, database: str) -> dict[str, str]:
        """The ``DAGSTER_PG_*`` variables that ``deploy/dagster.yaml`` reads, for ``database``."""
        values = (self.host, str(self.port), self.user, self.password, database)
        return dict(zip(PG_ENV_VARS, values, strict=True))

    def url(self, database: str) -> str:
        return f"postgresql+psycopg2://{self.user}:{self.password}@{self.host}:{self.port}/{database}"


def deploy_config() -> dict[str, Any]:
    """``deploy/dagster.yaml`` as a mapping (its ``{env: …}`` references unresolved)."""
    return yaml.safe_load(DEPLOY_DAGSTER_YAML.read_text("utf-8"))


def _unprivileged_user() -> str:
    for name in ("postgres", "nobody"):
        try:
            pwd.getpwnam(name)
        except KeyError:
            continue
        if shutil.which("runuser") is None:
            raise RuntimeError("running as root and `runuser` (util-linux) is missing: cannot run initdb")
        return name
    raise RuntimeError("running as root with no `postgres` or `nobody` user to own the test cluster")
