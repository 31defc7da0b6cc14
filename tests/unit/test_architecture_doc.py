"""docs/ARCHITECTURE.md tells the truth about the code: every module path it names exists, and its file-by-file walk
of one POST /serve names exactly the modules a real POST /serve enters in the API process (traced with
sys.setprofile over one request to a real app on a real Redis), in which the HTTP layer calls the submission once
and the submission never calls back up (issue 35)."""

from __future__ import annotations

import re
import sys
from collections import Counter
from types import FrameType
from typing import Any

from tests.conftest import DB_SCRATCH, client_for, settings_for
from tests.support import REPO_ROOT

DOC = REPO_ROOT / "docs" / "ARCHITECTURE.md"
# A path of ours in backquotes: `api/app.py`, `tasks/jobs/lua/`, `workers/runtimes/`.
_PATH = re.compile(r"`((?:api|submission|tasks|workers|config|cli|bench|model_store|deploy|docs|scripts)/[\w./-]*)`")
_PACKAGES = ("api/", "submission/", "tasks/", "config/")


def _walk() -> str:
    text = DOC.read_text()
    start = text.index("## One `/serve` request, file by file")
    return text[start : text.index("Then, in the worker and the model process:", start)]


def test_every_module_path_the_document_names_exists():
    named = set(_PATH.findall(DOC.read_text()))
    missing = sorted(path for path in named if not (REPO_ROOT / path.rstrip("/")).exists())
    assert missing == [], f"docs/ARCHITECTURE.md names paths that do not exist: {missing}"


def _layer(path: str) -> str:
    return path.split("/", 1)[0]


def test_the_walk_names_exactly_what_one_post_serve_enters(redis_server):
    # with a rate limit, so its counting and its headers are on the traced path too
    client = client_for(settings_for(redis_server.url(DB_SCRATCH), rate_limit="100000/minute"))
    body = {"model_id": "minilm", "inputs": {"text": "the walk"}}
    assert client.post("/serve", json=body).status_code == 202  # first use: caches and threads start
    root = f"{REPO_ROOT}/"
    entered: list[str] = []
    crossings: Counter[tuple[str, str]] = Counter()

    def ours(frame: FrameType | None) -> str | None:
        name = frame.f_code.co_filename if frame is not None else ""
        if not name.startswith(root) or "/.venv/" in name:
            return None
        path = name[len(root) :]
        return path if path.startswith(_PACKAGES) else None

    def profile(frame: FrameType, event: str, arg: Any) -> None:
        if event != "call":
            return
        callee = ours(frame)
        if callee is None:
            return
        entered.append(callee)
        caller = ours(frame.f_back)
        if caller is not None and _layer(caller) != _layer(callee):
            crossings[_layer(caller), _layer(callee)] += 1

    sys.setprofile(profile)
    try:
        response = client.post("/serve", json=body)
    finally:
        sys.setprofile(None)
    assert response.status_code == 202, response.get_json()

    walk = _walk()
    named = {path for path in _PATH.findall(walk) if path.endswith(".py")}
    assert set(entered) == named, (
        f"entered but not in the walk: {sorted(set(entered) - named)}; "
        f"in the walk but not entered: {sorted(named - set(entered))}"
    )
    assert crossings["api", "submission"] == 1, crossings  # Submitter.submit, once
    assert crossings["submission", "api"] == 0, crossings  # nothing below the HTTP layer calls it
