"""The admission gate: counts the inference calls in flight and turns new ones away once the server drains.

Graceful shutdown (ortserve.server.app) closes the gate -- new inference calls get ShuttingDown (UNAVAILABLE)
while health and metadata still answer, so clients can see NOT_SERVING -- then waits for the calls in flight.
"""

from __future__ import annotations

import asyncio
import logging

from ortserve.server.errors import ShuttingDown

log = logging.getLogger(__name__)


class Gate:
    def __init__(self) -> None:
        self.draining = False
        self.in_flight = 0
        self.admitted = 0
        self._idle = asyncio.Event()
        self._idle.set()

    def admit(self) -> "Gate":
        """`with gate.admit():` around an inference call (a plain context manager: it is on every call's path)."""
        if self.draining:
            raise ShuttingDown("the server is shutting down and takes no new requests; retry on another replica")
        return self

    def __enter__(self) -> None:
        self.in_flight += 1
        self.admitted += 1
        self._idle.clear()
        if log.isEnabledFor(logging.DEBUG):
            log.debug("admitted call #%d (%d in flight)", self.admitted, self.in_flight)

    def __exit__(self, *exc) -> None:
        self.in_flight -= 1
        if self.in_flight == 0:
            self._idle.set()

    def close(self) -> None:
        self.draining = True

    async def wait_idle(self, timeout: float | None) -> bool:
        """True when every admitted call has finished within `timeout` seconds."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
            return True
        except asyncio.TimeoutError:
            return False
