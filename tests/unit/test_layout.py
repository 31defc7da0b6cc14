"""Architecture rules that must keep holding: the API and the task contract stay torch-free."""

import subprocess
import sys

from config.values import REPO_ROOT

FRAMEWORKS = ("torch", "transformers", "onnxruntime")
ROOMS = (
    "access",
    "api",
    "workers",
    "tasks",
    "config",
    "model_store",
    "cli",
    "bench",
    "batches",
    "webhooks",
    "protocols",
    "submission",
    "tracing",
)


def test_api_process_never_imports_a_model_framework():
    code = (
        "import sys\n"
        "from api import create_app\n"
        "from config.settings import Settings\n"
        "app = create_app(Settings.from_env({'AETHERCORE_REDIS_URL': 'redis://127.0.0.1:1/0'}))\n"
        "client = app.test_client()\n"
        "client.get('/openapi.json'); client.get('/health'); client.post('/serve', json={})\n"
        "import cli  # the whole admin CLI (manage.py)\n"
        f"print(sorted(m for m in {FRAMEWORKS!r} if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_design_card_layout_exists():
    for name in (
        "api",
        "workers",
        "tasks",
        "model_store",
        "config",
        "manage.py",
        "tests",
        "docker-compose.yml",
        "Dockerfile.api",
        "Dockerfile.worker",
        "requirements",
        "README.md",
        "docs/ARCHITECTURE.md",
    ):
        assert (REPO_ROOT / name).exists(), name


def test_the_architecture_document_names_every_module():
    text = (REPO_ROOT / "docs" / "ARCHITECTURE.md").read_text()
    missing = [
        str(path.relative_to(REPO_ROOT))
        for package in ROOMS
        for path in sorted((REPO_ROOT / package).rglob("*.py"))
        if path.name != "__init__.py" and f"`{path.relative_to(REPO_ROOT)}`" not in text
    ]
    assert missing == [], f"docs/ARCHITECTURE.md's module table does not name {missing}"


def test_the_architecture_document_states_the_import_contracts_in_order():
    """docs/ARCHITECTURE.md's "Layers" list names every import-linter contract of pyproject.toml, in its order
    (lint-imports checks the contracts themselves, in scripts/test.sh)."""
    import tomllib

    contracts = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    text = (REPO_ROOT / "docs" / "ARCHITECTURE.md").read_text()
    section = text[text.index("### Layers") : text.index("### Every module, by layer")]
    stated = [line.split("**")[1] for line in section.splitlines() if line[:1].isdigit() and "**" in line]
    assert stated == [contract["name"] for contract in contracts]


def test_the_submission_room_imports_nothing_above_it():
    """submission/ sits below the HTTP layer (issue 35): it imports config/, tasks/ and itself, never api/, flask,
    flask_smorest or workers/ (import-linter states the same for the whole tree)."""
    import ast

    above = ("api", "flask", "flask_smorest", "werkzeug", "workers", "cli", "bench")
    found = []
    for path in sorted((REPO_ROOT / "submission").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            found += [f"{path.relative_to(REPO_ROOT)}: {n}" for n in names if n.split(".")[0] in above]
    assert found == []
