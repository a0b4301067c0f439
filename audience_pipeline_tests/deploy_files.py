"""The files under ``deploy/`` read the way Docker, compose and Helm read them, for tests that run
without any of those: the Dockerfile's entry command, the compose file, the Helm values, and a
check of those values against an excerpt of the chart's schema.

The entry command is parsed from the Dockerfile rather than repeated in a test, so a change to
the image's CMD is what the gRPC test runs.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
DOCKERFILE = DEPLOY / "Dockerfile"
COMPOSE_FILE = DEPLOY / "docker-compose.yaml"
COMPOSE_WORKSPACE = DEPLOY / "workspace.yaml"
COMPOSE_EXAMPLE_ENV = DEPLOY / "example.env"
HELM_VALUES = DEPLOY / "helm" / "values.yaml"
CHART_SCHEMA = Path(__file__).resolve().parent / "deploy_chart_schema.json"


def dockerfile_instructions(path: Path = DOCKERFILE) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined and comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in path.read_text("utf-8").splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        keyword, _, rest = line.partition(" ")
        instructions.append((keyword.upper(), rest.strip()))
    return instructions


def _command_words(arguments: str) -> list[str]:
    """Exec form (a JSON array) as is; shell form as ``/bin/sh -c``, which Docker would run."""
    if arguments.startswith("["):
        words = json.loads(arguments)
        assert isinstance(words, list) and all(isinstance(w, str) for w in words), arguments
        return words
    return ["/bin/sh", "-c", arguments]


def entry_command(path: Path = DOCKERFILE) -> list[str]:
    """What ``docker run <image>`` starts: the last ENTRYPOINT followed by the last CMD."""
    entrypoint: list[str] = []
    cmd: list[str] = []
    for keyword, arguments in dockerfile_instructions(path):
        if keyword == "ENTRYPOINT":
            entrypoint = _command_words(arguments)
        elif keyword == "CMD":
            cmd = _command_words(arguments)
    command = [*entrypoint, *cmd]
    assert command, f"{path} has neither ENTRYPOINT nor CMD"
    return command


def option_value(command: list[str], *names: str) -> str | None:
    """The value after the first of ``names`` (``--port 4000`` or ``--port=4000``), or None."""
    for index, word in enumerate(command):
        for name in names:
            if word == name and index + 1 < len(command):
                return command[index + 1]
            if word.startswith(name + "="):
                return word.split("=", 1)[1]
    return None


def with_option(command: list[str], names: tuple[str, ...], value: str) -> list[str]:
    """``command`` with the option's value replaced (it must be there: the test relies on it)."""
    result = list(command)
    for index, word in enumerate(result):
        if word in names and index + 1 < len(result):
            result[index + 1] = value
            return result
        if any(word.startswith(name + "=") for name in names):
            result[index] = f"{word.split('=', 1)[0]}={value}"
            return result
    raise AssertionError(f"none of {names} in {shlex.join(command)}")


HOST_OPTIONS = ("--host", "-h")
PORT_OPTIONS = ("--port", "-p")


def grpc_args(command: list[str]) -> list[str]:
    """The arguments after ``dagster api grpc``, without host and port (the Helm chart adds its own)."""
    assert command[:3] == ["dagster", "api", "grpc"], shlex.join(command)
    rest = command[3:]
    args: list[str] = []
    skip = False
    for word in rest:
        if skip:
            skip = False
            continue
        if word in HOST_OPTIONS + PORT_OPTIONS:
            skip = True
            continue
        if any(word.startswith(name + "=") for name in HOST_OPTIONS + PORT_OPTIONS):
            continue
        args.append(word)
    return args


def dockerfile_env(path: Path = DOCKERFILE) -> dict[str, str]:
    """The ``ENV`` settings (``KEY=value`` form) of the Dockerfile."""
    env: dict[str, str] = {}
    for keyword, arguments in dockerfile_instructions(path):
        if keyword == "ENV":
            for word in shlex.split(arguments):
                key, sep, value = word.partition("=")
                assert sep, f"ENV {arguments!r}: use the KEY=value form"
                env[key] = value
    return env


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text("utf-8"))


_COMPOSE_VAR = re.compile(r"(?<!\$)\$\{(\w+)(?:(:?[-?+])[^}]*)?\}")


def compose_variables(text: str) -> dict[str, str]:
    """Every ``${VAR}`` compose interpolates, with its modifier (``""``, ``:-``, ``:?``…);
    ``$${VAR}`` is escaped for the container's shell, and comments are not interpolated."""
    found: dict[str, str] = {}
    for line in text.splitlines():
        code = re.sub(r"(^|\s)#.*", "", line)
        for match in _COMPOSE_VAR.finditer(code):
            found.setdefault(match.group(1), match.group(2) or "")
    return found


def schema_errors(value: Any, schema: dict[str, Any], root: dict[str, Any], path: str = "") -> list[str]:
    """Where ``value`` breaks ``schema``: a small JSON-Schema subset (type, enum, properties,
    additionalProperties, required, items, anyOf, $ref), stricter in one way: where a schema
    lists ``properties``, a key it does not list is refused unless additionalProperties is a schema."""
    if "$ref" in schema:
        name = schema["$ref"].removeprefix("#/definitions/")
        return schema_errors(value, root["definitions"][name], root, path)
    if "anyOf" in schema:
        branches = [schema_errors(value, option, root, path) for option in schema["anyOf"]]
        if any(not errors for errors in branches):
            return []
        return [f"{path or '<root>'}: matches none of its forms ({'; '.join(branches[-1])})"]
    where = path or "<root>"
    if "enum" in schema and value not in schema["enum"]:
        return [f"{where}: {value!r} is not one of {schema['enum']}"]
    expected = schema.get("type")
    types = {"object": dict, "array": list, "string": str, "boolean": bool}
    if expected == "integer" and (not isinstance(value, int) or isinstance(value, bool)):
        return [f"{where}: {value!r} is not an integer"]
    if expected in types and not isinstance(value, types[expected]):
        return [f"{where}: {value!r} is not a{'n' if expected[0] in 'ao' else ''} {expected}"]
    errors: list[str] = []
    if isinstance(value, dict):
        properties = schema.get("properties")
        extra = schema.get("additionalProperties")
        for key in schema.get("required", []):
            if key not in value:
                errors.append(f"{where}: {key} is required")
        for key, item in value.items():
            child = f"{path}.{key}" if path else str(key)
            if properties is not None and key in properties:
                errors += schema_errors(item, properties[key], root, child)
            elif isinstance(extra, dict):
                errors += schema_errors(item, extra, root, child)
            elif properties is not None or extra is False:
                errors.append(f"{child}: not a key of the chart's schema")
    if isinstance(value, list) and "items" in schema:
        for index, item in enumerate(value):
            errors += schema_errors(item, schema["items"], root, f"{path}[{index}]")
    return errors


def chart_schema() -> dict[str, Any]:
    return json.loads(CHART_SCHEMA.read_text("utf-8"))
