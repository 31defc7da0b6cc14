"""The batch product's two stores over one process's Redis: the files (read line by line, bytes kept as uploaded:
a client without decoding) and the batches, both charging what they keep to its owner (tasks/holdings.py). Built
by the API's app factory and by the batch driver process alike.

May import: config/, tasks/, batches/."""

from __future__ import annotations

import redis

from batches.files import FileStore
from batches.store import BatchStore
from config.settings import Settings
from tasks.holdings import Holdings
from tasks.redis_client import make_redis


def open_stores(settings: Settings, client: redis.Redis, holdings: Holdings) -> tuple[FileStore, BatchStore]:
    raw = make_redis(
        settings.redis_url, settings.redis_sentinel_master, **settings.redis_options(), decode_responses=False
    )
    return FileStore(client, raw, settings.files_ttl, holdings), BatchStore(client, settings.files_ttl, holdings)
