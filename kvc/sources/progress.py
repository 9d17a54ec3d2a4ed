"""Progress of a fetch, shared by its download threads and the agent's reports."""

from __future__ import annotations

import threading


class Progress:
    """Bytes and files done so far, shared by the download threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.bytes = 0
        self.files = 0
        self.total_bytes = 0

    def add(self, count: int) -> None:
        with self._lock:
            self.bytes += count

    def file_done(self) -> None:
        with self._lock:
            self.files += 1
