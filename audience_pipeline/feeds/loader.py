"""Load and check a feeds file.

Where it is found: ``$AUDIENCE_PIPELINE_FEEDS`` if set, else the bundled demo feeds. A value that
is exactly ``${VAR}`` becomes a :class:`SecretRef` (resolved late, through ``dg.EnvVar``, and
never printed); ``${VAR}`` inside a longer string is interpolated at load time, which suits paths
like ``${HOME}/hr-drop`` but not secrets. Relative folder paths are relative to the feeds file.
Every problem is reported as ``FeedsFileError`` naming the file, the key and what was expected.
"""

from __future__ import annotations

import difflib
import os
import re
import types
from collections.abc import Iterable
from pathlib import Path
from typing import Annotated, Any, Union, get_args, get_origin

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
    """``$AUDIENCE_PIPELINE_FEEDS`` so a deployment brings its own file; else the bundled demo."""
    return Path(os.environ.get(FEEDS_ENV_VAR) or DEMO_FEEDS)


def load_feeds(path: Path | str | None = None) -> FeedsFile:
    """Read, validate and anchor a feeds file; any problem is a :class:`FeedsFileError`."""
    path = Path(path) if path is not None else feeds_path()
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FeedsFileError(f"feeds file {path}: not found (set {FEEDS_ENV_VAR})") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise FeedsFileError(f"feeds file {path}: cannot be read: {exc}") from None
    try:
        raw = yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "unknown position"
        context = exc.context_mark
        started = (
            f" ({exc.context} at line {context.line + 1}, column {context.column + 1})"
            if exc.context and context
            else ""
        )
        raise FeedsFileError(f"feeds file {path}: invalid YAML at {where}: {exc.problem}{started}") from None
    except yaml.YAMLError as exc:
        raise FeedsFileError(f"feeds file {path}: invalid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise FeedsFileError(f"feeds file {path}: expected a mapping with keys sources, destinations, feeds")
    resolved = _resolve_refs(raw, path, ())
    try:
        feeds = FeedsFile.model_validate(resolved)
    except ValidationError as exc:
        raise FeedsFileError(_report(path, _error_lines(exc, resolved, FeedsFile))) from None
    feeds = _check_options(path, feeds)
    return _anchor_folders(feeds, path.parent)


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML keeps the last of two equal keys; a pasted-twice source or feed must be an error."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[str, int] = {}
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                continue
            if key_node.value in seen:
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    f"duplicate key {key_node.value!r} (first on line {seen[key_node.value] + 1})",
                    key_node.start_mark,
                )
            seen[key_node.value] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


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
    values = (os.environ.get(ref.env_var) for ref in secret_refs(feeds))
    register_secret(*(v for v in values if v and not _is_plain_url(v)))


def _is_plain_url(value: str) -> bool:
    """Endpoints help whoever reads the logs; their credentials (userinfo, signed query) are
    masked by ``redact_url`` wherever a URL is printed, so the rest need not be a secret."""
    return value.startswith(("http://", "https://")) and "@" not in value.split("/", 3)[2]


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


def _loc(loc: Iterable[str | int]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def _report(path: Path, lines: list[str]) -> str:
    return "\n".join([f"feeds file {path}: {len(lines)} problem(s)", *(f"  {line}" for line in lines)])


def _error_lines(
    exc: ValidationError, raw: Any, model: type[BaseModel], prefix: tuple[str | int, ...] = ()
) -> list[str]:
    """One ``key.path: what was expected`` line per problem, with paths as the file spells them."""
    lines: list[str] = []
    seen: set[tuple[str | int, ...]] = set()
    for err in exc.errors():
        loc = _key_path(raw, err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        ctx = err.get("ctx") or {}
        if err["type"] == "value_error" and not loc:
            # Cross-reference checks put the key path in the message, one problem per line.
            lines.extend(msg.splitlines())
            continue
        if err["type"] == "extra_forbidden":
            msg = _unknown_key_message(model, raw, loc)
        elif err["type"] == "missing":
            msg = "required key is missing"
        elif err["type"] in ("union_tag_not_found", "union_tag_invalid"):
            loc = (*loc, str(ctx.get("discriminator", "type")).strip("'"))
            msg = (
                f"unknown type {ctx['tag']!r}; expected one of {ctx.get('expected_tags')}"
                if "tag" in ctx
                else "required key is missing"
            )
        elif err["type"] == "literal_error" and isinstance(err.get("input"), str | int | float | bool):
            msg = f"{msg} (got {err['input']!r})"
        loc = (*prefix, *loc)
        if loc in seen:
            continue  # a value of the wrong shape fails once per union member; the first is clearest
        seen.add(loc)
        lines.append(f"{_loc(loc)}: {msg}")
    return lines


def _key_path(raw: Any, loc: tuple[str | int, ...]) -> tuple[str | int, ...]:
    """Drop the labels pydantic adds for unions (discriminator tags, ``str``, class names).

    Keys present in the file are always kept, so a user's ``HR`` source or ``Dept`` attribute
    survives; a part missing from the file is kept unless it is one of those labels.
    """
    out: list[str | int] = []
    node: Any = raw
    for part in loc:
        if isinstance(node, dict) and part in node:
            out.append(part)
            node = node[part]
            continue
        if isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node):
            out.append(part)
            node = node[part]
            continue
        is_label = (
            (isinstance(node, dict) and node.get("type") == part)
            or part in ("str", "int", "float", "bool")
            or (isinstance(part, str) and part[:1].isupper())
        )
        if not is_label:
            out.append(part)
            node = None
    return tuple(out)


def _unknown_key_message(model: type[BaseModel], raw: Any, loc: tuple[str | int, ...]) -> str:
    allowed = _allowed_keys(model, raw, loc[:-1])
    if not allowed:
        return "unknown key (check the spelling)"
    key = str(loc[-1]) if loc else ""
    close = difflib.get_close_matches(key, allowed, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return f"unknown key (check the spelling); {hint}expected one of: {', '.join(sorted(allowed))}"


def _allowed_keys(model: type[BaseModel], raw: Any, loc: tuple[str | int, ...]) -> list[str]:
    """The keys the model accepts at ``loc``, found by walking the annotations beside the data."""
    tp: Any = model
    node: Any = raw
    for part in loc:
        tp = _pick_model(tp, node)
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            field = tp.model_fields.get(str(part))
            if field is None:
                return []
            tp = field.annotation
        elif get_origin(tp) in (dict, list):
            tp = get_args(tp)[-1]
        else:
            return []
        node = node[part] if isinstance(node, dict | list) and _has(node, part) else None
    tp = _pick_model(tp, node)
    return list(tp.model_fields) if isinstance(tp, type) and issubclass(tp, BaseModel) else []


def _has(node: dict | list, part: str | int) -> bool:
    return part in node if isinstance(node, dict) else isinstance(part, int) and 0 <= part < len(node)


def _pick_model(tp: Any, node: Any) -> Any:
    """Unwrap ``Annotated`` and unions to the model that applies to ``node`` (by its ``type``)."""
    while get_origin(tp) is Annotated:
        tp = get_args(tp)[0]
    if get_origin(tp) in (Union, types.UnionType):
        models = [a for a in get_args(tp) if isinstance(a, type) and issubclass(a, BaseModel)]
        if len(models) == 1:
            return models[0]
        tag = node.get("type") if isinstance(node, dict) else None
        matching = [
            m
            for m in models
            if "type" in m.model_fields and tag in get_args(m.model_fields["type"].annotation)
        ]
        return matching[0] if len(matching) == 1 else tp
    return tp


def _check_options(path: Path, feeds: FeedsFile) -> FeedsFile:
    """Each feed's ``options`` against its destination's model, and against the feed's columns.

    Option fields such as CXI's ``email_field`` name canonical output columns; one that names a
    column the mapping does not produce would only fail at the vendor, after validation ran.
    An options model with ``complete_for_feed(mapping)`` returns the options the feed runs with
    (e.g. Experience Platform takes its field types from the mapping).
    """
    from audience_pipeline.destinations.registry import options_model

    lines: list[str] = []
    completed: dict[int, dict] = {}
    for i, feed in enumerate(feeds.feeds):
        model = options_model(feeds.destination_for(feed))
        prefix: tuple[str | int, ...] = ("feeds", i, "options")
        try:
            options = model.model_validate(feed.options)
        except ValidationError as exc:
            lines.extend(_error_lines(exc, feed.options, model, prefix))
            continue
        check_columns = getattr(options, "column_problems", None)
        if check_columns is not None:
            for key, problem in check_columns(feed.mapping.output_columns()):
                lines.append(f"{_loc((*prefix, key) if key else prefix)}: {problem}")
        complete = getattr(options, "complete_for_feed", None)
        if complete is not None:
            completed[i] = complete(feed.mapping)
    if lines:
        raise FeedsFileError(_report(path, lines))
    updated = [
        f.model_copy(update={"options": completed[i]}) if i in completed else f
        for i, f in enumerate(feeds.feeds)
    ]
    return feeds.model_copy(update={"feeds": updated}) if completed else feeds


def _anchor_folders(feeds: FeedsFile, base: Path) -> FeedsFile:
    sources = {}
    for name, src in feeds.sources.items():
        if isinstance(src, FolderSource) and isinstance(src.path, str):
            src = src.model_copy(update={"path": str((base / Path(src.path).expanduser()).resolve())})
        sources[name] = src
    return feeds.model_copy(update={"sources": sources})
