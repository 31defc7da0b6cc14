"""The project's Redis client serves as many threads at once as an API process has, against the real Redis."""

import threading

from tasks.redis_client import make_redis

# More than redis-py 8's default pool of 100, as many as an API process's default AETHERCORE_API_THREADS.
THREADS = 256


def test_every_thread_of_an_api_process_can_hold_a_connection_at_once(redis_server):
    client = make_redis(redis_server.url(3))
    started, outcomes = threading.Barrier(THREADS), []

    def call() -> None:
        started.wait()
        try:
            # Each blocking pop holds its connection for a second: all of them are out of the pool together.
            outcomes.append(client.blpop([f"nothing-{threading.get_ident()}"], timeout=1))
        except Exception as exc:
            outcomes.append(exc)

    threads = [threading.Thread(target=call) for _ in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert outcomes == [None] * THREADS
    client.close()
