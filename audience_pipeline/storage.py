"""Where the pipeline keeps its files, and the IO manager that stores asset values there.

One setting chooses the place for everything runs share (staged files, asset values, reports,
snapshots, sync plans and the submit locks): a local folder, or ``s3://bucket/prefix`` on any
S3-compatible endpoint (``object_store.py``), so runs in separate containers find what the run
before them wrote. :func:`storage_location` resolves it; the environment wins over the feeds file.

Frames go to parquet (fast, typed, column-selective on load); small records such as a staged
file or a job handle go to JSON that a person can open. Paths are
``<root>/assets/<feed>/<asset>/<partition>.<ext>``; staging and reports live beside them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import dagster as dg
import pandas as pd
import pyarrow as pa
from pydantic import BaseModel

from audience_pipeline.feeds.model import FeedsFile, SecretRef
from audience_pipeline.object_store import (
    StorePath,
    metadata_value,
    read_parquet,
    storage_path,
    write_file,
    write_parquet,
)

HOME_ENV_VAR = "AUDIENCE_PIPELINE_HOME"
STORAGE_ENV_VAR = "AUDIENCE_PIPELINE_STORAGE"


def default_home() -> Path:
    """The local working folder: ``$AUDIENCE_PIPELINE_HOME``, else ``./.audience_pipeline``."""
    return Path(os.environ.get(HOME_ENV_VAR) or Path.cwd() / ".audience_pipeline")


def storage_location(feeds: FeedsFile | None = None, home: Path | None = None) -> str | dg.EnvVar:
    """The storage root: ``$AUDIENCE_PIPELINE_STORAGE``, else the feeds file's ``storage.url``,
    else the local folder ``home`` (default :func:`default_home`).

    The environment wins so one feeds file serves every deployment, each choosing its bucket; a
    ``${VAR}`` in the file reaches the resources as ``dg.EnvVar`` (resolved when a run starts).
    """
    if os.environ.get(STORAGE_ENV_VAR):
        return os.environ[STORAGE_ENV_VAR]
    configured = feeds.storage.url if feeds is not None and feeds.storage is not None else None
    if isinstance(configured, SecretRef):
        return dg.EnvVar(configured.env_var)
    if configured:
        return configured
    return str(home or default_home())


def storage_url(feeds: FeedsFile | None = None, home: Path | None = None) -> str:
    """:func:`storage_location` as a value now, for work outside a run (``plan``, ``sync``'s summary)."""
    location = storage_location(feeds, home)
    if isinstance(location, dg.EnvVar):
        value = location.get_value()
        if not value:
            raise ValueError(f"storage.url: environment variable {location.env_var_name} is not set")
        return value
    return location


def safe_name(partition_key: str) -> str:
    """One path component per key, distinct for distinct keys (``a/b`` and ``a_b`` must not share
    files): ``%``, ``/`` and ``\\`` are percent-encoded, and a key of only dots cannot name a parent."""
    name = partition_key.replace("%", "%25").replace("/", "%2F").replace("\\", "%5C")
    return name.replace(".", "%2E") if not name.strip(".") else name


def asset_value_path(root: StorePath, key: dg.AssetKey, partition: str | None, ext: str) -> StorePath:
    """Where :class:`AudienceIOManager` keeps one value: ``assets/<key…>/<partition>.<ext>``."""
    name = safe_name(partition) if partition is not None else "all"
    return root.joinpath("assets", *key.path, f"{name}.{ext}")


class PipelineStorage(dg.ConfigurableResource):
    """Root of staged source files, failure reports, snapshots, sync plans and locks.

    ``base_dir`` is a local folder or an ``s3://bucket/prefix`` URL; the paths returned are
    ``pathlib.Path`` or :class:`~audience_pipeline.object_store.ObjectPath` accordingly.
    """

    base_dir: str

    @property
    def root(self) -> StorePath:
        return storage_path(self.base_dir)

    def staging_dir(self, feed: str, partition_key: str) -> StorePath:
        return self.root / "staging" / feed / safe_name(partition_key)

    def report_dir(self, feed: str, partition_key: str) -> StorePath:
        return self.root / "reports" / feed / safe_name(partition_key)

    def lock_dir(self) -> StorePath:
        """Submit and snapshot locks (see ``locks.py``): a file lock locally, a lease on S3."""
        return self.root / "locks"

    def snapshot_path(self, feed: str) -> StorePath:
        """The feed's changed-rows snapshot: what its destination accepted (``snapshot.py``)."""
        return self.root / "snapshots" / f"{feed}.parquet"

    def sync_dir(self, feed: str, partition_key: str) -> StorePath:
        """Per import: the rows of the file, their hashes and which were sent (``sync_plan.py``)."""
        return self.root / "sync" / feed / safe_name(partition_key)


class AudienceIOManager(dg.ConfigurableIOManager):
    """Asset values under ``<base_dir>/assets``; ``base_dir`` as for :class:`PipelineStorage`."""

    base_dir: str

    def _path(self, context: dg.OutputContext | dg.InputContext, ext: str) -> StorePath:
        partition = context.asset_partition_key if context.has_asset_partitions else None
        return asset_value_path(storage_path(self.base_dir), context.asset_key, partition, ext)

    def handle_output(self, context: dg.OutputContext, obj: Any) -> None:
        if isinstance(obj, pd.DataFrame):
            path = self._path(context, "parquet")
            write_parquet(pa.Table.from_pandas(obj, preserve_index=False), path)
        elif isinstance(obj, BaseModel):
            path = self._path(context, "json")
            with write_file(path) as fh:
                fh.write(obj.model_dump_json(indent=2).encode("utf-8"))
        else:
            raise TypeError(f"AudienceIOManager stores DataFrames and pydantic models, not {type(obj)}")
        context.add_output_metadata({"path": metadata_value(path)})

    def load_input(self, context: dg.InputContext) -> Any:
        wanted = context.dagster_type.typing_type
        if isinstance(wanted, type) and issubclass(wanted, BaseModel):
            return wanted.model_validate(json.loads(self._path(context, "json").read_text("utf-8")))
        columns = (context.definition_metadata or {}).get("columns")
        return read_parquet(self._path(context, "parquet"), columns=columns).to_pandas()
