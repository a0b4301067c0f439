"""Load and check a feeds file.

Where it is found: ``$AUDIENCE_PIPELINE_FEEDS`` if set, else the bundled demo feeds. A value that
is exactly ``${VAR}`` becomes a :class:`SecretRef` (resolved late, through ``dg.EnvVar``, and
never printed); ``${VAR}`` inside a longer string is interpolated at load time, which suits paths
like ``${HOME}/hr-drop`` but not secrets. Relative folder paths are relative to the feeds file.
Every problem is reported as ``FeedsFileError`` naming the file, the key and what was expected.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from audience_pipeline.feeds.model import FeedsFile, FolderSource, SecretRef
from audience_pipeline.redact import register_secret

FEEDS_ENV_VAR = "AUDIENCE_PIPELINE_FEEDS"
DEMO_FEEDS = Path(__file__).parent / "demo" / "feeds.yaml"

_WHOLE_REF = re.compile(r"^\$\{([A-Za-z_][A-Za-z0-9_]*)\}$")
_EMBEDDED_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


class FeedsFileError(ValueError):
    """A feeds file that cannot be used; the message is meant for the person who edits it."""


def feeds_path() -> Path:
    return Path(os.environ.get(FEEDS_ENV_VAR) or DEMO_FEEDS)


def load_feeds(path: Path | str | None = None) -> FeedsFile:
    path = Path(path) if path is not None else feeds_path()
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FeedsFileError(f"feeds file {path}: not found (set {FEEDS_ENV_VAR})") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise FeedsFileError(f"feeds file {path}: cannot be read: {exc}") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "unknown position"
        raise FeedsFileError(f"feeds file {path}: invalid YAML at {where}: {exc.problem}") from None
    if not isinstance(raw, dict):
        raise FeedsFileError(f"feeds file {path}: expected a mapping with keys sources, destinations, feeds")
    resolved = _resolve_refs(raw, path, ())
    try:
        feeds = FeedsFile.model_validate(resolved)
    except ValidationError as exc:
        raise FeedsFileError(_describe(path, exc)) from None
    _check_options(path, feeds)
    return _anchor_folders(feeds, path.parent)


def secret_refs(feeds: FeedsFile) -> list[SecretRef]:
    """Every ``${VAR}`` reference in the sources and destinations."""
    found: list[SecretRef] = []

    def walk(value: object) -> None:
        if isinstance(value, SecretRef):
            found.append(value)
        elif isinstance(value, BaseModel):
            for item in value.__dict__.values():
                walk(item)
        elif isinstance(value, dict):
            for item in value.values():
                walk(item)

    walk(feeds.sources)
    walk(feeds.destinations)
    return found


def register_feed_secrets(feeds: FeedsFile) -> None:
    """Teach the process-wide redactor the values behind every ``${VAR}``, before anything logs."""
    register_secret(*(os.environ.get(ref.env_var) for ref in secret_refs(feeds)))


def _resolve_refs(value: Any, path: Path, loc: tuple[str | int, ...]) -> Any:
    if isinstance(value, dict):
        return {k: _resolve_refs(v, path, (*loc, k)) for k, v in value.items()}
    if isinstance(value, list):
        return [_resolve_refs(v, path, (*loc, i)) for i, v in enumerate(value)]
    if not isinstance(value, str):
        return value
    whole = _WHOLE_REF.match(value)
    if whole:
        return {"env_var": whole.group(1)}

    def sub(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in os.environ:
            raise FeedsFileError(f"feeds file {path}: {_loc(loc)}: environment variable {name} is not set")
        return os.environ[name]

    return _EMBEDDED_REF.sub(sub, value)


def _loc(loc: tuple[str | int, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def _describe(path: Path, exc: ValidationError) -> str:
    lines = [f"feeds file {path}: {exc.error_count()} problem(s)"]
    for err in exc.errors():
        loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p[:1].isupper()))
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling)"
        elif err["type"] == "missing":
            msg = "required key is missing"
        lines.append(f"  {_loc(loc)}: {msg}")
    return "\n".join(lines)


def _check_options(path: Path, feeds: FeedsFile) -> None:
    from audience_pipeline.destinations.registry import options_model

    for i, feed in enumerate(feeds.feeds):
        model = options_model(feeds.destination_for(feed))
        try:
            model.model_validate(feed.options)
        except ValidationError as exc:
            problems = _describe(path, exc).splitlines()[1:]
            detail = "\n".join(f"  feeds[{i}].options.{p.strip()}" for p in problems)
            raise FeedsFileError(f"feeds file {path}: feed {feed.name!r} options:\n{detail}") from None


def _anchor_folders(feeds: FeedsFile, base: Path) -> FeedsFile:
    sources = {}
    for name, src in feeds.sources.items():
        if isinstance(src, FolderSource) and isinstance(src.path, str):
            src = src.model_copy(update={"path": str((base / src.path).resolve())})
        sources[name] = src
    return feeds.model_copy(update={"sources": sources})
