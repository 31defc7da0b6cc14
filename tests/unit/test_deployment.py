"""Deployment files validated without a Docker engine or a cluster: the compose file against Compose, every
command and env var against what manage.py and the settings accept, the Prometheus, Grafana and Kubernetes files
parse and refer to metrics and queues that exist, the Dockerfiles build with either builder from a wheelhouse or
the index. scripts/compose-check.sh builds and runs it all for real (too slow for this suite)."""

import fnmatch
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import yaml

from api import metrics as api_metrics
from config.settings import SETTINGS, Settings
from config.units import parse_size
from config.values import parse_worker_device
from tasks import metrics as worker_metrics
from tasks import metrics_view
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
    "PROMETHEUS_API_KEY": "5b8e1d0c7a2f4e6b9d3c1a0f8e7d6c5b",
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
    [
        [],
        ["--profile", "gpu"],
        ["-f", "docker-compose.tls.yml"],
        ["-f", "docker-compose.tls.yml", "--profile", "gpu"],
        ["-f", "docker-compose.ha.yml", "--profile", "ha"],
    ],
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
    for name in ("api", "worker", "worker-cuda0", "worker-cuda1", "flower", "webhooks", "batches"):
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
        metrics_view.MODEL_MEMORY,
        metrics_view.ACTIVE_MODELS,
        metrics_view.QUEUE_DEPTH,
        metrics_view.LIVE_WORKERS,
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
    assert "COPY workers/" not in api_image and "HEALTHCHECK" in api_image
    assert re.search(r"^USER (?!root)", api_image, re.M)
    worker_image = (REPO_ROOT / "Dockerfile.worker").read_text()
    assert "onnxruntime-gpu" in (REPO_ROOT / "requirements" / "worker-gpu.txt").read_text()
    assert "manage.py models bootstrap" in worker_image  # demo models built at image build time
    assert "AS worker-cpu" in worker_image and "AS worker-gpu" in worker_image
    assert len(re.findall(r"^USER (?!root)", worker_image, re.M)) == 2
    # manage.py is a thin entry point over cli/: every image that runs it carries the package.
    assert "COPY cli/ /app/cli/" in api_image and "COPY cli/ /app/cli/" in worker_image


# -- images: built from a wheelhouse or the index, on a base given as a build argument ----------------------
DOCKERFILES = {name: (REPO_ROOT / name).read_text() for name in ("Dockerfile.api", "Dockerfile.worker")}
ROLES = ("api", "worker-cpu", "worker-gpu")  # requirements/ROLE.txt, wheelhouse/ROLE/, scripts/wheelhouse.sh ROLE


def stages(dockerfile: str) -> list[tuple[str, str, str]]:
    """(base, name, body) of every stage, in order."""
    parts = re.split(r"^FROM (\S+) AS (\S+)\n", dockerfile, flags=re.M)
    return [(parts[i], parts[i + 1], parts[i + 2]) for i in range(1, len(parts), 3)]


def arg_default(dockerfile: str, name: str) -> str:
    return re.search(rf"^ARG {name}=(\S+)$", dockerfile, re.M).group(1)


def test_images_take_their_base_as_a_build_argument_with_the_public_defaults():
    api, worker = DOCKERFILES["Dockerfile.api"], DOCKERFILES["Dockerfile.worker"]
    assert arg_default(api, "BASE_IMAGE") == arg_default(worker, "BASE_IMAGE") == "python:3.11-slim"
    assert arg_default(worker, "CUDA_BASE").startswith("nvidia/cuda:") and "cudnn-runtime" in arg_default(
        worker, "CUDA_BASE"
    )
    for name, text in DOCKERFILES.items():
        seen = []
        for base, stage, _body in stages(text):
            assert base in ("${BASE_IMAGE}", "${CUDA_BASE}", "scratch") or base in seen, f"{name}: FROM {base}"
            seen.append(stage)
    # compose's build arguments default to the very same images (one default, stated twice, checked here)
    services = COMPOSE["services"]
    for service in ("api", "worker", "flower", "worker-cuda0", "worker-cuda1"):
        args = services[service]["build"]["args"]
        assert compose_default(args["BASE_IMAGE"]) == "python:3.11-slim", service
    for service in ("worker-cuda0", "worker-cuda1"):
        assert compose_default(services[service]["build"]["args"]["CUDA_BASE"]) == arg_default(worker, "CUDA_BASE")


def test_every_build_stage_installs_its_role_from_its_wheelhouse_or_the_index():
    installed = {}
    for name, text in DOCKERFILES.items():
        for _base, stage, body in stages(text):
            match = re.search(r"^RUN .*install-requirements\.sh (\S+)", body, re.M)
            if match:
                role = match.group(1)
                installed[stage] = role
                assert f"COPY wheelhouse/{role}/ /tmp/wheels/" in body, f"{name} {stage}"
                # only the role's own files: a change to another requirements file keeps the build cache
                assert f"COPY requirements/base.txt requirements/{role}.txt /tmp/requirements/" in body, stage
                assert (REPO_ROOT / "requirements" / f"{role}.txt").is_file()
    assert installed == {"build": "api", "cpu-build": "worker-cpu", "gpu-build": "worker-gpu"}
    for role in ROLES:  # a fresh clone has the (empty) directories the Dockerfiles copy
        assert (REPO_ROOT / "wheelhouse" / role / ".gitkeep").is_file(), role
    install = (REPO_ROOT / "deploy" / "docker" / "install-requirements.sh").read_text()
    assert '--no-index --find-links /tmp/wheels -r "/tmp/requirements/$role.txt"' in install
    wheelhouse = (REPO_ROOT / "scripts" / "wheelhouse.sh").read_text()
    assert 'constraint="torch==$(torch_pin worker-cpu)+cpu"' in wheelhouse  # never PyPI's CUDA torch for the CPU
    assert 'constraint="torch!=$(torch_pin worker-gpu)+cpu"' in wheelhouse


def dockerignored(path: str) -> bool:
    """Whether .dockerignore keeps `path` out of the build context (last matching pattern wins, a pattern that
    matches a directory covers what is in it)."""
    patterns = [
        line.strip()
        for line in (REPO_ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    parts = path.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    ignored = False
    for pattern in patterns:
        negated = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/")
        if any(fnmatch.fnmatchcase(candidate, pattern) for candidate in candidates):
            ignored = not negated
    return ignored


def test_the_build_context_holds_what_the_images_copy_and_nothing_else():
    for name, text in DOCKERFILES.items():
        for match in re.finditer(r"^COPY (?!--from)(.+) (\S+)$", text, re.M):
            for source in match.group(1).split():
                assert (REPO_ROOT / source).exists(), f"{name}: COPY {source}: not in the repository"
                probe = source.rstrip("/") + ("/x.py" if source.endswith("/") else "")
                assert not dockerignored(probe), f"{name}: COPY {source}: .dockerignore leaves it out"
    for path in ("wheelhouse/worker-cpu/torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl", "manage.py"):
        assert not dockerignored(path), path
    for path in (
        ".venv/bin/python",
        ".git/HEAD",
        ".env",
        "model_store/artifacts/minilm/model.safetensors",  # built in the image, never the host's
        "var/admin.key",
        "tests/unit/test_deployment.py",
        "api/__pycache__/app.cpython-311.pyc",
        "wheelhouse/.worker-cpu.Ab12Cd/torch.whl",  # scripts/wheelhouse.sh's unfinished directory
    ):
        assert dockerignored(path), path


def test_images_run_unprivileged_with_healthchecks_and_build_with_either_builder():
    targets = {"Dockerfile.api": ["api"], "Dockerfile.worker": ["worker-cpu", "worker-gpu"]}
    for name, text in DOCKERFILES.items():
        # BuildKit-only syntax would break docker-compose 1.29's classic builder
        instructions = "\n".join(line for line in text.splitlines() if not line.startswith("#"))
        assert not re.search(r"RUN --mount|<<-?\s*['\"A-Z]|COPY --(link|chmod)", instructions), name
        by_name = {stage: body for _base, stage, body in stages(text)}
        for target in targets[name]:
            body = by_name[target]
            assert re.search(r"^USER (?!root|0)\S+", body, re.M), f"{name} {target}"
            assert "HEALTHCHECK" in body and re.search(r"^CMD \[", body, re.M), f"{name} {target}"
    names = [stage for _b, stage, _body in stages(DOCKERFILES["Dockerfile.worker"])]
    bases = [base for base, _s, _body in stages(DOCKERFILES["Dockerfile.worker"])]
    # the classic builder builds every stage before its target: the CPU worker must not need the CUDA base
    assert names.index("worker-cpu") < bases.index("${CUDA_BASE}")
    assert names[-1] == "worker-gpu"  # the default target
    for name, text in DOCKERFILES.items():  # every image copies the checks its HEALTHCHECK runs
        assert "COPY deploy/docker/healthcheck.py /app/deploy/docker/" in text, name
    assert image_healthchecks("Dockerfile.api") == [HEALTHCHECK_API]
    assert image_healthchecks("Dockerfile.worker") == [[*HEALTHCHECK, "worker"]] * 2


HEALTHCHECK = ["python", "-m", "deploy.docker.healthcheck"]
HEALTHCHECK_API = [*HEALTHCHECK, "api"]


def image_healthchecks(dockerfile: str) -> list[list[str]]:
    """The commands of a Dockerfile's HEALTHCHECK instructions."""
    text = DOCKERFILES[dockerfile].replace("\\\n", " ")
    return [json.loads(m) for m in re.findall(r"^HEALTHCHECK .*?CMD (\[.*\])$", text, re.M)]


def test_the_healthchecks_ask_for_this_containers_heartbeat(monkeypatch):
    from deploy.docker import healthcheck

    monkeypatch.setattr(healthcheck.socket, "gethostname", lambda: "c0ffee123456")

    class FakeRedis:  # what the checks read: the dispatchers' heartbeats
        dispatchers = ["dispatcher.9@another"]

        def zrangebyscore(self, *_args):
            return self.dispatchers

    monkeypatch.setattr(healthcheck, "make_redis", lambda *a, **k: FakeRedis())
    live = [{"name": "cpu.7@another"}]
    monkeypatch.setattr(healthcheck.ClusterState, "live_workers", lambda self: live)
    assert healthcheck.main(["worker"]) == 1 and healthcheck.main(["dispatcher"]) == 1
    live.append({"name": "cpu.7@c0ffee123456"})
    FakeRedis.dispatchers = ["dispatcher.9@another", "dispatcher.12@c0ffee123456"]
    assert healthcheck.main(["worker"]) == 0 and healthcheck.main(["dispatcher"]) == 0
    assert healthcheck.main([]) == healthcheck.main(["nothing"]) == 2

    def probe(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "deploy.docker.healthcheck", *args],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "AETHERCORE_REDIS_URL": "redis://127.0.0.1:1/0", "AETHERCORE_PORT": "1"},
        )

    for role in ("worker", "dispatcher", "api"):  # nothing answers
        out = probe(role)
        assert out.returncode == 1 and "unhealthy" in out.stdout, (role, out.stdout)
    for role in ("worker", "dispatcher"):  # a liveness probe: Redis away is not this process's fault
        out = probe(role, "--redis-down-ok")
        assert out.returncode == 0 and "Redis does not answer" in out.stdout, (role, out.stdout)


def test_compose_reads_only_documented_variables_and_every_port_can_move():
    # docs/DEPLOYMENT.md's table of compose variables (.env.example lists them too while cli/configuration.py's
    # COMPOSE_VARIABLES, which regenerates it, names them all)
    documented = set(re.findall(r"^\| `([A-Z_]+)` \|", (REPO_ROOT / "docs" / "DEPLOYMENT.md").read_text(), re.M))
    for name in ("docker-compose.yml", "docker-compose.tls.yml", "docker-compose.ha.yml"):
        text = (REPO_ROOT / name).read_text()
        for variable in set(re.findall(r"\$\{([A-Z_]+)", text)):
            assert variable in KNOWN_ENV or variable in documented, f"{name}: {variable} is documented nowhere"
    for service_name, service in COMPOSE["services"].items():
        for port in service.get("ports", []):  # on loopback unless .env says otherwise, on a port .env may move
            address, published = r"(\$\{[A-Z_]+:-127\.0\.0\.1\}|127\.0\.0\.1)", r"\$\{[A-Z]+_PUBLISH_PORT:-\d+\}"
            assert re.fullmatch(rf"{address}:{published}:\d+", port), f"{service_name}: {port}"
        if not service.get("build"):  # the third-party images: replaceable by local stand-ins
            assert re.fullmatch(r"\$\{[A-Z]+_IMAGE:-[^}]+\}", service["image"]), service_name
    base_images = (REPO_ROOT / "scripts" / "base-images.sh").read_text()
    check = (REPO_ROOT / "scripts" / "compose-check.sh").read_text()
    for image in re.findall(r"(?:BASE|REDIS|PROMETHEUS)_IMAGE=(aethercore/[\w.:-]+)", check):
        repository, tag = image.split(":")
        assert f'"${{PREFIX}}{repository.split("/")[1]}:{tag.replace("bookworm", "$SUITE")}"' in base_images, image


def test_the_gpu_workers_build_the_gpu_target_and_reserve_one_nvidia_gpu_each():
    for name in ("worker-cuda0", "worker-cuda1"):
        gpu = COMPOSE["services"][name]
        assert gpu["build"]["target"] == "worker-gpu" and gpu["image"] == "aethercore/worker-gpu:latest"
        (device,) = gpu["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and "count" not in device  # device_ids and count exclude each other


def test_scripts_parse_and_the_compose_check_stays_out_of_ci():
    for path in sorted((REPO_ROOT / "scripts").glob("*.sh")):
        out = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True, timeout=30)
        assert out.returncode == 0, f"{path.name}: {out.stderr}"
    assert "compose-check" not in (REPO_ROOT / ".ci" / "run").read_text()
    assert "compose-check" not in (REPO_ROOT / "scripts" / "test.sh").read_text()


@pytest.mark.skipif(os.geteuid() != 0, reason="as_root runs apt-get through sudo, which resets PATH")
def test_apt_waits_for_the_package_managers_lock(tmp_path):
    """A concurrent apt-get (unattended upgrades on a fresh machine) holds the lock: scripts/lib.sh waits for it
    instead of giving up (it made scripts/test.sh skip the browser and compose tests)."""
    calls = tmp_path / "calls"
    fake = tmp_path / "apt-get"
    fake.write_text(
        "#!/bin/sh\n"
        f"echo x >> {calls}\n"
        f'[ "$(wc -l < {calls})" -ge 3 ] && exit 0\n'
        "echo 'E: Could not get lock /var/lib/dpkg/lock-frontend. It is held by process 42 (apt-get)' >&2\n"
        "exit 100\n"
    )
    fake.chmod(0o755)

    def apt_get(*args: str) -> subprocess.CompletedProcess:
        script = 'source scripts/lib.sh; sleep() { :; }; apt_get "$@"'
        env = {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}"}
        return subprocess.run(
            ["bash", "-c", script, "apt_get", *args], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=60
        )

    out = apt_get("install", "-y", "something")
    assert out.returncode == 0, out.stderr
    assert len(calls.read_text().splitlines()) == 3 and "waiting" in out.stderr
    fake.write_text("#!/bin/sh\necho 'E: Unable to locate package nothing' >&2\nexit 100\n")
    out = apt_get("install", "-y", "nothing")  # any other failure: at once, with apt-get's message
    assert out.returncode == 100 and "Unable to locate package" in out.stderr


def test_the_deployment_commands_in_the_docs_name_what_exists():
    readme = (REPO_ROOT / "README.md").read_text().split("## Deployment: docker compose", 1)[1].split("\n## ", 1)[0]
    guide = (REPO_ROOT / "docs" / "DEPLOYMENT.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", readme + guide, re.S)
    assert len(blocks) >= 4
    for block in blocks:
        for script in re.findall(r"\b(scripts/[\w.-]+)", block):
            assert (REPO_ROOT / script).is_file(), script
        for line in block.replace("\\\n", " ").splitlines():
            command = line.split("#", 1)[0].split()
            if "up" in command and "-d" in command:  # services named after the flags exist
                named = [w for w in command[command.index("up") + 1 :] if not w.startswith("-") and "=" not in w]
                assert set(named) <= set(COMPOSE["services"]), line
            if "build" in command and command[0].startswith("docker"):
                assert set(command[command.index("build") + 1 :]) <= set(COMPOSE["services"]), line


# -- issue 34, case 16: the deployment files fit the service they deploy ----------------------------------------
TLS_COMPOSE = yaml.safe_load((REPO_ROOT / "docker-compose.tls.yml").read_text())
WORKLOADS = {d["metadata"]["name"]: d for d in K8S if d["kind"] in ("Deployment", "StatefulSet")}
# Redis's own units (redis.conf): 1k = 1000, 1kb = 1024, and so on.
REDIS_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 2**10, "m": 10**6, "mb": 2**20, "g": 10**9, "gb": 2**30}


def test_with_tls_the_apis_healthcheck_speaks_the_scheme_its_settings_serve():
    """docker-compose.tls.yml makes the API serve HTTPS only: no healthcheck may speak http to it. The API service
    keeps its image's, which asks the API's own settings (tests/integration/test_probes.py runs it against a real
    HTTPS API); the dispatcher's is its heartbeat."""
    for variant in (COMPOSE, TLS_COMPOSE):
        assert "healthcheck" not in variant["services"]["api"]
    assert image_healthchecks("Dockerfile.api") == [HEALTHCHECK_API]
    assert COMPOSE["services"]["webhooks"]["healthcheck"]["test"] == ["CMD", *HEALTHCHECK, "dispatcher"]
    assert "webhooks" not in TLS_COMPOSE["services"] or "healthcheck" not in TLS_COMPOSE["services"]["webhooks"]
    assert COMPOSE["services"]["batches"]["healthcheck"]["test"] == ["CMD", *HEALTHCHECK, "batches"]
    assert "healthcheck" not in TLS_COMPOSE["services"]["batches"]


def redis_bytes(value: str) -> int:
    number, unit = re.fullmatch(r"(\d+)([a-z]*)", value.lower()).groups()
    return int(number) * REDIS_UNITS[unit]


def maxmemory(command: list[str] | str) -> int:
    text = command if isinstance(command, str) else " ".join(command)
    return redis_bytes(compose_default(re.search(r"--maxmemory (\S+)", text).group(1)))


def redis_deployments():
    """(where, Redis's maxmemory, the API's AETHERCORE_* settings there)."""
    api_env = {k: compose_default(v) for k, v in COMPOSE["services"]["api"]["environment"].items()}
    yield "compose", maxmemory(COMPOSE["services"]["redis"]["command"]), api_env
    yield "compose+tls", maxmemory(TLS_COMPOSE["services"]["redis"]["command"]), api_env
    configmap = next(d for d in K8S if d["kind"] == "ConfigMap")["data"]
    redis = WORKLOADS["redis"]["spec"]["template"]["spec"]["containers"][0]
    yield "k8s", maxmemory(redis["args"]), configmap


def test_redis_maxmemory_holds_two_owners_at_their_full_quotas_within_the_holdings_share():
    """What callers keep may take AETHERCORE_HOLDINGS_MAX_SHARE of maxmemory together; one owner's byte quotas
    (files, batch outputs, dead letters) must be at most half of that share, so that two owners at their full quotas
    fit and the other half of Redis stays the jobs' (docs/DEPLOYMENT.md has the arithmetic). Before: maxmemory 1gb
    against a 500 MB file quota, two owners filled Redis."""
    for where, limit, env in redis_deployments():
        settings = Settings.from_env({k: str(v) for k, v in env.items() if k.startswith("AETHERCORE_")})
        one_owner = settings.files_quota + settings.outputs_quota + settings.dead_letter_owner_quota
        share = settings.holdings_max_share * limit
        assert share >= 2 * one_owner, f"{where}: share {share:.0f} B < two owners' quotas {2 * one_owner} B"
    redis = WORKLOADS["redis"]["spec"]["template"]["spec"]["containers"][0]
    memory_limit = parse_size(redis["resources"]["limits"]["memory"])
    assert memory_limit >= 1.5 * maxmemory(redis["args"])  # Redis's overhead and the AOF rewrite's copy-on-write


def test_the_documented_compose_defaults_are_the_files_defaults():
    guide = (REPO_ROOT / "docs" / "DEPLOYMENT.md").read_text()
    documented = dict(re.findall(r"^\| `([A-Z_]+)` \| `([^`]*)` \|", guide, re.M))
    from cli.configuration import COMPOSE_VARIABLES

    listed = {name: default for name, default, _doc in COMPOSE_VARIABLES}
    for name in ("docker-compose.yml", "docker-compose.tls.yml", "docker-compose.ha.yml"):
        for variable, default in re.findall(r"\$\{([A-Z_]+):-([^}]*)\}", (REPO_ROOT / name).read_text()):
            if variable in documented:
                assert documented[variable] == default, f"{name}: {variable} defaults to {default!r}"
            if variable in listed:
                assert listed[variable] == default, f"cli/configuration.py: {variable}"


def started_with(profiles: set[str]) -> set[str]:
    """The services `docker compose --profile P ...` starts: those without a profile, and those of the profiles."""
    return {n for n, s in COMPOSE["services"].items() if not s.get("profiles") or set(s["profiles"]) & profiles}


def test_the_gpu_profile_starts_one_gpu_worker_and_gpu2_the_second():
    gpu_workers = {n for n in COMPOSE["services"] if n.startswith("worker-cuda")}
    assert started_with(set()) & gpu_workers == set()
    assert started_with({"gpu"}) & gpu_workers == {"worker-cuda0"}  # a one-GPU host
    assert started_with({"gpu", "gpu2"}) & gpu_workers == {"worker-cuda0", "worker-cuda1"}
    assert "--profile gpu --profile gpu2" in (REPO_ROOT / "docs" / "DEPLOYMENT.md").read_text()


def containers(doc: dict) -> list[dict]:
    pod = doc["spec"]["template"]["spec"]
    return pod["containers"] + pod.get("initContainers", [])


def test_every_pod_runs_unprivileged_on_a_read_only_root_filesystem():
    image_uid = {int(uid) for uid in re.findall(r"useradd .*--uid (\d+)", "".join(DOCKERFILES.values()))}
    assert len(image_uid) == 1
    for name, doc in WORKLOADS.items():
        pod = doc["spec"]["template"]["spec"]
        context = pod["securityContext"]
        assert context["runAsNonRoot"] is True and context["runAsUser"] > 0, name
        assert context["seccompProfile"] == {"type": "RuntimeDefault"}, name
        if name.startswith("aethercore-"):  # our images' user
            assert {context["runAsUser"]} == image_uid, name
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        for container in containers(doc):
            hardened = container["securityContext"]
            assert hardened["allowPrivilegeEscalation"] is False, name
            assert hardened["readOnlyRootFilesystem"] is True, name
            assert hardened["capabilities"] == {"drop": ["ALL"]}, name
            writable = {m["mountPath"]: m["name"] for m in container["volumeMounts"] if not m.get("readOnly")}
            assert "/tmp" in writable and "emptyDir" in volumes[writable["/tmp"]], name
    # What each process writes besides /tmp: the API its gunicorn processes' metrics files (api/server.py, under
    # var/), Redis its append-only file (the volume claim).
    api_mounts = {m["mountPath"]: m["name"] for m in containers(WORKLOADS["aethercore-api"])[0]["volumeMounts"]}
    api_volumes = {v["name"]: v for v in WORKLOADS["aethercore-api"]["spec"]["template"]["spec"]["volumes"]}
    assert "emptyDir" in api_volumes[api_mounts["/app/var"]]
    assert 'REPO_ROOT / "var" / "prometheus"' in (REPO_ROOT / "api" / "server.py").read_text()
    redis_mounts = {m["mountPath"] for m in containers(WORKLOADS["redis"])[0]["volumeMounts"]}
    assert "/data" in redis_mounts


def exec_probe(container: dict, probe: str) -> list[str]:
    return container[probe]["exec"]["command"]


def test_every_long_running_container_has_a_liveness_probe_that_means_something():
    from deploy.docker import healthcheck

    for name, doc in WORKLOADS.items():
        for container in containers(doc):
            assert "livenessProbe" in container, name
            if "exec" in container["livenessProbe"] and HEALTHCHECK[-1] in exec_probe(container, "livenessProbe"):
                role = exec_probe(container, "livenessProbe")[len(HEALTHCHECK)]
                assert role in healthcheck.CHECKS, name
    api = containers(WORKLOADS["aethercore-api"])[0]
    assert api["livenessProbe"]["httpGet"]["path"] == "/health/live"
    assert api["readinessProbe"]["httpGet"]["path"] == "/health/ready"
    dispatcher = containers(WORKLOADS["aethercore-webhooks"])[0]
    assert exec_probe(dispatcher, "livenessProbe") == [*HEALTHCHECK, "dispatcher", "--redis-down-ok"]
    driver = containers(WORKLOADS["aethercore-batches"])[0]
    assert exec_probe(driver, "startupProbe") == [*HEALTHCHECK, "batches"]
    assert exec_probe(driver, "livenessProbe") == [*HEALTHCHECK, "batches", "--redis-down-ok"]
    workers = [d for n, d in WORKLOADS.items() if n.startswith("aethercore-worker")]
    assert len(workers) == 2
    for worker in workers:
        container = containers(worker)[0]
        # the first heartbeat must come (a Redis that does not answer fails it); afterwards a stopped heartbeat
        # restarts the worker, a Redis away does not (restarting it would not bring Redis back)
        assert exec_probe(container, "startupProbe") == [*HEALTHCHECK, "worker"]
        assert exec_probe(container, "livenessProbe") == [*HEALTHCHECK, "worker", "--redis-down-ok"]
        liveness = container["livenessProbe"]
        worker_ttl = Settings.from_env({}).worker_ttl  # a heartbeat is stale after this
        assert liveness["periodSeconds"] * liveness["failureThreshold"] >= 2 * worker_ttl
        assert liveness["timeoutSeconds"] >= 5  # a Python start, a Redis connect and one read


def test_the_batch_driver_runs_beside_the_api_with_its_keys_and_limits():
    """The API no longer drives batches: `manage.py up`, compose and Kubernetes each run `manage.py batches` beside
    it, from the API's image, with what the driver must share with the API: the keys a batch's owner is checked
    against (a key the driver does not know is a revoked owner's) and the batches' limits."""
    services = COMPOSE["services"]
    batches, api = services["batches"], services["api"]
    assert batches["command"] == ["python", "manage.py", "batches"] and batches["image"] == api["image"]
    assert batches["build"] == api["build"] and batches["depends_on"]["redis"]["condition"] == "service_healthy"
    shared = {k: v for k, v in api["environment"].items() if k.startswith(("AETHERCORE_FILES_", "AETHERCORE_BATCH"))}
    assert shared and all(batches["environment"][k] == v for k, v in shared.items())
    for name in ("AETHERCORE_API_KEYS", "AETHERCORE_JWT_SECRET", "AETHERCORE_OUTPUTS_QUOTA", "AETHERCORE_AUTH"):
        assert batches["environment"][name] == api["environment"][name], name
    assert Settings.from_env({}).batch_driver_nice == 10
    assert compose_default(batches["environment"]["AETHERCORE_BATCH_DRIVER_NICE"]) == "10"

    driver, k8s_api = containers(WORKLOADS["aethercore-batches"])[0], containers(WORKLOADS["aethercore-api"])[0]
    assert driver["command"] == ["python", "manage.py", "batches"] and driver["image"] == k8s_api["image"]
    assert driver["envFrom"] == k8s_api["envFrom"]  # the ConfigMap's limits and the API's Secret (keys, JWT)
    policies = {d["metadata"]["name"]: d for d in K8S if d["kind"] == "NetworkPolicy"}
    assert policies["batches-no-ingress"]["spec"]["podSelector"]["matchLabels"] == {
        "app.kubernetes.io/name": "aethercore-batches"
    }
    assert "ingress" not in policies["batches-no-ingress"]["spec"]

    # `manage.py up` (its children are supervised: one that dies stops them all); that the API itself drives nothing
    # is tests/integration/test_batch_driver.py's
    assert 'spawn("batches", "batches")' in (REPO_ROOT / "cli" / "processes.py").read_text()


def test_prometheus_scrapes_the_cluster_metrics_with_a_viewer_key():
    from api.blueprints.health import SEES_DETAILS

    plain = yaml.safe_load((REPO_ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text())
    tls = yaml.safe_load((REPO_ROOT / "deploy" / "prometheus" / "prometheus-tls.yml").read_text())
    api_jobs = [next(j for j in c["scrape_configs"] if j["job_name"] == "aethercore-api") for c in (plain, tls)]
    for job in api_jobs:
        assert job["authorization"] == {"type": "Bearer", "credentials_file": "/prometheus/api.key"}
    # the TLS variant is the plain one, scraping the API over https with the CA
    assert tls["scrape_configs"][0].pop("scheme") == "https" and tls["scrape_configs"][0].pop("tls_config") == {
        "ca_file": "/certs/ca.crt",
        "server_name": "api",
    }
    assert tls == plain
    prometheus = COMPOSE["services"]["prometheus"]
    assert "> /prometheus/api.key" in prometheus["command"][0]
    assert compose_default(prometheus["environment"]["API_KEY"]) == REQUIRED_ENV["PROMETHEUS_API_KEY"]
    api_keys = compose_default(COMPOSE["services"]["api"]["environment"]["AETHERCORE_API_KEYS"])
    role = Settings.from_env({"AETHERCORE_API_KEYS": api_keys}).api_keys[REQUIRED_ENV["PROMETHEUS_API_KEY"]]
    assert role in SEES_DETAILS
    tls_prometheus = TLS_COMPOSE["services"]["prometheus"]["volumes"]
    assert "./deploy/prometheus/prometheus-tls.yml:/etc/prometheus/prometheus.yml:ro" in tls_prometheus
