"""The deployment artefacts agree with the code (no Docker engine runs here, so they are checked
statically): docker-compose.yml, every Dockerfile under deploy/, Prometheus and Grafana
provisioning and the Kubernetes manifests start real entry points of this project, set only
`SPINDLE_*` variables that the settings dataclasses read (with values they accept), publish the
ports those settings name, and probe routes the gateway really serves.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import re
import shlex
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from common.cli import build_parser
from common.settings import env_name, load_settings
from gateway.app import create_app
from gateway.settings import GatewaySettings
from worker.settings import WorkerSettings

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
# Read outside the settings dataclasses: where `spindle model demo` puts the demo model.
OTHER_KNOWN_ENV = {"SPINDLE_DEMO_MODEL"}
WORKER_SERVICES = ("worker", "worker-cpu")
_HEALTH_URL = re.compile(r"http://127\.0\.0\.1:%s(/[^'\"]*)' % os\.environ(?:\.get)?\[?\(?'(\w+)'")


# --- helpers ------------------------------------------------------------------------------


def settings_env(cls: type) -> set[str]:
    return {env_name(field.name) for field in dataclasses.fields(cls)}


def gateway_routes() -> set[str]:
    return set(create_app(GatewaySettings()).openapi()["paths"])


def is_entry_point(argv: list[str]) -> bool:
    """`python -m PACKAGE` with a __main__, or a pyproject script with a real subcommand."""
    if argv[:2] == ["python", "-m"]:
        return importlib.util.find_spec(f"{argv[2]}.__main__") is not None
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    if argv[0] not in scripts:
        return False
    commands: dict[str, Any] = build_parser()._subparsers._group_actions[0].choices  # type: ignore[union-attr,assignment]
    return len(argv) > 1 and argv[1] in commands


@dataclasses.dataclass
class Dockerfile:
    path: Path
    instructions: list[tuple[str, str]]  # (INSTRUCTION, arguments), continuation lines joined

    @classmethod
    def parse(cls, path: Path) -> Dockerfile:
        text = re.sub(r"\\\n", " ", path.read_text())
        lines = [line.strip() for line in text.splitlines()]
        pairs = [line.split(None, 1) for line in lines if line and not line.startswith("#")]
        return cls(path, [(pair[0].upper(), pair[1] if len(pair) > 1 else "") for pair in pairs])

    def args(self, instruction: str) -> list[str]:
        return [args for name, args in self.instructions if name == instruction]

    def final_stage(self) -> list[tuple[str, str]]:
        starts = [i for i, (name, _) in enumerate(self.instructions) if name == "FROM"]
        return self.instructions[starts[-1] :]

    def env(self) -> dict[str, str]:
        pairs = [shlex.split(args) for name, args in self.final_stage() if name == "ENV"]
        return dict(pair.split("=", 1) for words in pairs for pair in words)

    def command(self) -> list[str]:
        return json.loads(self.args("CMD")[-1])

    def healthcheck(self) -> tuple[str, str]:
        """(path, name of the port variable) the HEALTHCHECK fetches."""
        match = _HEALTH_URL.search(self.args("HEALTHCHECK")[-1])
        assert match, f"{self.path.name}: HEALTHCHECK must fetch http://127.0.0.1:<port>/<path>"
        return match.group(1), match.group(2)


DOCKERFILES = {path.name: Dockerfile.parse(path) for path in sorted(DEPLOY.glob("*.Dockerfile"))}


def dockerfile_of(service: str) -> Dockerfile:
    return DOCKERFILES[Path(COMPOSE["services"][service]["build"]["dockerfile"]).name]


def service_env(service: str) -> dict[str, str]:
    """What the container sees: the image's ENV overridden by the compose environment."""
    environment = {k: str(v) for k, v in COMPOSE["services"][service]["environment"].items()}
    return {**dockerfile_of(service).env(), **environment}


def settings_class(argv: list[str]) -> type:
    return {"gateway": GatewaySettings, "worker": WorkerSettings}[argv[2]]


def spindle_env(env: dict[str, str]) -> dict[str, str]:
    return {key: value for key, value in env.items() if key.startswith("SPINDLE_")}


def assert_settings_accept(cls: type, env: dict[str, str], where: str) -> Any:
    unknown = set(spindle_env(env)) - settings_env(cls) - OTHER_KNOWN_ENV
    assert not unknown, f"{where}: no setting reads {sorted(unknown)}"
    known = {key: value for key, value in env.items() if key in settings_env(cls)}
    return load_settings(cls, [], environ=known)  # exits (SystemExit) on a value it refuses


# --- docker-compose.yml and the Dockerfiles -------------------------------------------------


def test_compose_has_the_services_operators_expect() -> None:
    services = COMPOSE["services"]
    assert {"redis", "gateway", "worker", "worker-cpu", "prometheus", "grafana"} <= set(services)
    assert services["worker-cpu"]["profiles"] == ["cpu"]
    assert "profiles" not in services["worker"]  # `docker compose up` starts the GPU worker
    assert "--appendonly" in services["redis"]["command"]
    appendonly = services["redis"]["command"].index("--appendonly")
    assert services["redis"]["command"][appendonly + 1] == "yes"


@pytest.mark.parametrize("service", WORKER_SERVICES)
def test_workers_can_be_scaled(service: str) -> None:
    """`--scale worker=3` fails with a fixed container name or a published host port."""
    definition = COMPOSE["services"][service]
    assert "container_name" not in definition and "ports" not in definition


def test_gpu_worker_reserves_a_gpu() -> None:
    devices = COMPOSE["services"]["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]


@pytest.mark.parametrize("service", ["gateway", *WORKER_SERVICES])
def test_compose_commands_are_entry_points_with_valid_settings(service: str) -> None:
    command = COMPOSE["services"][service]["command"]
    assert is_entry_point(command), command
    assert command == dockerfile_of(service).command()
    assert_settings_accept(settings_class(command), service_env(service), service)


def test_gateway_port_matches_its_settings() -> None:
    settings = assert_settings_accept(GatewaySettings, service_env("gateway"), "gateway")
    published = [str(port).split(":")[-1] for port in COMPOSE["services"]["gateway"]["ports"]]
    assert published == [str(settings.port)]
    assert dockerfile_of("gateway").args("EXPOSE") == [str(settings.port)]


@pytest.mark.parametrize("service", WORKER_SERVICES)
def test_worker_metrics_port_is_the_one_prometheus_scrapes(service: str) -> None:
    settings = assert_settings_accept(WorkerSettings, service_env(service), service)
    assert settings.metrics_port is not None
    assert dockerfile_of(service).args("EXPOSE") == [str(settings.metrics_port)]
    prometheus = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    [job] = [job for job in prometheus["scrape_configs"] if job["job_name"] == "spindle-worker"]
    [discovery] = job["dns_sd_configs"]
    assert service in discovery["names"] and discovery["port"] == settings.metrics_port


def test_prometheus_scrapes_the_gateway_metrics_route() -> None:
    prometheus = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    [job] = [job for job in prometheus["scrape_configs"] if job["job_name"] == "spindle-gateway"]
    assert job["metrics_path"] in gateway_routes()
    gateway = assert_settings_accept(GatewaySettings, service_env("gateway"), "gateway")
    assert job["dns_sd_configs"][0]["port"] == gateway.port


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_dockerfiles_are_pinned_non_root_and_healthchecked(name: str) -> None:
    dockerfile = DOCKERFILES[name]
    for image in dockerfile.args("FROM"):
        assert ":" in image.split()[0] and ":latest" not in image, image
    users = dockerfile.args("USER")
    assert users and users[-1] not in ("root", "0"), "the last USER must not be root"
    installs = [args for args in dockerfile.args("RUN") if "pip install" in args]
    for command in installs:
        for part in command.split("&&"):
            words = shlex.split(part)[2:] if "pip install" in part else []
            specs = [w for w in words if not w.startswith("-") and w not in (".", "install")]
            specs = [w for w in specs if not w.startswith(("http", "$", '"$'))]
            unpinned = [spec for spec in specs if "==" not in spec and spec != "wheel"]
            assert not unpinned, f"{name}: unpinned {unpinned}"
    assert dockerfile.args("HEALTHCHECK"), f"{name} has no HEALTHCHECK"


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_healthchecks_fetch_real_routes_on_the_configured_port(name: str) -> None:
    dockerfile = DOCKERFILES[name]
    path, port_variable = dockerfile.healthcheck()
    command = dockerfile.command()
    assert is_entry_point(command), command
    if command[2] == "gateway":
        assert (path, port_variable) == ("/health", env_name("port"))
        assert path in gateway_routes()
    else:
        assert (path, port_variable) == ("/metrics", env_name("metrics_port"))
        assert port_variable in dockerfile.env()


def test_gateway_image_installs_no_torch() -> None:
    runs = " ".join(DOCKERFILES["gateway.Dockerfile"].args("RUN"))
    assert "torch" not in runs and "pip install --no-deps ." in runs


def test_grafana_provisioning_points_at_the_dashboard() -> None:
    provider = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/spindle.yml").read_text())
    mounts = COMPOSE["services"]["grafana"]["volumes"]
    dashboards_dir = provider["providers"][0]["options"]["path"]
    assert f"./deploy/grafana/dashboards:{dashboards_dir}:ro" in mounts
    datasource = yaml.safe_load(
        (DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text()
    )["datasources"][0]
    dashboard = json.loads((DEPLOY / "grafana/dashboards/spindle.json").read_text())
    uids = {p["datasource"]["uid"] for p in dashboard["panels"]}
    assert uids == {datasource["uid"]}
    titles = " ".join(panel["title"] for panel in dashboard["panels"]).lower()
    for subject in ("throughput", "time to first token", "queue", "batch", "kv", "error"):
        assert subject in titles


# --- Kubernetes -----------------------------------------------------------------------------


def k8s_objects() -> dict[tuple[str, str], dict[str, Any]]:
    kustomization = yaml.safe_load((DEPLOY / "k8s/kustomization.yaml").read_text())
    objects = {}
    for resource in kustomization["resources"]:
        for document in yaml.safe_load_all((DEPLOY / "k8s" / resource).read_text()):
            objects[(document["kind"], document["metadata"]["name"])] = document
    return objects


def container(objects: dict[tuple[str, str], Any], name: str) -> dict[str, Any]:
    [only] = objects[("Deployment", name)]["spec"]["template"]["spec"]["containers"]
    return only


def probe_port(spec: dict[str, Any], probe: dict[str, Any]) -> int:
    port = probe["httpGet"]["port"]
    named = {p["name"]: p["containerPort"] for p in spec["ports"]}
    return named.get(port, port)


def test_k8s_gateway_probes_health_on_its_port() -> None:
    objects = k8s_objects()
    gateway = container(objects, "spindle-gateway")
    assert is_entry_point(gateway["command"])
    env = {item["name"]: item["value"] for item in gateway["env"]}
    settings = assert_settings_accept(GatewaySettings, env, "k8s gateway")
    for probe in ("readinessProbe", "livenessProbe"):
        assert gateway[probe]["httpGet"]["path"] == "/health" in gateway_routes()
        assert probe_port(gateway, gateway[probe]) == settings.port
    hpa = objects[("HorizontalPodAutoscaler", "spindle-gateway")]
    assert hpa["spec"]["scaleTargetRef"]["name"] == "spindle-gateway"
    service = objects[("Service", "spindle-gateway")]
    labels = objects[("Deployment", "spindle-gateway")]["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()


def test_k8s_worker_gets_a_gpu_and_probes_its_metrics_port() -> None:
    objects = k8s_objects()
    worker = container(objects, "spindle-worker")
    assert is_entry_point(worker["command"])
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == 1
    env = {item["name"]: item["value"] for item in worker["env"]}
    settings = assert_settings_accept(WorkerSettings, env, "k8s worker")
    for probe in ("startupProbe", "livenessProbe"):
        assert worker[probe]["httpGet"]["path"] == "/metrics"
        assert probe_port(worker, worker[probe]) == settings.metrics_port
    assert ("Service", "redis") in objects and ("StatefulSet", "redis") in objects
    redis_args = objects[("StatefulSet", "redis")]["spec"]["template"]["spec"]["containers"][0]
    assert "--appendonly" in redis_args["args"]
