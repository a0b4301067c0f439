"""Where the pipeline keeps its files, and the IO manager that stores asset values there.

Frames go to parquet (fast, typed, column-selective on load); small records such as a staged
file or a job handle go to JSON that a person can open. Paths are
``<base>/assets/<feed>/<asset>/<partition>.<ext>``; staging and reports live beside them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import dagster as dg
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel

HOME_ENV_VAR = "AUDIENCE_PIPELINE_HOME"


def safe_name(partition_key: str) -> str:
    """One path component per key, distinct for distinct keys (``a/b`` and ``a_b`` must not share
    files): ``%``, ``/`` and ``\\`` are percent-encoded, and a key of only dots cannot name a parent."""
    name = partition_key.replace("%", "%25").replace("/", "%2F").replace("\\", "%5C")
    return name.replace(".", "%2E") if not name.strip(".") else name


class PipelineStorage(dg.ConfigurableResource):
    """Root folder for staged source files and failure reports."""

    base_dir: str

    def staging_dir(self, feed: str, partition_key: str) -> Path:
        return Path(self.base_dir) / "staging" / feed / safe_name(partition_key)

    def report_dir(self, feed: str, partition_key: str) -> Path:
        return Path(self.base_dir) / "reports" / feed / safe_name(partition_key)

    def lock_dir(self) -> Path:
        """Advisory locks (see ``locks.py``): a submit holds one per destination."""
        return Path(self.base_dir) / "locks"

    def snapshot_path(self, feed: str) -> Path:
        """The feed's changed-rows snapshot: what its destination accepted (``snapshot.py``)."""
        return Path(self.base_dir) / "snapshots" / f"{feed}.parquet"

    def sync_dir(self, feed: str, partition_key: str) -> Path:
        """Per import: the rows of the file, their hashes and which were sent (``sync_plan.py``)."""
        return Path(self.base_dir) / "sync" / feed / safe_name(partition_key)


class AudienceIOManager(dg.ConfigurableIOManager):
    base_dir: str

    def _path(self, context: dg.OutputContext | dg.InputContext, ext: str) -> Path:
        key = context.asset_key.path
        partition = safe_name(context.asset_partition_key) if context.has_asset_partitions else "all"
        return Path(self.base_dir, "assets", *key, f"{partition}.{ext}")

    def handle_output(self, context: dg.OutputContext, obj: Any) -> None:
        if isinstance(obj, pd.DataFrame):
            path = self._path(context, "parquet")
            path.parent.mkdir(parents=True, exist_ok=True)
            pq.write_table(pa.Table.from_pandas(obj, preserve_index=False), path)
        elif isinstance(obj, BaseModel):
            path = self._path(context, "json")
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(obj.model_dump_json(indent=2), encoding="utf-8")
        else:
            raise TypeError(f"AudienceIOManager stores DataFrames and pydantic models, not {type(obj)}")
        context.add_output_metadata({"path": dg.MetadataValue.path(str(path))})

    def load_input(self, context: dg.InputContext) -> Any:
        wanted = context.dagster_type.typing_type
        if isinstance(wanted, type) and issubclass(wanted, BaseModel):
            return wanted.model_validate(json.loads(self._path(context, "json").read_text("utf-8")))
        columns = (context.definition_metadata or {}).get("columns")
        return pq.read_table(self._path(context, "parquet"), columns=columns).to_pandas()
