"""A daemon thread that runs one function every few seconds until stopped: the shape of the
API process's background work (the reconciler, the webhook dispatcher)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable


class PeriodicThread:
    def __init__(self, name: str, interval_s: float, work: Callable[[], object]):
        self.interval_s = interval_s
        self.work = work
        self._log = logging.getLogger(f"squeeze.{name}")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.work()
            except Exception:  # a database or network hiccup must not end the thread
                self._log.exception("%s round failed; trying again", self._thread.name)
            self._stop.wait(self.interval_s)
