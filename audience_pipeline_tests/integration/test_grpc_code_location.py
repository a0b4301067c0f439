"""The code-location image's own entry command, run here without Docker: the CMD parsed from
``deploy/Dockerfile`` (only ``0.0.0.0`` and the port replaced, to 127.0.0.1 and a free port)
serves the feeds over gRPC; the compose file's workspace (``deploy/workspace.yaml``, host and port
replaced likewise) loads the code location through it; and ``dagster job launch`` starts an
ingest run with the instance's default run launcher, which hands the run to that gRPC server, as
the daemon does in ``deploy/docker-compose.yaml``. The run pushes the demo file to the sandbox and
must succeed. Twice: on a SQLite instance, where ``dagster job launch`` hands the run straight
to the server; and on ``deploy/dagster.yaml`` against a throwaway PostgreSQL, where the run waits
in the queue until a real ``dagster-daemon`` (with the same workspace) dequeues and launches it.

The server runs in an empty working directory with its own ``DAGSTER_HOME``, so it finds the
definitions and the feeds file only the way the image does: the installed package and
``AUDIENCE_PIPELINE_FEEDS``.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import dagster as dg
import pytest
import yaml
from dagster._core.remote_origin import GrpcServerCodeLocationOrigin
from dagster._core.run_coordinator import QueuedRunCoordinator
from dagster._grpc.client import DagsterGrpcClient

from audience_pipeline.feeds.loader import FEEDS_ENV_VAR
from audience_pipeline.sandbox import SandboxServer
from audience_pipeline.sources.base import hash_file, partition_key
from audience_pipeline.storage import HOME_ENV_VAR
from audience_pipeline_tests.deploy_files import (
    COMPOSE_WORKSPACE,
    HOST_OPTIONS,
    PORT_OPTIONS,
    entry_command,
    load_yaml,
    with_option,
)
from audience_pipeline_tests.integration.conftest import DEMO_CSV, DEMO_MAPPING, FEED
from audience_pipeline_tests.integration.dagster_ui import stop_process_tree
from audience_pipeline_tests.postgres import DEPLOY_DAGSTER_YAML, free_port

pytestmark = pytest.mark.integration

SERVER_START_SECONDS = 90.0
RUN_SECONDS = 600.0  # generous: a loaded 2-core CI machine starts a process per step
FEEDS_TEXT = f"""\
sources:
  hr_drop: {{type: folder, path: incoming, stable_after_seconds: 0}}
destinations:
  cxi:
    type: communicate_xi
    base_url: ${{CXI_BASE_URL}}
    api_key: ${{CXI_API_KEY}}
feeds:
  - name: {FEED}
    source: hr_drop
    destination: cxi
{DEMO_MAPPING}    options:
      import_name: All staff
"""
"""The demo's CXI feed alone: with the daemon, every feed's sensor would start its own runs."""
STORAGE_ENV_VAR = "AUDIENCE_PIPELINE_STORAGE"


@dataclass
class CodeServer:
    """The image's gRPC server, started from its Dockerfile CMD, and what it was started with."""

    command: list[str]
    port: int
    env: dict[str, str]
    root: Path
    process: subprocess.Popen[bytes]
    log: Path

    def log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-4000:] if self.log.exists() else ""

    def dagster(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """A ``dagster`` CLI command with the server's environment, from the same empty folder."""
        return subprocess.run(
            [_venv_script("dagster"), *args],
            env=self.env,
            cwd=self.root / "cwd",
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )


def _venv_script(name: str) -> str:
    """The image puts ``dagster`` on PATH; here it is the one beside this interpreter."""
    script = Path(sys.executable).parent / name
    return str(script) if script.exists() else shutil.which(name) or name


def _wait_until_serving(server: CodeServer) -> None:
    client = DagsterGrpcClient(port=server.port, host="127.0.0.1")
    deadline = time.monotonic() + SERVER_START_SECONDS
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            pytest.fail(f"the gRPC server exited with {server.process.returncode}:\n{server.log_tail()}")
        try:  # a plain connect first: gRPC logs every refused attempt
            socket.create_connection(("127.0.0.1", server.port), timeout=1).close()
            if client.health_check_query() == "SERVING":
                return
        except Exception:  # not listening yet
            pass
        time.sleep(0.25)
    pytest.fail(f"the gRPC server did not serve within {SERVER_START_SECONDS:.0f} s:\n{server.log_tail()}")


def _start(command: list[str], env: dict[str, str], cwd: Path, log: Path) -> subprocess.Popen[bytes]:
    """A process in its own session (so :func:`_stop` can end it and the runs it started)."""
    with open(log, "wb") as out:
        return subprocess.Popen(
            [_venv_script(command[0]), *command[1:]],
            env=env,
            cwd=cwd,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )


def _stop(process: subprocess.Popen[bytes]) -> None:
    """Stop the server (or daemon) and every process it started: a daemon that exits on SIGTERM
    can leave its code server behind, so the group and the descendants get SIGKILL too."""
    stop_process_tree(process, grace=15.0)


@pytest.fixture(params=["sqlite", "postgres"])
def instance_env(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> dict[str, str]:
    """``DAGSTER_HOME`` for the run: Dagster's default SQLite instance, or ``deploy/dagster.yaml``
    as shipped (queued runs, pools) with its ``DAGSTER_PG_*`` naming a new database."""
    home = tmp_path / "dagster_home"
    home.mkdir()
    env = {"DAGSTER_HOME": str(home)}
    if request.param == "postgres":
        database = request.getfixturevalue("postgres_database")
        env.update(request.getfixturevalue("postgres_server").env(database))
        for name, value in env.items():  # this process opens the instance too
            monkeypatch.setenv(name, value)
        shutil.copy(DEPLOY_DAGSTER_YAML, home / "dagster.yaml")
    return env


@pytest.fixture
def code_server(
    tmp_path: Path, sandbox_server: SandboxServer, instance_env: dict[str, str]
) -> Iterator[CodeServer]:
    sandbox_server.reset()
    for folder in ("cwd", "audience_home", "feeds/incoming"):
        (tmp_path / folder).mkdir(parents=True)
    feeds_file = tmp_path / "feeds" / "feeds.yaml"
    feeds_file.write_text(FEEDS_TEXT, "utf-8")

    env = {k: v for k, v in os.environ.items() if k != STORAGE_ENV_VAR}  # the local-folder default
    for name, vendor in sandbox_server.app.vendors.items():
        env.update(vendor.demo_env(sandbox_server.vendor_url(name)))
    env.update(
        {
            FEEDS_ENV_VAR: str(feeds_file),
            HOME_ENV_VAR: str(tmp_path / "audience_home"),
            **instance_env,
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
        }
    )

    port = free_port()
    command = with_option(with_option(entry_command(), HOST_OPTIONS, "127.0.0.1"), PORT_OPTIONS, str(port))
    log = tmp_path / "grpc-server.log"
    process = _start(command, env, tmp_path / "cwd", log)
    server = CodeServer(command, port, env, tmp_path, process, log)
    try:
        _wait_until_serving(server)
        yield server
    finally:
        _stop(process)


def _workspace_for(server: CodeServer) -> Path:
    """``deploy/workspace.yaml`` with the compose service's host and port swapped for the local ones."""
    workspace = load_yaml(COMPOSE_WORKSPACE)
    (entry,) = workspace["load_from"]
    entry["grpc_server"].update(host="127.0.0.1", port=server.port)
    path = server.root / "workspace.yaml"
    path.write_text(yaml.safe_dump(workspace), "utf-8")
    return path


def _wait_for_run(instance: dg.DagsterInstance, run_id: str, server: CodeServer) -> dg.DagsterRun:
    deadline = time.monotonic() + RUN_SECONDS
    while time.monotonic() < deadline:
        run = instance.get_run_by_id(run_id)
        if run is not None and run.is_finished:
            return run
        time.sleep(0.5)
    pytest.fail(f"run {run_id} did not finish within {RUN_SECONDS:.0f} s:\n{server.log_tail()}")


def _wait_for_requested_run(instance: dg.DagsterInstance, server: CodeServer) -> str:
    """The id of the ingest run the daemon's sensor starts for the one file (its key is the
    sensor's business)."""
    filters = dg.RunsFilter(job_name=f"{FEED}__ingest")
    deadline = time.monotonic() + RUN_SECONDS
    while time.monotonic() < deadline:
        runs = instance.get_runs(filters=filters, limit=1)
        if runs:
            return runs[0].run_id
        time.sleep(0.5)
    daemon_log = (server.root / "daemon.log").read_text(errors="replace")[-4000:]
    pytest.fail(f"no ingest run within {RUN_SECONDS:.0f} s:\n{daemon_log}\n{server.log_tail()}")


def test_the_images_entry_command_serves_the_code_location_and_runs_an_ingest(
    code_server: CodeServer,
) -> None:
    assert code_server.command[:3] == ["dagster", "api", "grpc"]
    shutil.copy(DEMO_CSV, code_server.root / "feeds" / "incoming" / DEMO_CSV.name)
    key = partition_key(DEMO_CSV.name, hash_file(DEMO_CSV))
    workspace = _workspace_for(code_server)

    with ExitStack() as stack:
        instance = stack.enter_context(dg.DagsterInstance.from_config(code_server.env["DAGSTER_HOME"]))
        if isinstance(instance.run_coordinator, QueuedRunCoordinator):
            # deploy/dagster.yaml: as in compose, the daemon evaluates the new-file sensor through
            # the gRPC server, queues the run it requests and launches it there.
            log = code_server.root / "daemon.log"
            command = ["dagster-daemon", "run", "-w", str(workspace)]
            stack.callback(_stop, _start(command, code_server.env, code_server.root / "cwd", log))
            run_id = _wait_for_requested_run(instance, code_server)
        else:
            # What the new-file sensor would do, then the CLI's launch on the default coordinator.
            instance.add_dynamic_partitions(f"{FEED}__files", [key])
            run_id = str(uuid.uuid4())
            launched = code_server.dagster(
                "job", "launch", "-w", str(workspace), "-j", f"{FEED}__ingest",
                "--tags", json.dumps({"dagster/partition": key}), "--run-id", run_id,
            )  # fmt: skip
            assert launched.returncode == 0, f"{launched.stdout}\n{launched.stderr}\n{code_server.log_tail()}"

        run = _wait_for_run(instance, run_id, code_server)
        failures = [
            record.event_log_entry.message
            for record in instance.get_records_for_run(
                run_id, of_type=dg.DagsterEventType.STEP_FAILURE
            ).records
        ]
        assert run.status == dg.DagsterRunStatus.SUCCESS, (
            f"{run.status}: {failures}\n{code_server.log_tail()}"
        )

        # Loaded through the gRPC server on our port, not in process.
        assert run.remote_job_origin is not None
        origin = run.remote_job_origin.repository_origin.code_location_origin
        assert isinstance(origin, GrpcServerCodeLocationOrigin)
        assert (origin.host, origin.port, origin.location_name) == (
            "127.0.0.1",
            code_server.port,
            "audience_pipeline",
        )

        partition = run.tags["dagster/partition"]
        assert partition.startswith(DEMO_CSV.name)
        imported = instance.get_latest_materialization_event(dg.AssetKey([FEED, "import_job"]))
        assert imported is not None and imported.run_id == run_id
        assert imported.asset_materialization is not None
        assert imported.asset_materialization.partition == partition
