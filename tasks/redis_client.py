"""Redis connections with short timeouts, so an unreachable Redis is an error in ~1 s, never a hang."""

from __future__ import annotations

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

CONNECT_TIMEOUT_S = 1.0
SOCKET_TIMEOUT_S = 5.0


def make_redis(url: str, **kwargs) -> redis.Redis:
    options = {
        "socket_connect_timeout": CONNECT_TIMEOUT_S,
        "socket_timeout": SOCKET_TIMEOUT_S,
        "health_check_interval": 30,
        "decode_responses": True,
        # redis-py 8 retries failed commands by default; one quick retry keeps failures fast.
        "retry": Retry(NoBackoff(), 1),
    }
    options.update(kwargs)
    return redis.Redis.from_url(url, **options)
