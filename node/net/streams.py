"""Pre-opened streams, so no request waits for stream negotiation.

Opening a libp2p stream costs a multistream-select round trip and a few
yamux frames (about 2.5 ms on loopback, a network RTT on a real one). The
gateway keeps a couple of negotiated, idle ``/gpunexus/infer/1`` streams to
each host it used recently and opens a replacement in the background each
time one is taken, so the request path only writes its order.

A spare is only an open stream: the host waits for an order on it (up to
its idle limit) and has promised nothing. A spare that turns out dead is
noticed on the first write, and the caller falls back to a fresh stream.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable

import trio
from gpunexus.protocol.messages import Offer

from .wire import FramedStream

log = logging.getLogger(__name__)

SPARES_PER_HOST = 2
"""Spares kept for a host in steady, sequential use."""
MAX_SPARES_PER_HOST = 32
"""Most spares kept for a host that gets bursts of concurrent requests."""
DEMAND_WINDOW = 10.0
"""The most requests in flight to a host at once within this many seconds sets how many spares it gets.

A burst of N concurrent requests otherwise pays N - 2 stream negotiations on
the request path, one after another on the CPU (at 32 concurrent streams that
was a large share of the added time to first token in bench/relay.py). The
replacements are opened after the first token, as always, so a burst's
spares are ready for the next burst.
"""
MAX_IDLE_AGE = 20.0
"""Spares older than this are closed: well under the host's idle limit."""


class StreamPool:
    def __init__(self, opener: Callable[[Offer], Awaitable[FramedStream]], nursery: trio.Nursery) -> None:
        self._open = opener
        self._nursery = nursery
        self._spares: dict[str, list[tuple[float, FramedStream]]] = {}
        self._opening: dict[str, int] = {}
        self._busy: dict[str, int] = {}
        self._peaks: dict[str, deque[tuple[float, int]]] = {}

    def take(self, offer: Offer) -> FramedStream | None:
        """A fresh-enough spare for this host, if any.

        Call :meth:`refill` once the request no longer waits on its first
        token: opening a replacement costs as much CPU as the request's own
        first round trip, so it must not compete with it.
        """
        spares = self._spares.get(offer.peer_id, [])
        found = None
        now = time.monotonic()
        busy = self._busy[offer.peer_id] = self._busy.get(offer.peer_id, 0) + 1
        peaks = self._peaks.setdefault(offer.peer_id, deque())
        peaks.append((now, busy))
        while now - peaks[0][0] > DEMAND_WINDOW:
            peaks.popleft()
        while spares:
            born, stream = spares.pop(0)
            if now - born < MAX_IDLE_AGE:
                found = stream
                break
            self._nursery.start_soon(stream.close)
        return found

    def release(self, offer: Offer) -> None:
        """The request that called :meth:`take` for this host is over."""
        self._busy[offer.peer_id] = max(0, self._busy.get(offer.peer_id, 0) - 1)

    def forget(self, peer_id: str) -> None:
        self._peaks.pop(peer_id, None)
        for _, stream in self._spares.pop(peer_id, []):
            self._nursery.start_soon(stream.reset)

    def refill(self, offer: Offer) -> None:
        have = len(self._spares.get(offer.peer_id, ())) + self._opening.get(offer.peer_id, 0)
        peak = max((n for _, n in self._peaks.get(offer.peer_id, ())), default=0)
        want = min(MAX_SPARES_PER_HOST, max(SPARES_PER_HOST, peak))
        for _ in range(want - have):
            self._opening[offer.peer_id] = self._opening.get(offer.peer_id, 0) + 1
            self._nursery.start_soon(self._open_spare, offer)

    async def _open_spare(self, offer: Offer) -> None:
        try:
            stream = await self._open(offer)
        except Exception as exc:  # a spare is an optimisation: failing to make one is not an error
            log.debug("no spare stream to %s: %s", offer.peer_id, exc)
            return
        finally:
            self._opening[offer.peer_id] -= 1
        self._spares.setdefault(offer.peer_id, []).append((time.monotonic(), stream))
