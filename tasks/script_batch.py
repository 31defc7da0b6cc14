"""Several Lua script calls in one round trip, without redis-py's extra one.

redis-py's pipeline sends `SCRIPT EXISTS` for its scripts before every `execute()`: a second round trip for each
batch of job transitions, chunk appends or batch-line answers (6 % of a worker's CPU at one client, and its
latency). Scripts are called here by their SHA alone (EVALSHA); when Redis has lost one (a restart without
persistence of the script cache, `SCRIPT FLUSH`), that call did not run and is run again alone, which loads the
script. The calls batched together are independent of one another (one per job or per line), so one run again
after the others is still run once. With replicated acknowledgement (tasks/redis_client.py), WAIT ends the round
trip, as it ends every Lua step.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import redis
from redis.commands.core import Script
from redis.exceptions import NoScriptError

from tasks.redis_client import check_acked


class ScriptBatch:
    """Pass as the `client` of a registered Script's call (`script(keys=..., args=..., client=batch)`) to queue
    it; `execute()` sends every queued call in one round trip and returns their replies in order, raising the
    first error after all ran (as `Pipeline.execute` does)."""

    def __init__(self, client: redis.Redis, scripts: Iterable[Script]) -> None:
        self._client = client
        self._scripts = {script.sha: script for script in scripts}
        self._calls: list[tuple[str, int, tuple[Any, ...]]] = []

    def evalsha(self, sha: str, numkeys: int, *keys_and_args: Any) -> ScriptBatch:
        """What a Script's call asks of its client: queued here, sent by `execute()`."""
        if sha not in self._scripts:
            raise ValueError("a script not given to this batch")
        self._calls.append((sha, numkeys, keys_and_args))
        return self

    def execute(self) -> list[Any]:
        if not self._calls:
            return []
        pipe = self._client.pipeline(transaction=False)
        for sha, numkeys, keys_and_args in self._calls:
            pipe.evalsha(sha, numkeys, *keys_and_args)
        replicas = getattr(self._client, "replicas_ack", 0)  # tasks/redis_client.py ReplicatedRedis
        if replicas:
            pipe.execute_command("WAIT", replicas, self._client.ack_timeout_ms)  # type: ignore[attr-defined]
        replies = pipe.execute(raise_on_error=False)
        if replicas:
            check_acked(replies.pop(), replicas)
        for at, reply in enumerate(replies):
            if isinstance(reply, NoScriptError):
                sha, numkeys, keys_and_args = self._calls[at]
                script = self._scripts[sha]
                replies[at] = script(keys=keys_and_args[:numkeys], args=keys_and_args[numkeys:], client=self._client)
        self._calls = []
        for reply in replies:
            if isinstance(reply, Exception):
                raise reply
        return replies
