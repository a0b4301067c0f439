"""``deploy/`` offline: ``dagster.yaml`` against this Dagster's instance schema (``integration/
test_postgres.py`` runs the pipeline on it against a real PostgreSQL), and the Dockerfile, compose
file and Helm values parsed and checked against each other and the chart's schema (the image's
entry command is started in ``integration/test_grpc_code_location.py``)."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

import dagster as dg
import pytest
from dagster._core.instance.config import dagster_instance_config

from audience_pipeline.definitions import build_definitions
from audience_pipeline.feeds.loader import DEMO_FEEDS, FEEDS_ENV_VAR, load_feeds, secret_refs
from audience_pipeline_tests.deploy_files import (
    COMPOSE_EXAMPLE_ENV,
    COMPOSE_FILE,
    COMPOSE_WORKSPACE,
    DOCKERFILE,
    HELM_VALUES,
    HOST_OPTIONS,
    PORT_OPTIONS,
    chart_schema,
    compose_variables,
    dockerfile_env,
    dockerfile_instructions,
    entry_command,
    grpc_args,
    load_yaml,
    option_value,
    schema_errors,
)
from audience_pipeline_tests.postgres import DEPLOY_DAGSTER_YAML, PG_ENV_VARS, deploy_config

VENDOR_POOLS = {
    f"{vendor}_api"
    for vendor in ("communicate_xi", "adobe_experience_platform", "apsis_one", "yesmail", "altcraft")
}


def test_deploy_dagster_yaml_is_valid_for_this_dagster(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in PG_ENV_VARS:
        monkeypatch.setenv(name, "5432" if name.endswith("PORT") else "value")

    config, instance_class = dagster_instance_config(str(DEPLOY_DAGSTER_YAML.parent), "dagster.yaml")

    assert instance_class is None
    assert config["storage"]["postgres"]["postgres_db"]["scheme"] == "postgresql+psycopg2"
    expected = {"storage", "run_coordinator", "concurrency", "run_retries", "run_monitoring", "retention"}
    assert set(config) >= expected


def test_deploy_dagster_yaml_names_every_variable_it_reads() -> None:
    text = DEPLOY_DAGSTER_YAML.read_text("utf-8")
    read = set(re.findall(r"\{env: (\w+)\}", text))

    assert read == set(PG_ENV_VARS)
    assert all(text.count(name) >= 2 for name in read)  # read, and listed in the header comment


def test_the_pools_in_dagster_yaml_are_the_ones_the_vendor_steps_use(tmp_path: Path) -> None:
    defs = build_definitions(load_feeds(DEMO_FEEDS), tmp_path)
    pools = {a.op.pool for a in defs.assets or [] if isinstance(a, dg.AssetsDefinition) and a.op.pool}

    assert pools == VENDOR_POOLS  # the demo has one feed per vendor
    assert set(re.findall(r"\b\w+_api\b", DEPLOY_DAGSTER_YAML.read_text("utf-8"))) == VENDOR_POOLS


# -- deploy/Dockerfile, docker-compose.yaml, workspace.yaml, helm/values.yaml ------------------------
# Parsed, and checked against each other, without Docker or Helm. The image's entry command itself
# is started and used in integration/test_grpc_code_location.py.

PYPROJECT = tomllib.loads((DEPLOY_DAGSTER_YAML.parent.parent / "pyproject.toml").read_text("utf-8"))
STORAGE_ENV = {
    "AUDIENCE_PIPELINE_STORAGE",
    "AWS_ENDPOINT_URL_S3",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_REGION",
}
DAGSTER_SERVICES = ("code-location", "dagster-webserver", "dagster-daemon")
SECRET_WORDS = ("PASSWORD", "SECRET", "TOKEN", "API_KEY", "ACCESS_KEY")


def _compose() -> dict[str, Any]:
    return load_yaml(COMPOSE_FILE)


def _grpc_port() -> int:
    port = option_value(entry_command(), *PORT_OPTIONS)
    assert port is not None
    return int(port)


def _demo_secret_vars() -> set[str]:
    return {ref.env_var for ref in secret_refs(load_feeds(DEMO_FEEDS))}


def test_the_image_starts_a_grpc_server_for_the_packages_definitions() -> None:
    command = entry_command()

    assert command[:3] == ["dagster", "api", "grpc"]
    assert option_value(command, "-m", "--module-name") == PYPROJECT["tool"]["dagster"]["module_name"]
    assert option_value(command, *HOST_OPTIONS) == "0.0.0.0"  # reachable from the other containers
    exposed = [args for keyword, args in dockerfile_instructions() if keyword == "EXPOSE"]
    assert exposed == [str(_grpc_port())]


def test_the_image_is_python_311_slim_and_runs_as_an_unprivileged_user() -> None:
    instructions = dockerfile_instructions()
    (base,) = [args for keyword, args in instructions if keyword == "FROM"]
    users = [args for keyword, args in instructions if keyword == "USER"]

    assert base == "python:3.11-slim"
    assert users and users[-1].isdigit() and int(users[-1]) > 0  # numeric: runAsNonRoot can check it
    helm_user = load_yaml(HELM_VALUES)["dagster-user-deployments"]["deployments"][0]
    assert helm_user["podSecurityContext"]["runAsUser"] == int(users[-1])


def test_the_image_installs_extras_the_package_defines() -> None:
    args = dict(
        arg.split("=", 1) for keyword, arg in dockerfile_instructions() if keyword == "ARG" and "=" in arg
    )
    extras = args["EXTRAS"].split(",")

    assert "postgres" in extras
    assert set(extras) <= set(PYPROJECT["project"]["optional-dependencies"]), (
        f"the Dockerfile installs extras {extras}; pyproject.toml defines "
        f"{sorted(PYPROJECT['project']['optional-dependencies'])}"
    )
    assert "dagster-k8s==" + PYPROJECT_POSTGRES_PIN in DOCKERFILE.read_text("utf-8")  # the Helm build hint


PYPROJECT_POSTGRES_PIN = next(
    dep.split("==", 1)[1]
    for dep in PYPROJECT["project"]["optional-dependencies"]["postgres"]
    if dep.startswith("dagster-postgres==")
)


def test_compose_runs_the_image_as_code_location_webserver_and_daemon() -> None:
    services = _compose()["services"]

    assert set(services) == {"postgres", "minio", "minio-bucket", *DAGSTER_SERVICES}
    for name in DAGSTER_SERVICES:
        assert services[name]["build"] == {"context": "..", "dockerfile": "deploy/Dockerfile"}, name
        assert services[name]["image"] == services["code-location"]["image"], name
    assert "command" not in services["code-location"]  # the Dockerfile's CMD
    home = dockerfile_env()["DAGSTER_HOME"]
    for name in DAGSTER_SERVICES:
        assert f"./dagster.yaml:{home}/dagster.yaml:ro" in services[name]["volumes"], name
    for name in ("dagster-webserver", "dagster-daemon"):
        command = services[name]["command"]
        workspace = option_value(command, "-w", "--workspace")
        assert f"./workspace.yaml:{workspace}:ro" in services[name]["volumes"], name
        assert services[name]["depends_on"]["code-location"] == {"condition": "service_healthy"}


def test_the_compose_workspace_reaches_the_code_location_on_the_images_port() -> None:
    services = _compose()["services"]
    (entry,) = load_yaml(COMPOSE_WORKSPACE)["load_from"]
    grpc = entry["grpc_server"]
    health = services["code-location"]["healthcheck"]["test"]

    assert grpc["host"] == "code-location" and grpc["host"] in services
    assert grpc["port"] == _grpc_port()
    assert grpc["location_name"] == PYPROJECT["tool"]["dagster"]["code_location_name"]
    assert services["code-location"]["expose"] == [str(_grpc_port())]
    assert health[1:] == ["dagster", "api", "grpc-health-check", "-p", str(_grpc_port())]


def test_compose_gives_each_service_the_variables_it_reads_and_secrets_only_where_needed() -> None:
    services = _compose()["services"]
    env = {name: set(services[name].get("environment", {})) for name in services}

    for name in DAGSTER_SERVICES:
        assert env[name] >= set(PG_ENV_VARS), name  # deploy/dagster.yaml reads them everywhere
    # Sensors and runs execute in the code location: it alone gets the storage and vendor secrets.
    assert env["code-location"] >= STORAGE_ENV | _demo_secret_vars() | {FEEDS_ENV_VAR}
    for name in ("dagster-webserver", "dagster-daemon"):
        assert env[name] == set(PG_ENV_VARS), name
    assert env["minio-bucket"] >= STORAGE_ENV
    pg = services["postgres"]["environment"]
    assert pg["POSTGRES_PASSWORD"] == services["code-location"]["environment"]["DAGSTER_PG_PASSWORD"]
    assert services["code-location"]["environment"]["DAGSTER_PG_HOST"] == "postgres"


def test_compose_reads_secrets_from_the_environment_and_example_env_lists_every_variable() -> None:
    text = COMPOSE_FILE.read_text("utf-8")
    variables = compose_variables(text)
    example = {
        line.split("=", 1)[0]
        for line in COMPOSE_EXAMPLE_ENV.read_text("utf-8").splitlines()
        if line and not line.startswith("#")
    }

    assert set(variables) == example
    secrets = {name for name in variables if any(word in name for word in SECRET_WORDS)}
    assert secrets >= {"DAGSTER_PG_PASSWORD", "AWS_SECRET_ACCESS_KEY", "CXI_API_KEY"}
    assert all(variables[name] in ("", ":?") for name in secrets), variables  # no default secret
    assert "docker.sock" not in text  # default run launcher: no Docker socket in any container
    assert "run_launcher" not in deploy_config()


def test_the_helm_values_use_only_keys_of_the_charts_schema() -> None:
    values = load_yaml(HELM_VALUES)
    schema = chart_schema()

    assert schema_errors(values, schema, schema) == []
    # The check is not vacuous: a misspelt key anywhere is caught.
    values["dagsterDaemon"]["runRetries"]["maxRetry"] = 1
    values["dagster-user-deployments"]["deployments"][0]["envSecret"] = []
    assert schema_errors(values, schema, schema) == [
        "dagster-user-deployments.deployments[0].envSecret: not a key of the chart's schema",
        "dagsterDaemon.runRetries.maxRetry: not a key of the chart's schema",
    ]


def test_the_helm_user_deployment_runs_the_images_grpc_command_with_env_from_a_secret() -> None:
    (deployment,) = load_yaml(HELM_VALUES)["dagster-user-deployments"]["deployments"]
    feeds_path = deployment["env"][FEEDS_ENV_VAR]

    assert deployment["dagsterApiGrpcArgs"] == grpc_args(entry_command())
    assert deployment["port"] == _grpc_port()
    assert [secret["name"] for secret in deployment["envSecrets"]] == ["audience-pipeline-secrets"]
    assert deployment["includeConfigInLaunchedRuns"] == {"enabled": True}  # runs get the same env
    assert deployment["env"]["AUDIENCE_PIPELINE_STORAGE"].startswith("s3://")
    assert not set(deployment["env"]) & (_demo_secret_vars() | {"AWS_SECRET_ACCESS_KEY"})
    (mount,) = deployment["volumeMounts"]
    assert feeds_path == f"{mount['mountPath']}/feeds.yaml"


def test_the_helm_instance_settings_mirror_deploy_dagster_yaml() -> None:
    values = load_yaml(HELM_VALUES)
    instance = deploy_config()
    daemon = values["dagsterDaemon"]

    assert values["runLauncher"]["type"] == "K8sRunLauncher"
    assert (
        values["postgresql"]["postgresqlScheme"] == instance["storage"]["postgres"]["postgres_db"]["scheme"]
    )
    assert values["concurrency"]["enabled"] is True
    assert values["concurrency"]["pools"] == {
        "granularity": instance["concurrency"]["pools"]["granularity"],
        "defaultLimit": instance["concurrency"]["pools"]["default_limit"],
    }
    assert (
        values["concurrency"]["runs"]["maxConcurrentRuns"]
        == instance["concurrency"]["runs"]["max_concurrent_runs"]
    )
    queue = daemon["runCoordinator"]["config"]["queuedRunCoordinator"]
    assert not {"maxConcurrentRuns", "tagConcurrencyLimits"} & set(queue)  # the chart refuses both places
    assert (
        queue["dequeueIntervalSeconds"] == instance["run_coordinator"]["config"]["dequeue_interval_seconds"]
    )
    assert daemon["runRetries"] == {
        "enabled": instance["run_retries"]["enabled"],
        "maxRetries": instance["run_retries"]["max_retries"],
        "retryOnAssetOrOpFailure": instance["run_retries"]["retry_on_asset_or_op_failure"],
    }
    assert (
        daemon["runMonitoring"]["startTimeoutSeconds"] == instance["run_monitoring"]["start_timeout_seconds"]
    )
    for kind in ("sensor", "schedule"):
        ours = instance["retention"][kind]["purge_after_days"]
        theirs = values["retention"][kind]["purgeAfterDays"]
        assert {k: theirs[k] for k in ours} == ours, kind
    assert daemon["sensors"] == {"useThreads": True, "numWorkers": instance["sensors"]["num_workers"]}
