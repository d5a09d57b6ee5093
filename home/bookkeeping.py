"""Record-keeping writes that must never keep an agent out.

Hello and heartbeats write what home *knows about* an instance (last seen,
reported versions, the socket table). None of it decides whether an enrolled
instance may connect, so when home's own disk fails (full, read-only, I/O
error) those writes are dropped or queued and the agent is let in anyway.

:class:`Bookkeeping` runs one such write and turns a storage failure into a
``False`` return, logging the outage once when it starts and once when writes
succeed again: a full disk costs two log lines, not a traceback every flush.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from tether.home.logs import event
from tether.home.sqlite import WRITE_ERRORS

log = logging.getLogger("tether.home.bookkeeping")
#: An outage ends after this long without a failed write: a nearly full disk lets
#: some small writes through, which must not make the log flap.
RESUME_SECONDS = 10.0


class Bookkeeping:
    """Runs best-effort writes; remembers whether the store is failing."""

    def __init__(self) -> None:
        self.failing: str | None = None
        self.dropped = 0
        self.last_failure = 0.0

    def write(self, what: str, func: Callable, *args) -> bool:
        """``func(*args)``; False (and logged once per outage) when the store fails."""
        try:
            func(*args)
        except WRITE_ERRORS as exc:
            self.dropped += 1
            self.last_failure = time.monotonic()
            if self.failing is None:
                self.failing = str(exc)
                event(log, logging.ERROR, "bookkeeping_suspended", what=what, error=str(exc),
                      hint="home's database cannot be written (free space in its state "
                      "directory); agents still connect, their last-seen and socket records "
                      "are kept in memory or dropped until writes succeed")
            return False
        if self.failing is not None and time.monotonic() - self.last_failure >= RESUME_SECONDS:
            event(log, logging.WARNING, "bookkeeping_resumed", dropped=self.dropped,
                  error=self.failing)
            self.failing, self.dropped = None, 0
        return True
