"""A job ends through ONE function, `Lifecycle.end_jobs` (tasks/jobs/lifecycle.py), with a code of the contract
(tasks/errors.py): its callers are listed here from the source (an AST scan of api/, submission/, workers/, tasks/,
cli/), nothing else runs the Lua transition or writes a job's status, and a code outside the contract is refused
before anything is written (issue 35: `broker_unavailable` was written by the API while the contract did not know
it)."""

from __future__ import annotations

import ast
import re

import pytest

from config.values import REPO_ROOT
from tasks.errors import BROKER_UNAVAILABLE, CODES, INTERNAL_ERROR, POISON_JOB, http_status
from tasks.jobs import Jobs
from tasks.jobs.inflight import requeue_payload
from tasks.jobs.lifecycle import JobEnd
from tasks.jobs.scripts import LUA_DIR
from tasks.names import INFER, job_key
from tasks.states import FAILED, QUEUED, RUNNING, SUCCEEDED

TREES = ("api", "submission", "batches", "webhooks", "protocols", "workers", "tasks", "cli")
LIFECYCLE = "tasks/jobs/lifecycle.py"
# Who ends a job: a worker (every end it or its reaper decides goes through Completion.finish), the API for a job
# whose message could not be queued, and a cancel of a job still queued (DELETE /jobs, a closed stream, a protocol's
# wait that ended, the batch driver: all through Lifecycle.request_cancel).
END_CALLERS = {
    "submission/submitter.py:Submitter._create_then_send",
    "tasks/jobs/lifecycle.py:Lifecycle.request_cancel",
    "workers/completion.py:Completion._write_ends",
}


def _modules() -> dict[str, ast.Module]:
    return {
        str(path.relative_to(REPO_ROOT)): ast.parse(path.read_text(), str(path))
        for tree in TREES
        for path in sorted((REPO_ROOT / tree).rglob("*.py"))
    }


def _nodes(module: ast.Module) -> list[tuple[str, ast.AST]]:
    """Every node of a module, with the qualified name of the function (or class) it is in."""
    found: list[tuple[str, ast.AST]] = []

    def visit(node: ast.AST, scope: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                visit(child, f"{scope}.{child.name}" if scope else child.name)
            else:
                found.append((scope, child))
                visit(child, scope)

    visit(module, "")
    return found


def _calls(module: ast.Module) -> list[tuple[str, ast.Call]]:
    return [(scope, node) for scope, node in _nodes(module) if isinstance(node, ast.Call)]


def _callee(call: ast.Call) -> str:
    func = call.func
    return func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""


def _constants(node: ast.AST) -> set[str]:
    return {n.value for n in ast.walk(node) if isinstance(n, ast.Constant) and isinstance(n.value, str)}


def test_every_caller_of_the_one_end_function_is_known():
    callers = {
        f"{path}:{scope}"
        for path, module in _modules().items()
        for scope, call in _calls(module)
        if _callee(call) == "end_jobs"
    }
    assert callers == END_CALLERS


def test_only_the_end_function_runs_the_lua_transition_to_an_end():
    modules = _modules()
    # The transition script is registered and run in lifecycle.py alone (scripts.py renders it).
    named = sorted(
        path
        for path, module in modules.items()
        for node in ast.walk(module)
        if (isinstance(node, ast.ImportFrom) and any(a.name == "TRANSITION" for a in node.names))
        or (isinstance(node, ast.Attribute) and node.attr == "TRANSITION")
    )
    assert named == [LIFECYCLE]
    # In lifecycle.py: the script runs in `_transitions` only, which `mark_running_many` and `end_jobs` call, and an
    # end's arguments (event "done") are built by `_end_args` only, which only `end_jobs` calls.
    calls = _calls(modules[LIFECYCLE])
    assert {scope for scope, call in calls if _callee(call) == "_transition"} == {"Lifecycle._transitions"}
    assert {scope for scope, call in calls if _callee(call) == "_transitions"} == {
        "Lifecycle.mark_running_many",
        "Lifecycle.end_jobs",
    }
    assert {scope for scope, call in calls if _callee(call) == "_end_args"} == {"Lifecycle.end_jobs"}
    done = {
        scope for scope, node in _nodes(modules[LIFECYCLE]) if isinstance(node, ast.Constant) and node.value == "done"
    }
    assert done == {"Lifecycle._end_args"}


def test_nothing_else_writes_a_jobs_status():
    """No Python code sets a job hash's `status` (HSET on `job_key(...)` naming "status"), and of the job store's
    Lua only transition.lua writes a status other than queued or running (the reaper's scripts requeue)."""
    written = []
    for path, module in _modules().items():
        for scope, node in _calls(module):
            hset = _callee(node) in ("hset", "hsetnx", "hmset") or "HSET" in _constants(node)
            on_job = any(isinstance(n, ast.Call) and _callee(n) == "job_key" for n in ast.walk(node))
            if hset and on_job and "status" in _constants(node):
                written.append(f"{path}:{scope}")
    assert written == []
    status_write = re.compile(r"'HSET',\s*[^,]+,\s*'status',\s*([^,)]+)")
    for script in sorted(LUA_DIR.glob("*.lua")):
        values = set(status_write.findall(script.read_text()))
        if script.name != "transition.lua":
            assert values <= {"$QUEUED", "$RUNNING"}, (script.name, values)
    embedded = [  # Lua kept in Python strings elsewhere never names a job's key
        path
        for path, module in _modules().items()
        if not path.startswith("tasks/jobs/")
        for text in _constants(module)
        if "redis.call" in text and ("JOB_PREFIX" in text or job_key("") in text)
    ]
    assert embedded == []


@pytest.fixture()
def jobs(scratch_redis):
    return Jobs(scratch_redis, ttl_s=60)


def running(jobs: Jobs) -> str:
    job_id = jobs.records.create(kind="inference", model_id="m", device="cpu")["job_id"]
    assert jobs.lifecycle.mark_running(job_id, "w", requeue_payload(INFER, "cpu", {"model_id": "m", "jobs": []})) == 1
    return job_id


@pytest.mark.parametrize(
    "end",
    [
        JobEnd("?", FAILED, "broker_down", "a code the contract does not know"),
        JobEnd("?", FAILED),  # a failure without a code
        JobEnd("?", SUCCEEDED, INTERNAL_ERROR, "a success with a code"),
        JobEnd("?", RUNNING),  # not an end
        JobEnd("?", QUEUED, POISON_JOB),
    ],
)
def test_an_end_outside_the_contract_is_refused_and_nothing_is_written(jobs, end):
    fine, refused = running(jobs), running(jobs)
    ends = [JobEnd(fine, SUCCEEDED, result={"output": 1}), JobEnd(refused, end.status, end.code, end.message)]
    with pytest.raises(ValueError):
        jobs.lifecycle.end_jobs(ends)
    assert [jobs.records.get(job_id)["status"] for job_id in (fine, refused)] == [RUNNING, RUNNING]


def test_every_code_of_the_contract_ends_a_job(jobs):
    ends = [JobEnd(running(jobs), FAILED, code, f"ended {code}") for code in sorted(CODES)]
    assert jobs.lifecycle.end_jobs(ends) == [True] * len(CODES)
    assert [jobs.records.get(end.job_id)["error"]["code"] for end in ends] == sorted(CODES)


def test_broker_unavailable_is_a_code_of_the_contract_answering_503():
    assert BROKER_UNAVAILABLE == "broker_unavailable" and BROKER_UNAVAILABLE in CODES
    assert http_status(BROKER_UNAVAILABLE) == 503  # the status table answered 500 while the live error answered 503
