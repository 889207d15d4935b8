"""A one-frame mailbox between a subscription callback and a worker thread.

The callback must never block or queue work: it ``put``s the newest frame, replacing any
frame the worker has not taken yet (that frame is counted as dropped).  Memory is bounded
to one frame whatever the input rate, and the worker always processes the newest frame,
never a stale one.  ROS-free (plain threading).
"""

from __future__ import annotations

import threading
from typing import Any, Optional


class LatestSlot:
    def __init__(self):
        self._cond = threading.Condition()
        self._item: Optional[Any] = None
        self._closed = False
        self.received = 0
        self.dropped = 0
        self.taken = 0

    def put(self, item: Any) -> bool:
        """Store ``item``; returns True when it replaced an unprocessed one (a drop)."""
        with self._cond:
            replaced = self._item is not None
            if replaced:
                self.dropped += 1
            self._item = item
            self.received += 1
            self._cond.notify()
            return replaced

    def take(self, timeout: Optional[float] = None) -> Optional[Any]:
        """The newest item (removing it), waiting up to ``timeout`` s; None if none/closed."""
        with self._cond:
            if self._item is None and not self._closed and timeout != 0:
                self._cond.wait_for(lambda: self._item is not None or self._closed, timeout)
            item, self._item = self._item, None
            if item is not None:
                self.taken += 1
            return item

    def discard(self) -> int:
        """Drop a pending item (e.g. on deactivate); returns how many were dropped (0/1)."""
        with self._cond:
            if self._item is None:
                return 0
            self._item = None
            self.dropped += 1
            return 1

    def count_drop(self) -> None:
        """Count a frame the worker took but skipped in favour of a newer one."""
        with self._cond:
            self.dropped += 1

    @property
    def pending(self) -> int:
        with self._cond:
            return 0 if self._item is None else 1

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def reopen(self) -> None:
        with self._cond:
            self._closed = False
