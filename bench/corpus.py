"""A fixed corpus of short English-like sentences with realistic length spread (seeded, no download)."""

from __future__ import annotations

import random

_WORDS = (
    "model serving queue worker batch latency throughput memory device request response token sentence "
    "embedding vector redis celery flask cluster replica resident cache budget eviction stream chunk client "
    "server health metric operator deploy scale node thread process kernel tensor shape layer attention "
    "the a of to and in is it that for on with as was by be this are from at or an have not but they "
    "quick brown fox jumps over lazy dog bright morning river mountain city winter summer music story "
    "people every small large early late simple complex careful honest measured fast slow steady"
).split()


def corpus(n: int = 3000, seed: int = 7) -> list[str]:
    rng = random.Random(seed)
    sentences = []
    for _ in range(n):
        # Mostly short, some long: the spread padding-aware batching can exploit.
        length = min(40, max(3, int(rng.lognormvariate(2.2, 0.4))))
        words = [rng.choice(_WORDS) for _ in range(length)]
        sentences.append(" ".join(words).capitalize() + ".")
    return sentences
