"""Load and check a feeds file.

Where it is found: ``$AUDIENCE_PIPELINE_FEEDS`` if set, else the bundled demo feeds. A value that
is exactly ``${VAR}`` becomes a :class:`SecretRef` (resolved late, through ``dg.EnvVar``, and
never printed); ``${VAR}`` inside a longer string is interpolated at load time, which suits paths
like ``${HOME}/hr-drop`` but not secrets. Relative folder paths are relative to the feeds file.
Every problem is reported as ``FeedsFileError`` naming the file, the key and what was expected.

Loading needs no environment: whole ``${VAR}`` references are only resolved when a resource is
built. :func:`check_environment` reports, one line each, the variables the selected feeds need
that are not set (or, for endpoints, do not hold an http(s) URL) before anything runs.
"""

from __future__ import annotations

import difflib
import os
import re
import types
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Annotated, Any, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ValidationError

from audience_pipeline.feeds.model import (
    HTTP_URL_ERROR,
    SECRET_LITERAL_ERROR,
    FeedsFile,
    FolderSource,
    SecretRef,
    is_http_url,
    is_secret_field,
    is_url_field,
)
from audience_pipeline.redact import redact, register_secret

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


_YAML_BOOL = "tag:yaml.org,2002:bool"
_YAML_STR = "tag:yaml.org,2002:str"


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML keeps the last of two equal keys; a pasted-twice source or feed must be an error."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[str, int] = {}
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                continue
            if key_node.tag == _YAML_BOOL and key_node.style is None:
                # YAML 1.1 reads a bare ``on:``/``yes:``/``off:`` key as a boolean; every key in a
                # feeds file is a name (``alerts: {on: [...]}``), so keep it as written.
                key_node.tag = _YAML_STR
            if key_node.value in seen:
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    f"duplicate key {key_node.value!r} (first on line {seen[key_node.value] + 1})",
                    key_node.start_mark,
                )
            seen[key_node.value] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


_Loc = tuple[str | int, ...]


def _refs_in(
    value: object, loc: _Loc, owner: type[BaseModel] | None = None
) -> Iterator[tuple[_Loc, type[BaseModel] | None, SecretRef]]:
    """``(key path, model holding the key, reference)`` for every ``${VAR}`` under ``value``."""
    if isinstance(value, SecretRef):
        yield loc, owner, value
    elif isinstance(value, BaseModel):
        for name, item in value.__dict__.items():
            yield from _refs_in(item, (*loc, name), type(value))
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _refs_in(item, (*loc, key))


def _all_refs(feeds: FeedsFile) -> Iterator[tuple[_Loc, type[BaseModel] | None, SecretRef]]:
    yield from _refs_in(feeds.sources, ("sources",))
    yield from _refs_in(feeds.destinations, ("destinations",))
    if feeds.alerts is not None:
        yield from _refs_in(feeds.alerts, ("alerts",))
    if feeds.storage is not None:
        yield from _refs_in(feeds.storage, ("storage",))


def secret_refs(feeds: FeedsFile) -> list[SecretRef]:
    """Every ``${VAR}`` reference in the sources, destinations, alerts and storage."""
    return [ref for _, _, ref in _all_refs(feeds)]


def register_feed_secrets(feeds: FeedsFile) -> None:
    """Teach the process-wide redactor the values behind every ``${VAR}``, before anything logs.

    Plain endpoint URLs are left readable unless the key holds a secret (a webhook URL embeds
    its token).
    """
    values: list[str] = []
    for loc, owner, ref in _all_refs(feeds):
        value = os.environ.get(ref.env_var)
        secret = owner is not None and is_secret_field(owner, str(loc[-1]))
        if value and (secret or not _is_plain_url(value)):
            values.append(value)
    register_secret(*values)


def select_feeds(feeds: FeedsFile, feed_names: list[str] | None) -> FeedsFile:
    """The named feeds (all when ``feed_names`` is ``None`` or empty), in file order, with only the
    sources and destinations they use; the alerts block is kept.

    An unknown name is a :class:`FeedsFileError` listing the known feeds.
    """
    if isinstance(feed_names, str):
        feed_names = [feed_names]
    known = [feed.name for feed in feeds.feeds]
    wanted = set(feed_names or known)
    unknown = sorted(wanted - set(known))
    if unknown:
        raise FeedsFileError(
            f"unknown feed{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}; "
            f"known feeds: {', '.join(known) or '(none)'}"
        )
    chosen = [feed for feed in feeds.feeds if feed.name in wanted]
    used_sources = {feed.source for feed in chosen}
    used_destinations = {feed.destination for feed in chosen}
    return feeds.model_copy(
        update={
            "feeds": chosen,
            "sources": {k: v for k, v in feeds.sources.items() if k in used_sources},
            "destinations": {k: v for k, v in feeds.destinations.items() if k in used_destinations},
        }
    )


def check_environment(
    feeds: FeedsFile, feed_names: list[str] | None = None, environ: Mapping[str, str] = os.environ
) -> list[str]:
    """One line per ``${VAR}`` the selected feeds need that ``environ`` does not provide.

    Each feed's source and destination are checked, so a shared variable is reported once per
    feed that needs it (``feed all_staff_cxi: destinations.cxi.api_key needs environment
    variable CXI_API_KEY, which is not set``); the alerts block, shared by all feeds, is
    reported once without a feed. An empty value counts as not set; an endpoint's value must
    be an http(s) URL. Secret values are never shown. Unknown feed names raise
    :class:`FeedsFileError` (see :func:`select_feeds`).
    """
    selected = select_feeds(feeds, feed_names)
    lines: list[str] = []
    for feed in selected.feeds:
        refs = [
            *_refs_in(selected.sources[feed.source], ("sources", feed.source)),
            *_refs_in(selected.destinations[feed.destination], ("destinations", feed.destination)),
        ]
        lines.extend(f"feed {feed.name}: {line}" for line in _env_problems(refs, environ))
    if selected.alerts is not None:
        lines.extend(_env_problems(_refs_in(selected.alerts, ("alerts",)), environ))
    return lines


def _env_problems(
    refs: Iterable[tuple[_Loc, type[BaseModel] | None, SecretRef]], environ: Mapping[str, str]
) -> Iterator[str]:
    for loc, owner, ref in refs:
        key = _loc(loc)
        value = environ.get(ref.env_var, "")
        if not value.strip():
            yield f"{key} needs environment variable {ref.env_var}, which is not set"
            continue
        field = str(loc[-1])
        if owner is None or not is_url_field(owner, field) or is_http_url(value):
            continue
        if is_secret_field(owner, field):
            yield f"{key}: environment variable {ref.env_var} is not an http(s) URL (value not shown)"
        else:
            yield f"{key}: environment variable {ref.env_var} is {redact(repr(value))}, not an http(s) URL"


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
        elif err["type"] in (SECRET_LITERAL_ERROR, HTTP_URL_ERROR):
            msg = msg.replace("${VAR}", "${" + _suggest_env_var((*prefix, *loc)) + "}")
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


def _suggest_env_var(loc: _Loc) -> str:
    """``destinations.cxi.api_key`` -> ``CXI_API_KEY``; ``alerts.webhook_url`` -> ``ALERTS_WEBHOOK_URL``."""
    parts = [str(p) for p in loc if isinstance(p, str)]
    if len(parts) > 1 and parts[0] in ("sources", "destinations"):
        parts = parts[1:]
    name = re.sub(r"[^A-Z0-9_]+", "_", "_".join(parts).upper()).strip("_") or "SECRET"
    return f"_{name}" if name[0].isdigit() else name


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
    storage = feeds.storage
    if storage is not None and isinstance(storage.url, str) and "://" not in storage.url:
        storage = storage.model_copy(update={"url": str((base / Path(storage.url).expanduser()).resolve())})
    return feeds.model_copy(update={"sources": sources, "storage": storage})
