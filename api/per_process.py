"""A background thread started once in each process that uses it.

gunicorn forks its workers after the app (and the objects owning these threads) exist: a thread started
in the master would not exist in the workers, so each owner starts its thread on first use, per pid.

The owners' loops catch what they can, but a thread that dies all the same (an error nothing caught) is
started again by the next `ensure()`, keeping the owner's state: it serves every request of the process,
so it must not stay dead until a restart.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable

from loguru import logger

# This process's pid, kept current across fork: `ensure` runs several times per request, and os.getpid() is a
# system call each time.
_pid = os.getpid()


def _forked() -> None:
    global _pid
    _pid = os.getpid()


os.register_at_fork(after_in_child=_forked)


class PerProcessThread:
    def __init__(self, name: str, target: Callable[[], None], reset: Callable[[], None]) -> None:
        self.name = name
        self.target = target
        self.reset = reset  # clears the owner's per-process state before the thread starts
        self._pid: int | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def ensure(self) -> bool:
        """Start the thread if this process has none yet, or if it died; True if it was started by this call
        (`reset` runs only for a new process: a restarted thread finds its owner's state as it was)."""
        pid = _pid
        if self._pid == pid and self._thread is not None and self._thread.is_alive():
            return False
        with self._lock:
            if self._pid == pid and self._thread is not None and self._thread.is_alive():
                return False
            if self._pid == pid:
                logger.error("the {} thread died; starting it again", self.name)
            else:
                self.reset()
            self._thread = threading.Thread(target=self.target, name=self.name, daemon=True)
            self._thread.start()
            self._pid = pid
            return True
