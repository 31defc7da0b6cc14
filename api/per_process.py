"""A background thread started once in each process that uses it.

gunicorn forks its workers after the app (and the objects owning these threads) exist: a thread started
in the master would not exist in the workers, so each owner starts its thread on first use, per pid.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable


class PerProcessThread:
    def __init__(self, name: str, target: Callable[[], None], reset: Callable[[], None]) -> None:
        self.name = name
        self.target = target
        self.reset = reset  # clears the owner's per-process state before the thread starts
        self._pid: int | None = None
        self._lock = threading.Lock()

    def ensure(self) -> bool:
        """Start the thread if this process has none yet; True if it was started by this call."""
        pid = os.getpid()
        if self._pid == pid:
            return False
        with self._lock:
            if self._pid == pid:
                return False
            self.reset()
            threading.Thread(target=self.target, name=self.name, daemon=True).start()
            self._pid = pid
            return True
