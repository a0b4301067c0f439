"""A drop folder on a local or mounted file system (the simplest HR delivery).

A copy onto a share is not atomic, so by default a file is only read once its size and mtime
held across two sensor listings (or it was untouched for ``stable_after_seconds``). Imported
files can be moved to ``move_processed_to`` (relative to the drop folder); ``open`` still finds
them there, so re-processing a partition whose staged copy is gone keeps working.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import BinaryIO

import dagster as dg

from audience_pipeline.sources.base import SourceFile, check_name, select_files


class FolderSourceResource(dg.ConfigurableResource):
    path: str
    glob: str = "*.csv"
    ready_marker: str | None = None
    stable_after_seconds: float = 60.0
    move_processed_to: str | None = None

    def _processed_dir(self) -> Path | None:
        if not self.move_processed_to:
            return None
        return Path(self.path) / Path(self.move_processed_to).expanduser()

    def list_files(self) -> list[SourceFile]:
        root = Path(self.path)
        if not root.is_dir():
            raise FileNotFoundError(f"drop folder {root} does not exist")
        entries = []
        with os.scandir(root) as it:
            for entry in it:
                if entry.is_file():
                    st = entry.stat()
                    entries.append((entry.name, st.st_size, st.st_mtime_ns))
        return select_files(entries, self.glob, self.ready_marker)

    def open(self, name: str) -> BinaryIO:
        check_name(name, f"drop folder {self.path}")
        for folder in (Path(self.path), self._processed_dir()):
            if folder is not None and (folder / name).is_file():
                return (folder / name).open("rb")
        raise FileNotFoundError(f"{name!r} is not a file in drop folder {self.path}")

    def processed_action(self) -> str | None:
        folder = self._processed_dir()
        return f"move to {folder}" if folder else None

    def mark_processed(self, name: str) -> None:
        folder = self._processed_dir()
        source = Path(self.path) / check_name(name, f"drop folder {self.path}")
        if folder is None or not source.is_file():
            return
        folder.mkdir(parents=True, exist_ok=True)
        source.replace(folder / name)
        if self.ready_marker:
            for marker in (f"{name}{self.ready_marker}", f"{Path(name).stem}{self.ready_marker}"):
                if (Path(self.path) / marker).is_file():
                    (Path(self.path) / marker).replace(folder / marker)

    def describe(self) -> str:
        return f"folder {self.path} ({self.glob})"
