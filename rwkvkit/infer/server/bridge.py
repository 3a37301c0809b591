"""From the engine thread to asyncio: :class:`EventBridge` carries engine events onto each request's
``asyncio.Queue``; :func:`next_event` waits for one while watching the client; Server-Sent Events helpers.

The engine calls back on its own thread; a bridge per event loop carries the events with
``loop.call_soon_threadsafe``, one wake-up of the loop per batch of events (one per engine step instead of
one per token and request).
"""

from __future__ import annotations

import asyncio
import json
import threading
import weakref
from typing import Any

from fastapi import Request

DISCONNECT_POLL_S = 0.25  # how often a waiting non-streamed request checks that its client is still there
SSE_DONE = "data: [DONE]\n\n"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class ClientGone(Exception):
    """The HTTP client disconnected before its answer was ready."""


class EventBridge:
    """Carries engine events from the engine thread to asyncio queues on one event loop.

    ``post`` (engine thread) appends to a list and, unless a delivery is already scheduled, schedules one
    with ``loop.call_soon_threadsafe``; the delivery (loop thread) puts everything posted so far on
    its queues.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self._lock = threading.Lock()
        self._pending: list[tuple[asyncio.Queue, tuple]] = []
        self._scheduled = False

    def post(self, queue: asyncio.Queue, item: tuple) -> None:
        with self._lock:
            self._pending.append((queue, item))
            if self._scheduled:
                return
            self._scheduled = True
        try:
            self.loop.call_soon_threadsafe(self._deliver)
        except RuntimeError:  # the event loop is closed: nobody is waiting any more
            with self._lock:
                self._pending.clear()
                self._scheduled = False

    def _deliver(self) -> None:
        with self._lock:
            pending, self._pending, self._scheduled = self._pending, [], False
        for queue, item in pending:
            queue.put_nowait(item)


class EventBridges:
    """One :class:`EventBridge` per event loop (a loop that is gone takes its bridge with it)."""

    def __init__(self) -> None:
        self._bridges: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def current(self) -> EventBridge:
        """The bridge of the running event loop."""
        loop = asyncio.get_running_loop()
        bridge = self._bridges.get(loop)
        if bridge is None:
            bridge = self._bridges[loop] = EventBridge(loop)
        return bridge


async def next_event(http_request: Request, queue: asyncio.Queue) -> tuple[int | None, Any]:
    """The next (tag, event) on ``queue``; raises ClientGone if the client disconnects meanwhile."""
    while True:
        try:
            return await asyncio.wait_for(queue.get(), timeout=DISCONNECT_POLL_S)
        except asyncio.TimeoutError:
            if await http_request.is_disconnected():
                raise ClientGone from None


def sse(obj: dict) -> str:
    """One Server-Sent Event carrying ``obj`` as JSON."""
    return "data: " + json.dumps(obj, ensure_ascii=False, separators=(",", ":")) + "\n\n"
