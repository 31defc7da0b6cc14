"""The error-code contract (tasks/errors.py): every code a job can end with has exactly one HTTP status, and no code
is spelt anywhere but there (issue 19, case 7: a table listed a code nothing produced, and real codes answered 500)."""

from __future__ import annotations

import ast
import importlib
import inspect

import pytest

from tasks import errors
from tasks.errors import CODES, HTTP_STATUS, error_body, http_status
from tests.support import REPO_ROOT

# Where job error codes are produced or read: the workers, the model store, the task contract and the API's
# inference path. (A submission's refusals, e.g. `validation_error`, are not job codes.)
PRODUCERS = ["workers", "model_store", "tasks", "submission", "api/submitting.py"]


def _sources():
    for entry in PRODUCERS:
        path = REPO_ROOT / entry
        for file in [path] if path.is_file() else sorted(path.rglob("*.py")):
            if file != REPO_ROOT / "tasks" / "errors.py":
                yield file, ast.parse(file.read_text(), str(file))


def _literal_codes(tree: ast.AST) -> list[tuple[int, str]]:
    """String literals in a code's place: `code = "..."`, `{"code": "..."}`, error_body("..."), a load or
    model-gone error's code argument, getattr(exc, "code", "...")."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "code" for t in node.targets):
            values = [node.value]
        elif isinstance(node, ast.Dict):
            values = [v for k, v in zip(node.keys, node.values) if isinstance(k, ast.Constant) and k.value == "code"]
        elif isinstance(node, ast.Call):
            name = getattr(node.func, "id", getattr(node.func, "attr", ""))
            if name in ("error_body", "ModelGone"):
                values = node.args[:1]
            elif name == "ModelLoadError":
                values = node.args[1:2] + [k.value for k in node.keywords if k.arg == "code"]
            elif name == "getattr" and len(node.args) == 3:
                values = (
                    node.args[2:] if isinstance(node.args[1], ast.Constant) and node.args[1].value == "code" else []
                )
            else:
                values = []
        else:
            values = []
        found += [(v.lineno, v.value) for v in values if isinstance(v, ast.Constant) and isinstance(v.value, str)]
    return found


def test_every_code_has_one_http_status():
    assert CODES == set(HTTP_STATUS)
    constants = {v for k, v in vars(errors).items() if k.isupper() and isinstance(v, str)}
    assert constants == CODES, "a code constant without a status, or a status for no constant"
    for code, status in HTTP_STATUS.items():
        assert status in (400, 404, 409, 500, 503, 504), (code, status)
    assert errors.LOAD_ERRORS <= CODES and errors.MODEL_GONE <= CODES


def test_the_codes_issue_19_found_missing_answer_their_own_status():
    assert http_status(errors.MODEL_ARTIFACT_REJECTED) == 503  # answered 500 before
    assert http_status(errors.MODEL_LOAD_TIMEOUT) == 503
    assert http_status(errors.MODEL_NOT_LOADED) == 409
    assert http_status(errors.MODEL_TIMEOUT) == 504
    assert http_status(errors.MODEL_UNLOADED) == http_status(errors.MODEL_EVICTED) == 503
    assert "artifact_mismatch" not in CODES  # listed before, produced by nothing
    assert http_status("something_else") == 500


def test_no_code_is_spelt_outside_the_contract():
    literals = [
        f"{file.relative_to(REPO_ROOT)}:{line}: {value!r}"
        for file, tree in _sources()
        for line, value in _literal_codes(tree)
    ]
    assert literals == [], "use the constants of tasks/errors.py"


def test_every_code_a_producer_names_is_in_the_contract():
    """Every name a producer imports from tasks/errors.py is a code with a status (or the contract's helpers)."""
    helpers = {"CODES", "HTTP_STATUS", "LOAD_ERRORS", "MODEL_GONE", "error_body", "http_status"}
    used = set()
    for _file, tree in _sources():
        nodes = list(ast.walk(tree))
        aliases = {  # `from tasks import errors [as name]`
            alias.asname or alias.name
            for n in nodes
            if isinstance(n, ast.ImportFrom) and n.module == "tasks"
            for alias in n.names
            if alias.name == "errors"
        }
        for node in nodes:
            if isinstance(node, ast.ImportFrom) and node.module == "tasks.errors":
                used |= {alias.name for alias in node.names}
            elif isinstance(node, ast.Attribute) and getattr(node.value, "id", None) in aliases:
                used.add(node.attr)
    assert used - helpers, "nothing imports the contract?"
    for name in used - helpers:
        assert getattr(errors, name) in CODES, name


@pytest.mark.parametrize(
    "module",
    [
        "model_store.paths",
        "model_store.verify",
        "workers.batcher",
        "workers.cache",
        "workers.model_errors",
        "workers.residency",
    ],
)
def test_every_exception_that_ends_a_job_carries_a_contract_code(module):
    for _name, cls in inspect.getmembers(importlib.import_module(module), inspect.isclass):
        code = cls.__dict__.get("code")
        if isinstance(code, str):
            assert code in CODES, (module, cls.__name__, code)


def test_error_body_refuses_a_code_outside_the_contract():
    assert error_body(errors.MODEL_UNLOADED, "gone") == {"code": "model_unloaded", "message": "gone"}
    with pytest.raises(ValueError):
        error_body("artifact_mismatch", "x")
