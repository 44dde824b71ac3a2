"""The gateway's sessions: one per host, opened on first use, ended when idle.

Every request to a host goes on its one session (node/net/session.py), so no
request pays a stream negotiation once the session is up, and the frames
of all requests to that host are shared. The first request to a host opens
the stream asking for ``/gpunexus/session/1`` first and ``/gpunexus/infer/1``
second: a host that predates sessions picks the second, that stream serves
the request as it always did, and the host is remembered as one to reach
by per-request streams (node/net/streams.py) for ``LEGACY_RECHECK_S``, so old
and new peers interoperate without a wasted round trip.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import trio
from gpunexus.protocol.messages import INFER_PROTOCOL, Offer
from gpunexus.protocol.session import SESSION_PROTOCOL

from .session import MAX_BUFFERED_BYTES, Channel, Session
from .wire import FramedStream

log = logging.getLogger(__name__)

IDLE_S = 60.0
"""A session with no request open for this long is ended (the next request opens a new one)."""
LEGACY_RECHECK_S = 600.0
"""How long a host that answered with per-request streams is not asked for a session again (it may upgrade)."""

Opener = Callable[[Offer, list[str]], Awaitable[Any]]
"""Opens a libp2p stream to the offer's host, negotiating the first of the protocols it speaks."""


class SessionPool:
    def __init__(self, opener: Opener, nursery: trio.Nursery, *, idle_s: float = IDLE_S, max_buffered: int = MAX_BUFFERED_BYTES) -> None:
        self._open_stream = opener
        self._max_buffered = max_buffered
        self._nursery = nursery
        self._idle_s = idle_s
        self._sessions: dict[str, Session] = {}
        self._opening: dict[str, trio.Event] = {}
        self._legacy: dict[str, float] = {}
        nursery.start_soon(self._end_idle)

    def speaks_sessions(self, peer_id: str) -> bool:
        """False for a host that recently answered with per-request streams only."""
        until = self._legacy.get(peer_id)
        if until is None:
            return True
        if trio.current_time() >= until:
            del self._legacy[peer_id]
            return True
        return False

    def has_session(self, peer_id: str) -> bool:
        return peer_id in self._sessions

    @property
    def open_sessions(self) -> int:
        return len(self._sessions)

    async def open(self, offer: Offer) -> Channel | FramedStream:
        """A channel for one request on this host's session, opened now if there is none.

        A host that speaks only per-request streams gets the stream opened
        for its session as that request's own stream. Raises what opening a
        stream raises (the host is unreachable).
        """
        peer_id = offer.peer_id
        while True:
            session = self._sessions.get(peer_id)
            if session is not None and session.broken is None:
                return session.open()
            opening = self._opening.get(peer_id)
            if opening is None:
                break
            await opening.wait()  # another request is opening it; use that one (or try again if it failed)
        self._opening[peer_id] = done = trio.Event()
        try:
            stream = await self._open_stream(offer, [SESSION_PROTOCOL, INFER_PROTOCOL])
            if stream.get_protocol() != SESSION_PROTOCOL:
                log.info("host %s speaks only per-request streams", peer_id)
                self._legacy[peer_id] = trio.current_time() + LEGACY_RECHECK_S
                return FramedStream(stream)
            session = Session(stream, max_buffered=self._max_buffered)
            self._sessions[peer_id] = session
            self._nursery.start_soon(self._run, peer_id, session)
            return session.open()
        finally:
            del self._opening[peer_id]
            done.set()

    def forget(self, peer_id: str) -> None:
        """The host is unreachable: end its session (the next request opens a fresh one)."""
        session = self._sessions.pop(peer_id, None)
        if session is not None:
            self._nursery.start_soon(session.close)

    async def _run(self, peer_id: str, session: Session) -> None:
        try:
            await session.run()
        finally:
            if self._sessions.get(peer_id) is session:
                del self._sessions[peer_id]
            log.debug("session with %s ended: %s", peer_id, session.broken)

    async def _end_idle(self) -> None:
        while True:
            await trio.sleep(self._idle_s / 2)
            now = trio.current_time()
            for peer_id, session in list(self._sessions.items()):
                if not session.open_requests and now - session.idle_since >= self._idle_s:
                    del self._sessions[peer_id]
                    await session.close()
