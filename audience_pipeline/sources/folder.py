"""A drop folder on a local or mounted file system (the simplest HR delivery)."""

from __future__ import annotations

from pathlib import Path
from typing import BinaryIO

import dagster as dg

from audience_pipeline.sources.base import SourceFile


class FolderSourceResource(dg.ConfigurableResource):
    path: str
    glob: str = "*.csv"

    def list_files(self) -> list[SourceFile]:
        root = Path(self.path)
        if not root.is_dir():
            raise FileNotFoundError(f"drop folder {root} does not exist")
        files = []
        for entry in sorted(root.glob(self.glob)):
            if entry.is_file() and not entry.name.startswith("."):
                st = entry.stat()
                files.append(SourceFile(entry.name, st.st_size, st.st_mtime_ns))
        return files

    def open(self, name: str) -> BinaryIO:
        path = Path(self.path) / name
        if path.parent != Path(self.path) or not path.is_file():
            raise FileNotFoundError(f"{name!r} is not a file in drop folder {self.path}")
        return path.open("rb")

    def describe(self) -> str:
        return f"folder {self.path} ({self.glob})"
