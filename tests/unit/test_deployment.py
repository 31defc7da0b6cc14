"""Deployment files validated as far as this machine allows (no Docker engine, no cluster): the compose
file against Compose, every command and env var against what manage.py and the settings accept, the
Prometheus, Grafana and Kubernetes files parse and refer to metrics and queues that exist."""

import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import yaml

from api import metrics as api_metrics
from config.settings import SETTINGS, Settings, parse_worker_device
from tasks import metrics as worker_metrics
from tests.support import REPO_ROOT

KNOWN_ENV = {s.env for s in SETTINGS}
COMPOSE = yaml.safe_load((REPO_ROOT / "docker-compose.yml").read_text())
K8S = [
    doc
    for path in sorted((REPO_ROOT / "deploy" / "k8s").glob("*.yaml"))
    for doc in yaml.safe_load_all(path.read_text())
    if doc
]


# What an operator must put in .env before compose starts (the secrets have no default): stand-ins here.
REQUIRED_ENV = {
    "REDIS_PASSWORD": "0f3a9c2b7d4e8f1a0f3a9c2b7d4e8f1a",
    "AETHERCORE_FLOWER_BASIC_AUTH": "ops:0f3a9c2b7d4e8f1a",
    "GRAFANA_ADMIN_PASSWORD": "0f3a9c2b7d4e8f1a",
    "PROMETHEUS_FLOWER_PASSWORD": "7d4e8f1a0f3a9c2b",
}


def compose_default(value: str) -> str:
    """`${VAR:-default}` -> default (what compose uses when .env does not set VAR); `${VAR:?message}` (no default:
    the operator must set it) -> the stand-in of REQUIRED_ENV."""
    value = re.sub(r"\$\{([A-Z_]+):\?[^}]*\}", lambda m: REQUIRED_ENV[m.group(1)], str(value))
    return re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", value)


@pytest.mark.skipif(
    not shutil.which("docker-compose"), reason="needs Debian's docker-compose (scripts/test.sh installs it)"
)
@pytest.mark.parametrize(
    "profile",
    [[], ["--profile", "gpu"], ["-f", "docker-compose.tls.yml"], ["-f", "docker-compose.tls.yml", "--profile", "gpu"]],
)
def test_compose_file_is_valid(profile):
    def config(env: dict[str, str]) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["docker-compose", "-f", "docker-compose.yml", *profile, "config", "-q"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=60,
            env=env,
        )

    clean = {k: v for k, v in os.environ.items() if k not in REQUIRED_ENV}
    out = config({**clean, **REQUIRED_ENV})
    assert out.returncode == 0, out.stderr
    for name in REQUIRED_ENV:  # no secret has a default: compose refuses to start without each
        out = config({**clean, **{k: v for k, v in REQUIRED_ENV.items() if k != name}})
        assert out.returncode != 0 and name in out.stderr, name


def test_the_tls_override_encrypts_every_redis_client_and_the_api():
    tls = yaml.safe_load((REPO_ROOT / "docker-compose.tls.yml").read_text())["services"]
    for name in ("api", "worker", "worker-cuda0", "worker-cuda1", "flower"):
        env = tls[name]["environment"]
        assert env["AETHERCORE_REDIS_URL"].startswith("rediss://") and env["AETHERCORE_REDIS_CA"], name
        assert "./certs:/certs:ro" in tls[name]["volumes"], name
        assert set(env) <= {spec.env for spec in SETTINGS}, name
    assert tls["api"]["environment"]["AETHERCORE_TLS_CERT"]
    assert "--tls-auth-clients" in " ".join(tls["redis"]["command"])


def test_compose_services_and_shape():
    services = COMPOSE["services"]
    assert {"redis", "api", "worker", "worker-cuda0", "flower", "prometheus", "grafana"} <= set(services)
    assert "--appendonly" in " ".join(services["redis"]["command"]) and "healthcheck" in services["redis"]
    assert services["api"]["depends_on"]["redis"]["condition"] == "service_healthy"
    assert "deploy" not in services["worker"] and "container_name" not in services["worker"]  # --scale works
    for name in ("worker-cuda0", "worker-cuda1"):
        gpu = services[name]
        assert gpu["profiles"] == ["gpu"]
        device = gpu["deploy"]["resources"]["reservations"]["devices"][0]
        assert device["capabilities"] == ["gpu"] and len(device["device_ids"]) == 1
        assert gpu["command"][-1] == f"cuda:{device['device_ids'][0]}"
    # Flower's login has no default (it was admin:change-me): the operator sets it (tests/unit/test_secrets.py)
    assert ":?" in services["flower"]["environment"]["AETHERCORE_FLOWER_BASIC_AUTH"]


def commands():
    for name, service in COMPOSE["services"].items():
        if isinstance(service.get("command"), list) and "manage.py" in service["command"]:
            yield f"compose:{name}", service["command"]
    for doc in K8S:
        for container in doc.get("spec", {}).get("template", {}).get("spec", {}).get("containers", []):
            if "manage.py" in container.get("command", []):
                yield f"k8s:{doc['metadata']['name']}", container["command"]
    for dockerfile in ("Dockerfile.api", "Dockerfile.worker"):
        for match in re.finditer(r"^CMD (\[.*\])$", (REPO_ROOT / dockerfile).read_text(), re.M):
            yield dockerfile, json.loads(match.group(1))


@pytest.mark.parametrize("where,command", list(commands()), ids=lambda v: v if isinstance(v, str) else "")
def test_every_service_command_is_a_real_manage_py_command(where, command):
    args = command[command.index("manage.py") + 1 :]
    if "--device" in args:
        parse_worker_device(args[args.index("--device") + 1])
    out = subprocess.run(
        [sys.executable, "manage.py", *args, "--help"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, f"{where}: {command}: {out.stderr}"


def environments():
    shared = {}
    for name, service in COMPOSE["services"].items():
        env = service.get("environment") or {}
        if isinstance(env, dict):
            shared.update({k: compose_default(v) for k, v in env.items() if k.startswith("AETHERCORE_")})
            yield f"compose:{name}", {k: compose_default(v) for k, v in env.items()}
    for doc in K8S:
        if doc["kind"] in ("ConfigMap", "Secret"):
            yield f"k8s:{doc['metadata']['name']}", doc.get("data") or doc.get("stringData")
        for container in doc.get("spec", {}).get("template", {}).get("spec", {}).get("containers", []):
            yield f"k8s:{doc['metadata']['name']}", {e["name"]: e.get("value", "") for e in container.get("env", [])}


@pytest.mark.parametrize("where,env", list(environments()), ids=lambda v: v if isinstance(v, str) else "")
def test_every_env_var_is_a_setting_with_a_valid_value(where, env):
    ours = {k: str(v) for k, v in env.items() if k.startswith("AETHERCORE_")}
    unknown = set(ours) - KNOWN_ENV
    assert not unknown, f"{where} sets unknown settings {unknown}"
    Settings.from_env(ours)  # raises ConfigError naming the variable if a value is invalid


def test_env_example_lists_exactly_the_settings():
    names = set(re.findall(r"^(AETHERCORE_[A-Z_]+)=", (REPO_ROOT / ".env.example").read_text(), re.M))
    assert names == KNOWN_ENV


def test_prometheus_scrapes_the_api_and_flower():
    config = yaml.safe_load((REPO_ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    api = jobs["aethercore-api"]
    assert api["metrics_path"] == "/metrics"
    assert api["dns_sd_configs"][0]["names"] == ["api"] and api["dns_sd_configs"][0]["port"] == 8001
    assert jobs["flower"]["static_configs"][0]["targets"] == ["flower:5555"]


def test_grafana_dashboard_uses_metrics_that_exist():
    exported = {
        api_metrics.REQUESTS_TOTAL,
        api_metrics.REQUEST_DURATION,
        api_metrics.MODEL_MEMORY,
        api_metrics.ACTIVE_MODELS,
        api_metrics.QUEUE_DEPTH,
        api_metrics.LIVE_WORKERS,
        api_metrics.STREAMS_OPEN,
        worker_metrics.JOBS_TOTAL,
        *worker_metrics.BUCKETS,
    }
    dashboard = json.loads((REPO_ROOT / "deploy" / "grafana" / "dashboards" / "aethercore.json").read_text())
    titles = " ".join(p["title"].lower() for p in dashboard["panels"])
    for topic in ("request rate", "queue depth", "queue wait", "inference", "batch size", "memory"):
        assert topic in titles
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            for name in re.findall(r"\b(aethercore_[a-z_]+)", target["expr"]):
                base = re.sub(r"_(bucket|sum|count)$", "", name)
                assert name in exported or base in exported, f"{panel['title']}: unknown metric {name}"
    for path in (REPO_ROOT / "deploy" / "grafana" / "provisioning").rglob("*.yml"):
        assert yaml.safe_load(path.read_text())["apiVersion"] == 1


def test_kubernetes_manifests():
    kinds = {(d["kind"], d["metadata"]["name"]) for d in K8S}
    assert ("Deployment", "aethercore-api") in kinds and ("Service", "aethercore-api") in kinds
    workers = [d for d in K8S if d["kind"] == "Deployment" and d["metadata"]["name"].startswith("aethercore-worker")]
    assert {w["spec"]["template"]["spec"]["containers"][0]["command"][-1] for w in workers} == {"cpu", "cuda:0"}
    gpu = next(w for w in workers if w["spec"]["template"]["spec"]["containers"][0]["command"][-1] == "cuda:0")
    assert gpu["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
    scaled = {d["spec"]["scaleTargetRef"]["name"]: d for d in K8S if d["kind"] == "ScaledObject"}
    assert set(scaled) == {w["metadata"]["name"] for w in workers}
    for worker in workers:
        device = worker["spec"]["template"]["spec"]["containers"][0]["command"][-1]
        trigger = scaled[worker["metadata"]["name"]]["spec"]["triggers"][0]
        assert trigger["type"] == "redis" and trigger["metadata"]["listName"] == device  # queue = device


def test_images_keep_their_roles():
    api_image = (REPO_ROOT / "Dockerfile.api").read_text()
    assert "requirements/api.txt" in api_image
    api_requirements = [
        line.split("==")[0].lower()
        for line in (REPO_ROOT / "requirements" / "api.txt").read_text().splitlines()
        if line and not line.startswith(("#", "-r"))
    ]
    assert not {"torch", "transformers", "onnxruntime", "onnxruntime-gpu"} & set(api_requirements)
    assert "COPY workers/" not in api_image and "HEALTHCHECK" in api_image and "/health/live" in api_image
    assert re.search(r"^USER (?!root)", api_image, re.M)
    worker_image = (REPO_ROOT / "Dockerfile.worker").read_text()
    assert "onnxruntime-gpu" in (REPO_ROOT / "requirements" / "worker-gpu.txt").read_text()
    assert "manage.py models bootstrap" in worker_image  # demo models built at image build time
    assert "AS worker-cpu" in worker_image and "AS worker-gpu" in worker_image
    assert len(re.findall(r"^USER (?!root)", worker_image, re.M)) == 2
    # manage.py is a thin entry point over cli/: every image that runs it carries the package.
    assert "COPY cli/ cli/" in api_image and worker_image.count("COPY cli/ cli/") == 2
