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
        # Whether this process's thread is running: set before it starts, cleared as it ends. Read by every
        # request (several times); Thread.is_alive takes a lock each call, ~2 % of an API process's CPU per
        # /serve under gevent.
        self._running = False
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def ensure(self) -> bool:
        """Start the thread if this process has none yet, or if it died; True if it was started by this call
        (`reset` runs only for a new process: a restarted thread finds its owner's state as it was)."""
        pid = _pid
        if self._running and self._pid == pid:
            return False
        with self._lock:
            if self._running and self._pid == pid:
                return False
            if self._pid == pid:
                logger.error("the {} thread died; starting it again", self.name)
            else:
                self.reset()
            self._thread = threading.Thread(target=self._main, name=self.name, daemon=True)
            self._running, self._pid = True, pid
            try:
                self._thread.start()
            except BaseException:
                self._running = False
                raise
            return True

    def _main(self) -> None:
        try:
            self.target()
        finally:
            self._running = False
