"""Sessions: every request between one gateway and one host on one stream.

A :class:`Session` runs a ``/gpunexus/session/1`` stream (wire format in
:mod:`gpunexus.protocol.session`) and hands out a :class:`Channel` per
request. A channel answers the calls a :class:`~.wire.FramedStream` does
(``send``, ``receive``, ``receive_ready``, ``close``, ``reset``), so the
host's order handling and the gateway's relay are the same code on a
session and on a per-request stream.

The write window is shared: one writer task per session sends whatever
every request has ready as one frame. A send on an idle session goes out at
once (the writer is waiting for it), so no first token waits for a batch;
sends that arrive while a frame is being written go in the next one. A
send returns when its frame is written, which is how a host keeps
coalescing a request's tokens into one chunk while the previous one is on
the wire, as it does on a per-request stream.

One request never holds up another. Reading never waits on a request: the
reader files each message under its request and moves on. A request whose
reader (a slow HTTP client, on the gateway) falls more than
``max_buffered`` bytes behind is cut: its channel raises
:class:`ReaderTooSlow` and the peer gets a reset for it, while the other
requests go on. Cancelling one request (a client that went away) posts a
reset for it and touches nothing else. Writes are never cancelled half-way:
a frame is written by the writer task or, on an idle session, by its sender
inside a shield, so a request's deadline ends its own wait, not a frame
other requests share.

Reading stays on the one reader task even for a lone request, whose own
task could read the stream and skip the hand-off through its inbox:
measured (bench/session.py, one fast request, 50 alternated rounds), that
saves about 2% of the CPU per chunk with no care for cancellation at all,
and a read that a cancelled request cannot cut short (shielded: the
stream's read awaits again after it took the bytes) costs more than it
saves. What a lone request pays over a per-request stream (about 1.1-1.2x)
is mostly the shield around its direct write (about 8%) and the batch
around each message.

A broken session (stream reset, connection lost, a frame that is not a
batch) ends every channel on it with :class:`~.wire.PeerGone`, exactly as
each per-request stream would have ended, so failover is unchanged.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Awaitable, Callable
from typing import TypeVar

import trio
from gpunexus.protocol.codec import Message, decode
from gpunexus.protocol.errors import ProtocolError
from gpunexus.protocol.messages import Error
from gpunexus.protocol.session import END, MAX_SESSION_FRAME_BYTES, MESSAGE, RESET, SESSION_REQUEST, Entry, decode_batch, encode_frames

from .wire import FramedStream, PeerGone

log = logging.getLogger(__name__)

M = TypeVar("M", bound=Message)

MAX_BUFFERED_BYTES = 8 * 1024 * 1024
"""Most message bytes a request may have waiting for its reader before it is cut.

A whole largest message (one frame) always fits: a reader is only ever cut
for falling behind, never for one big message.
"""
MAX_OPEN_REQUESTS = 1024
"""Requests one session may have open at a host; more are refused as busy."""
WRITE_TIMEOUT = 30.0
"""Longest a frame may wait for the peer to take it; past it the session is broken (the peer stopped reading)."""
HOST_IDLE_S = 300.0
"""A host ends a session that has had no request open for this long (gateways end theirs sooner)."""


_PEER_DONE = "stream ended"
"""Why a channel is over for reading when the peer sent END: it may still be written to (a host's END crossing ours)."""


class ReaderTooSlow(Exception):
    """This request's reader fell too far behind its stream; the request was cut to bound memory."""


class _Flush:
    """One frame's worth of sends: set once it is written, or failed with why."""

    __slots__ = ("done", "error")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.error: str | None = None


class Channel:
    """One request on a session, used like a FramedStream."""

    __slots__ = ("_session", "request", "stream", "_inbox", "_buffered", "_arrived", "_ended", "_closed", "_cut")

    def __init__(self, session: Session, request: int) -> None:
        self._session = session
        self.request = request
        self.stream = session.stream
        """The session's libp2p stream (the gateway asks whether its connection is going down)."""
        self._inbox: deque[bytes] = deque()
        self._buffered = 0
        self._arrived: trio.Event | None = None
        self._ended: str | None = None
        """Why the peer's side is over (it ended or reset the request, the session broke), once it is."""
        self._cut = False
        self._closed = False

    async def send(self, msg: Message) -> None:
        if self._ended is not None and self._ended != _PEER_DONE:
            raise PeerGone(f"stream closed while sending: {self._ended}")
        if self._closed:
            raise PeerGone("stream closed while sending: closed here")
        body = msg.encode()
        if not self.request:
            self._session.number(self)  # no await from here to the write: ids reach the wire in order
        await self._session.write(Entry(self.request, MESSAGE, body))

    async def receive(self) -> Message:
        """The next message; PeerGone once the peer is done, ReaderTooSlow once cut, ProtocolError on garbage."""
        while not self._inbox:
            self._raise_if_over()
            self._arrived = trio.Event()
            await self._arrived.wait()
        return self._take()

    def receive_ready(self) -> Message | None:
        return self._take() if self._inbox else None

    async def receive_as(self, cls: type[M]) -> M:
        msg = await self.receive()
        if not isinstance(msg, cls):
            raise ProtocolError(f"expected {cls.TYPE}, got {msg.TYPE}")
        return msg

    async def close(self) -> None:
        """Done with this request; the peer hears END unless it is already gone."""
        self._finish(END)

    async def reset(self) -> None:
        """Abandon this request; the peer hears RESET unless it is already gone."""
        self._finish(RESET)

    def _take(self) -> Message:
        body = self._inbox.popleft()
        self._buffered -= len(body)
        return decode(body)

    def _raise_if_over(self) -> None:
        if self._cut:
            raise ReaderTooSlow("the client read the stream too slowly; the request was cut")
        if self._ended is not None:
            raise PeerGone(self._ended)

    def _finish(self, op: int) -> None:
        if self._closed:
            return
        self._closed = True
        self._session.forget(self)
        if self._ended is None and self.request:
            self._session.post(Entry(self.request, op))

    # --- called by the session's reader ----------------------------------
    def _deliver(self, body: bytes) -> bool:
        """File one message for the reader; False when that would put it too far behind."""
        if self._inbox and self._buffered + len(body) > self._session.max_buffered:
            return False
        self._inbox.append(body)
        self._buffered += len(body)
        self._wake()
        return True

    def _end(self, reason: str) -> None:
        if self._ended is None:
            self._ended = reason
        self._wake()

    def _cut_off(self) -> None:
        """Cut for falling behind: what waited is dropped (that is the point), the next receive says why."""
        self._inbox.clear()
        self._buffered = 0
        self._cut = True
        self._end("cut")

    def _wake(self) -> None:
        if self._arrived is not None:
            self._arrived.set()
            self._arrived = None


Accept = Callable[[Channel], Awaitable[None]]
"""A host's handler for a request that arrived on a session (runs in the session's nursery)."""


class Session:
    """Both ends of a session: the gateway opens channels, the host accepts them (see the module docstring)."""

    def __init__(self, stream, *, max_buffered: int = MAX_BUFFERED_BYTES, idle_timeout: float = HOST_IDLE_S) -> None:
        self.framed = FramedStream(stream, max_frame=MAX_SESSION_FRAME_BYTES)
        self.stream = stream
        self.max_buffered = max_buffered
        self.idle_timeout = idle_timeout
        self._channels: dict[int, Channel] = {}
        self._last_request = 0
        self._pending: list[Entry] = []
        self._flush = _Flush()
        self._writing: _Flush | None = None
        """The flush of the frame being written now, if any."""
        self._wake = trio.Event()
        self.broken: str | None = None
        """Why the session is over, once it is."""
        self.frames_sent = 0
        self.entries_sent = 0
        """Entries per frame is how much the shared write window saves (bench/session.py prints it)."""
        self.idle_since = trio.current_time()
        self._run_scope: trio.CancelScope | None = None

    @property
    def open_requests(self) -> int:
        return len(self._channels)

    # --- gateway side ------------------------------------------------------
    def open(self) -> Channel:
        """A channel for a new request (the gateway's side); PeerGone if the session is over.

        Its request id is given on its first send, not here: a host takes an
        id at or below the last it saw for a finished request, so ids must
        reach the wire in the order they were given, whatever order the
        requests' tasks then run in.
        """
        if self.broken is not None:
            raise PeerGone(f"session ended: {self.broken}")
        return Channel(self, 0)

    def number(self, channel: Channel) -> None:
        self._last_request += 1
        channel.request = self._last_request
        self._channels[channel.request] = channel

    async def run(self, accept: Accept | None = None) -> None:
        """Read and write until the stream ends or breaks; with ``accept``, take the peer's requests (the host's side).

        Returns when the session is over; every channel still open has then
        been ended with the reason.
        """
        try:
            async with trio.open_nursery() as nursery:
                self._run_scope = nursery.cancel_scope
                nursery.start_soon(self._write_loop)
                if accept is not None:
                    nursery.start_soon(self._end_when_idle)
                try:
                    await self._read_loop(nursery, accept)
                finally:
                    nursery.cancel_scope.cancel()
        finally:
            self._fail(self.broken or "session ended")

    async def close(self) -> None:
        """End the session (an idle gateway's; a host's after the peer is done); ``run`` returns without waiting for the peer."""
        self._fail("session closed")
        await self.framed.close()
        if self._run_scope is not None:
            self._run_scope.cancel()

    # --- writing -----------------------------------------------------------
    async def write(self, entry: Entry) -> None:
        """Send ``entry`` in the next frame and wait until that frame is written.

        On a session nobody is writing on, the caller writes its own frame at
        once (shielded, so its deadline cannot cut the frame in half; bounded
        by ``WRITE_TIMEOUT``): that saves two task switches per chunk at low
        load. Entries that arrive meanwhile go in the writer task's next frame.
        """
        if self.broken is not None:
            raise PeerGone(f"session ended: {self.broken}")
        flush = self._flush
        self._pending.append(entry)
        if self._writing is None and len(self._pending) == 1:
            # Shielded from the caller's cancellation, not from its own deadline.
            with trio.CancelScope(shield=True, deadline=trio.current_time() + WRITE_TIMEOUT) as scope:
                await self._write_pending()
            if scope.cancelled_caught:
                self._fail(f"the peer read nothing for {WRITE_TIMEOUT:.0f} s")
                await self.framed.reset()
            if self._pending:
                self._wake.set()
        else:
            self._wake.set()
            await flush.done.wait()
        if flush.error is not None:
            raise PeerGone(f"stream closed while sending: {flush.error}")

    def post(self, entry: Entry) -> None:
        """Send ``entry`` in the next frame without waiting (END and RESET: a closing request never blocks)."""
        if self.broken is None:
            self._pending.append(entry)
            self._wake.set()

    async def _write_loop(self) -> None:
        while self.broken is None:
            await self._wake.wait()
            self._wake = trio.Event()
            if self._writing is None and self._pending:  # else a request is writing, and wakes us when done
                await self._write_pending()

    async def _write_pending(self) -> None:
        """Everything pending as one frame (more only past the frame limit); only one task at a time gets here."""
        entries, flush = self._pending, self._flush
        self._pending, self._flush = [], _Flush()
        self._writing = flush
        try:
            for frame in encode_frames(entries):
                await self.framed.send_raw(frame)
                self.frames_sent += 1
        except PeerGone as exc:
            self._fail(f"stream broke: {exc}")
            return
        finally:
            self._writing = None
        self.entries_sent += len(entries)
        flush.done.set()

    async def _end_when_idle(self) -> None:
        """A host's side: end a session that has had no request open for ``idle_timeout`` (a deadline per read costs more)."""
        while True:
            await trio.sleep(self.idle_timeout / 4)
            if not self._channels and trio.current_time() - self.idle_since >= self.idle_timeout:
                self.broken = "idle"
                self._run_scope.cancel()
                return

    # --- reading -----------------------------------------------------------
    async def _read_loop(self, nursery: trio.Nursery, accept: Accept | None) -> None:
        while True:
            try:
                body = await self.framed.receive_body()
                entries = decode_batch(body)
            except PeerGone as exc:
                self.broken = str(exc)
                return
            except ProtocolError as exc:
                await self._violation(str(exc))
                return
            if self.broken is not None:
                return
            for entry in entries:
                if entry.request == SESSION_REQUEST:
                    if entry.op == MESSAGE:
                        log.info("the peer is dropping the session: %s", _reason(entry.body))
                    continue
                channel = self._channels.get(entry.request)
                if channel is None:
                    if accept is not None:
                        self._new_request(entry, nursery, accept)
                    continue
                if entry.op == MESSAGE:
                    if not channel._deliver(entry.body):
                        log.info("request %d cut: its reader is more than %d bytes behind", entry.request, self.max_buffered)
                        self.forget(channel)
                        self.post(Entry(entry.request, RESET))
                        channel._cut_off()
                elif entry.op == END:
                    channel._end(_PEER_DONE)
                else:
                    channel._end("stream reset")
                    self.forget(channel)

    def _new_request(self, entry: Entry, nursery: trio.Nursery, accept: Accept) -> None:
        """A host's side: a new request id opens a request; anything else about an unknown id is answered."""
        if entry.op != MESSAGE:
            return  # END or RESET of a request already over here: the two crossed on the wire
        if entry.request <= self._last_request:
            self._post_error(entry.request, "protocol", "unknown request id on this session", retryable=False)
            self.post(Entry(entry.request, RESET))
            return
        self._last_request = entry.request
        if len(self._channels) >= MAX_OPEN_REQUESTS:
            self._post_error(entry.request, "busy", "too many requests open on this session", retryable=True)
            self.post(Entry(entry.request, END))
            return
        channel = Channel(self, entry.request)
        self._channels[entry.request] = channel
        channel._deliver(entry.body)
        nursery.start_soon(accept, channel)

    async def _violation(self, why: str) -> None:
        """The peer sent something that is not a session frame: say why, then drop the session (only this one)."""
        log.warning("dropping a session: the peer sent %s", why)
        self._post_error(SESSION_REQUEST, "protocol", why, retryable=False)
        last = self._flush
        with trio.move_on_after(1):
            await last.done.wait()  # the writer sends it: only the writer writes
        self._fail(f"protocol violation: {why}")
        await self.framed.reset()

    def _post_error(self, request: int, code: str, message: str, *, retryable: bool) -> None:
        self.post(Entry(request, MESSAGE, Error(code=code, message=message, retryable=retryable).encode()))

    def forget(self, channel: Channel) -> None:
        if channel.request and self._channels.pop(channel.request, None) is not None and not self._channels:
            self.idle_since = trio.current_time()

    def _fail(self, reason: str) -> None:
        if self.broken is None:
            self.broken = reason
        for channel in list(self._channels.values()):
            channel._end(f"session ended: {reason}")
        self._channels.clear()
        for flush in (self._writing, self._flush):
            if flush is not None and not flush.done.is_set():
                flush.error = reason
                flush.done.set()
        self._pending.clear()


def _reason(body: bytes) -> str:
    try:
        msg = decode(body)
    except ProtocolError as exc:
        return f"(unreadable: {exc})"
    return msg.message if isinstance(msg, Error) else msg.TYPE
