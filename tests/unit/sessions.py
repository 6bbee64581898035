"""A real ONNX Runtime session that counts its runs, and can hold them, so a test can tell what ran when."""

from __future__ import annotations

import threading


class CountingSession:
    """Wraps a real session: `rows` holds the row count of each run, in order. With `gate`, every run waits until
    the test sets it (`started` is released as each run begins), so requests can be queued behind a run."""

    def __init__(self, session, gate: threading.Event | None = None) -> None:
        self._session = session
        self.gate = gate
        self.rows: list[int] = []
        self.names: list[list[str]] = []
        self.started = threading.Semaphore(0)
        self._lock = threading.Lock()

    def get_outputs(self):
        return self._session.get_outputs()

    def run(self, names, feeds):
        with self._lock:
            self.rows.append(len(next(iter(feeds.values()))))
            self.names.append(list(names))
        self.started.release()
        if self.gate is not None:
            self.gate.wait(30)
        return self._session.run(names, feeds)
