"""Secrets (issue 19, case 9): known placeholder secrets are refused at start naming the setting, no deploy file
ships a working secret or a published port without a login, Redis wants a password and has a memory bound, a
NetworkPolicy fences Redis and the API, Flower binds loopback, and a model process inherits no secret."""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml

from config.settings import Settings
from config.values import ConfigError
from tests.support import REPO_ROOT

REAL_KEY = "k3Jx9QvTt2Lp8WmZr4Nc"  # 20 random characters
REAL_SECRET = "9f2c4e7a1b8d3f6e0a5c7b9d2e4f6a8c"  # 32 bytes of hex


@pytest.mark.parametrize(
    "env,value",
    [
        ("AETHERCORE_API_KEYS", "replace-me-with-a-long-random-key:admin"),
        ("AETHERCORE_API_KEYS", f"{REAL_KEY}:admin,changeme-changeme-1234:user"),
        ("AETHERCORE_API_KEYS", "your-api-key-goes-here-1234:user"),
        ("AETHERCORE_JWT_SECRET", "replace-me-with-at-least-32-random-bytes-0000"),
        ("AETHERCORE_JWT_SECRET", "change-me-change-me-change-me-change-me"),
        ("AETHERCORE_JWT_SECRET", "an-example-secret-of-at-least-32-bytes!"),
        ("AETHERCORE_FLOWER_BASIC_AUTH", "admin:change-me"),
        ("AETHERCORE_FLOWER_BASIC_AUTH", "admin:admin"),
        ("AETHERCORE_FLOWER_BASIC_AUTH", "ops:password"),
        ("AETHERCORE_REDIS_URL", "redis://:replace-me@redis:6379/0"),
        ("AETHERCORE_REDIS_URL", "redis://default:changeme@redis:6379/0"),
        ("AETHERCORE_BROKER_URL", "amqp://guest:guest@rabbitmq:5672//"),
    ],
)
def test_placeholder_secrets_are_refused_naming_the_setting(env, value):
    with pytest.raises(ConfigError) as refused:
        Settings.from_env({env: value})
    message = str(refused.value)
    assert env in message and "placeholder" in message
    assert value not in message  # a secret is never echoed, not even a bad one


@pytest.mark.parametrize(
    "url",
    ["amqp://guest:guest@127.0.0.1:5672//", "amqp://guest:guest@localhost:5672//", "redis://:redis@[::1]:6379/0"],
)
def test_a_well_known_password_to_a_loopback_server_is_accepted(url):
    """RabbitMQ's `guest` (which RabbitMQ admits only over loopback) and a developer's own Redis: nothing past this
    host can use them, so they are not refused; the same password to any other host is (above)."""
    assert Settings.from_env({"AETHERCORE_BROKER_URL": url}).broker_url == url


def test_a_bad_secret_is_not_echoed():
    with pytest.raises(ConfigError) as refused:
        Settings.from_env({"AETHERCORE_JWT_SECRET": "too-short-but-secret"})
    assert "AETHERCORE_JWT_SECRET" in str(refused.value) and "too-short-but-secret" not in str(refused.value)


def test_real_secrets_are_accepted():
    settings = Settings.from_env(
        {
            "AETHERCORE_API_KEYS": f"{REAL_KEY}:admin",
            "AETHERCORE_JWT_SECRET": REAL_SECRET,
            "AETHERCORE_FLOWER_BASIC_AUTH": f"ops:{REAL_KEY}",
            "AETHERCORE_REDIS_URL": f"redis://:{REAL_SECRET}@redis:6379/0",
        }
    )
    assert settings.api_keys == {REAL_KEY: "admin"} and settings.jwt_secret == REAL_SECRET


# -- model processes inherit no secret ------------------------------------------------------------------------
def test_settings_for_a_model_process_hold_no_secret():
    settings = Settings.from_env(
        {
            "AETHERCORE_API_KEYS": f"{REAL_KEY}:admin",
            "AETHERCORE_JWT_SECRET": REAL_SECRET,
            "AETHERCORE_FLOWER_BASIC_AUTH": f"ops:{REAL_KEY}",
            "AETHERCORE_REDIS_URL": f"redis://:{REAL_SECRET}@redis:6379/0",
            "AETHERCORE_BROKER_URL": f"amqp://app:{REAL_SECRET}@rabbitmq:5672//",
        }
    )
    stripped = settings.for_model_process()
    text = repr(stripped)
    assert REAL_KEY not in text and REAL_SECRET not in text
    assert stripped.api_keys == {} and stripped.jwt_secret == "" and stripped.flower_basic_auth == ""
    assert stripped.model_store == settings.model_store and stripped.gpu_index == settings.gpu_index


def test_the_model_process_environment_holds_no_secret():
    environ = {
        "PATH": "/usr/bin",
        "HF_HUB_OFFLINE": "1",
        "AETHERCORE_LOG_LEVEL": "INFO",
        "AETHERCORE_API_KEYS": f"{REAL_KEY}:admin",
        "AETHERCORE_API_KEY": f"ack_abc.{REAL_SECRET}",
        "AETHERCORE_JWT_SECRET": REAL_SECRET,
        "AETHERCORE_FLOWER_BASIC_AUTH": f"ops:{REAL_KEY}",
        "AETHERCORE_REDIS_URL": f"redis://:{REAL_SECRET}@redis:6379/0",
        "AETHERCORE_BROKER_URL": f"amqp://app:{REAL_SECRET}@rabbitmq:5672//",
        "REDISCLI_AUTH": REAL_SECRET,
        "OTEL_EXPORTER_OTLP_HEADERS": f"x-honeycomb-team={REAL_SECRET}",
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"https://otel:{REAL_SECRET}@collector:4318",
    }
    from config.settings import SECRET_ENV, model_process_env

    env = model_process_env(environ)
    assert REAL_KEY not in repr(env) and REAL_SECRET not in repr(env)
    assert env["PATH"] == "/usr/bin" and env["HF_HUB_OFFLINE"] == "1" and env["AETHERCORE_LOG_LEVEL"] == "INFO"
    assert not set(env) & SECRET_ENV
    assert environ["AETHERCORE_JWT_SECRET"] == REAL_SECRET  # the caller's mapping is left alone


def test_a_model_process_spins_briefly_unless_the_operator_chose_how_openmp_waits():
    from workers.model_process import OPENMP_SPIN_ROUNDS, model_process_environment

    env = model_process_environment({"PATH": "/usr/bin", "AETHERCORE_JWT_SECRET": REAL_SECRET})
    assert env["GOMP_SPINCOUNT"] == str(OPENMP_SPIN_ROUNDS) and "OMP_WAIT_POLICY" not in env
    assert "AETHERCORE_JWT_SECRET" not in env and env["TOKENIZERS_PARALLELISM"] == "false"
    for chosen in ({"OMP_WAIT_POLICY": "ACTIVE"}, {"GOMP_SPINCOUNT": "0"}):
        env = model_process_environment({"PATH": "/usr/bin", **chosen})
        assert {k: env.get(k) for k in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")} == {
            "OMP_WAIT_POLICY": None,
            "GOMP_SPINCOUNT": None,
            **chosen,
        }


# -- deploy files ---------------------------------------------------------------------------------------------
COMPOSE_FILES = ("docker-compose.yml", "docker-compose.tls.yml")
SECRET_NAMES = re.compile(r"(API_KEYS|JWT_SECRET|BASIC_AUTH|PASSWORD|REDISCLI_AUTH|SECRET)$")
REQUIRED = re.compile(r"\$\{([A-Z_]+):\?[^}]*\}")


def k8s_docs(*folders: str) -> list[tuple[Path, dict]]:
    docs = []
    for folder in folders:
        for path in sorted((REPO_ROOT / folder).glob("*.yaml")):
            docs += [(path, doc) for doc in yaml.safe_load_all(path.read_text()) if doc]
    return docs


def secret_is_not_working(name: str, value: str) -> bool:
    """Empty, required from the operator with no default, or refused by the settings at start (a Redis password
    through the URL that carries it)."""
    value = REQUIRED.sub("", str(value))  # what the operator must set is no shipped secret
    if value == "" or name.endswith("BASIC_AUTH") and all(not p.partition(":")[2] for p in value.split(",")):
        return True
    if name.endswith("REDIS_PASSWORD"):
        name, value = "AETHERCORE_REDIS_URL", f"redis://:{value}@redis:6379/0"
    if not name.startswith("AETHERCORE_"):
        return False
    try:
        Settings.from_env({name: value})
    except ConfigError:
        return True
    return False


def compose_services() -> list[tuple[str, str, dict]]:
    return [
        (path, name, service)
        for path in COMPOSE_FILES
        for name, service in (yaml.safe_load((REPO_ROOT / path).read_text())["services"] or {}).items()
    ]


def test_no_compose_file_ships_a_working_secret():
    for path, name, service in compose_services():
        env = service.get("environment") or {}
        if not isinstance(env, dict):
            continue
        for key, value in env.items():
            value = str(value)
            if SECRET_NAMES.search(key):
                assert secret_is_not_working(key, value), f"{path}: {name}: {key}={value!r} is a working default"
            if key.endswith(("REDIS_URL", "BROKER_URL")):
                # the password comes from the operator (${REDIS_PASSWORD:?...}), never a default
                password = urlparse(REQUIRED.sub("x", value)).password
                assert password and REQUIRED.search(value), f"{path}: {name}: {key}={value!r} has no password"


def test_compose_publishes_ports_on_loopback_only_by_default():
    for path, name, service in compose_services():
        for port in service.get("ports") or []:
            host = re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", str(port)).rsplit(":", 2)[0]
            assert host == "127.0.0.1", f"{path}: {name} publishes {port!r} beyond this host by default"
    services = {name: service for path, name, service in compose_services() if path == "docker-compose.yml"}
    assert all(p.startswith("127.0.0.1:") for p in services["prometheus"].get("ports", [])), "Prometheus has no auth"


def test_compose_redis_wants_a_password_and_has_a_memory_bound():
    for path, name, service in compose_services():
        if name != "redis":
            continue
        command = " ".join(service["command"])
        assert "requirepass" in command and "noeviction" in command and "maxmemory" in command, path
        assert "--requirepass" not in command, f"{path}: the password would show in `ps`"
    base = yaml.safe_load((REPO_ROOT / "docker-compose.yml").read_text())["services"]
    assert REQUIRED.fullmatch(str(base["redis"]["environment"]["REDISCLI_AUTH"]))
    assert REQUIRED.fullmatch(str(base["grafana"]["environment"]["GF_SECURITY_ADMIN_PASSWORD"]))
    flower_logins = str(base["flower"]["environment"]["AETHERCORE_FLOWER_BASIC_AUTH"]).split(",")
    assert REQUIRED.fullmatch(flower_logins[0].strip()) and all(REQUIRED.search(login) for login in flower_logins)
    assert REQUIRED.fullmatch(str(base["prometheus"]["environment"]["FLOWER_PASSWORD"]))
    prometheus = (REPO_ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text()
    assert "password:" not in prometheus and "password_file:" in prometheus


def test_no_kubernetes_manifest_ships_a_working_secret():
    applied = k8s_docs("deploy/k8s")
    assert not [doc for _path, doc in applied if doc["kind"] == "Secret"], (
        "`kubectl apply -f deploy/k8s/` must not create or overwrite a Secret"
    )
    for path, doc in applied + k8s_docs("deploy/k8s/templates"):
        values = dict(doc.get("data") or {}, **(doc.get("stringData") or {}))
        for container in doc.get("spec", {}).get("template", {}).get("spec", {}).get("containers", []):
            values.update({e["name"]: e["value"] for e in container.get("env", []) if "value" in e})
        for key, value in values.items():
            if SECRET_NAMES.search(key):
                assert secret_is_not_working(key, value), (
                    f"{path.name}: {doc['metadata']['name']}: {key}={value!r} is a working secret"
                )
            if key.endswith("REDIS_URL"):
                assert "$(REDIS_PASSWORD)@" in str(value), f"{path.name}: {key} carries no password"
    templates = k8s_docs("deploy/k8s/templates")
    assert {doc["metadata"]["name"] for _p, doc in templates if doc["kind"] == "Secret"} == {
        "aethercore-secrets",
        "aethercore-redis",
    }


def test_kubernetes_redis_wants_a_password_and_a_network_policy_fences_it():
    docs = [doc for _path, doc in k8s_docs("deploy/k8s")]
    redis = next(d for d in docs if d["kind"] == "StatefulSet" and d["metadata"]["name"] == "redis")
    container = redis["spec"]["template"]["spec"]["containers"][0]
    assert "requirepass" in " ".join(container["args"]) and "noeviction" in " ".join(container["args"])
    env = {e["name"]: e for e in container["env"]}
    assert env["REDISCLI_AUTH"]["valueFrom"]["secretKeyRef"]["name"] == "aethercore-redis"
    # every Redis client takes the password from the Secret
    for doc in docs:
        for c in doc.get("spec", {}).get("template", {}).get("spec", {}).get("containers", []):
            names = [e["name"] for e in c.get("env", [])]
            if "manage.py" in c.get("command", []):
                assert "REDIS_PASSWORD" in names and "AETHERCORE_REDIS_URL" in names, doc["metadata"]["name"]
                assert names.index("REDIS_PASSWORD") < names.index("AETHERCORE_REDIS_URL")  # $(REDIS_PASSWORD)
    # workers never receive the API's keys
    for doc in docs:
        if doc["kind"] == "Deployment" and doc["metadata"]["name"].startswith("aethercore-worker"):
            refs = [
                r.get("secretRef", {}).get("name")
                for r in doc["spec"]["template"]["spec"]["containers"][0].get("envFrom", [])
            ]
            assert "aethercore-secrets" not in refs, doc["metadata"]["name"]
    policies = {d["metadata"]["name"]: d for d in docs if d["kind"] == "NetworkPolicy"}
    to_redis = next(
        p for p in policies.values() if p["spec"]["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "redis"}
    )
    allowed = set()
    for rule in to_redis["spec"]["ingress"]:
        for peer in rule["from"]:
            for expression in peer.get("podSelector", {}).get("matchExpressions", []):
                allowed |= set(expression["values"])
    assert (
        {"aethercore-api", "aethercore-worker"}
        <= allowed
        <= {
            "aethercore-api",
            "aethercore-worker",
            "aethercore-webhooks",
            "aethercore-batches",
            "aethercore-flower",
            "keda-operator",
        }
    )
    to_api = next(
        p
        for p in policies.values()
        if p["spec"]["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "aethercore-api"}
    )
    for rule in to_api["spec"]["ingress"]:
        for peer in rule["from"]:
            assert "namespaceSelector" in peer, "only the ingress controller's (and the monitoring) namespace"
    assert {"Ingress"} <= set(to_api["spec"]["policyTypes"]) and {"Ingress"} <= set(to_redis["spec"]["policyTypes"])


def test_flower_binds_loopback_unless_told_otherwise():
    from cli.processes import flower_argv

    assert Settings.from_env({}).flower_host == "127.0.0.1"
    assert "--address=127.0.0.1" in flower_argv(Settings.from_env({}), None, "")
    assert "--address=0.0.0.0" in flower_argv(Settings.from_env({"AETHERCORE_FLOWER_HOST": "0.0.0.0"}), None, "")
