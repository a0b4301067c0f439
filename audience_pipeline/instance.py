"""The Dagster instance ``demo`` and ``sync`` run on: ``$DAGSTER_HOME``'s when set, else SQLite
under the working folder.

Two processes creating one SQLite schema at once fail ("table runs already exists"), so a SQLite
instance is opened under a file lock beside it. An instance on a database server (Postgres, as in
``deploy/dagster.yaml``) needs none, so a container's working folder and ``DAGSTER_HOME`` get
nothing from this pipeline: everything runs share is in the instance and the storage.
"""

from __future__ import annotations

import os
from pathlib import Path

import dagster as dg
import yaml

from audience_pipeline.locks import held

SERVER_STORAGES = frozenset({"postgres", "mysql"})


def on_server(dagster_home: Path) -> bool:
    """Whether ``dagster.yaml`` puts the instance on a database server (its ``storage:`` key)."""
    try:
        config = yaml.safe_load((dagster_home / "dagster.yaml").read_text("utf-8")) or {}
    except FileNotFoundError:
        return False
    storage = config.get("storage") if isinstance(config, dict) else None
    return isinstance(storage, dict) and bool(SERVER_STORAGES & set(storage))


def open_instance(home: Path) -> dg.DagsterInstance:
    dagster_home = os.environ.get("DAGSTER_HOME")
    if dagster_home and on_server(Path(dagster_home)):
        return dg.DagsterInstance.get()
    if dagster_home:
        with held(Path(dagster_home), ".audience_pipeline-instance", timeout=120):
            return dg.DagsterInstance.get()
    with held(home / "locks", "instance", timeout=120):
        (home / "dagster").mkdir(parents=True, exist_ok=True)
        return dg.DagsterInstance.local_temp(tempdir=str(home / "dagster"))
