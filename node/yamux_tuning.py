"""Two measured tweaks to py-libp2p 0.8.1's yamux, applied when ``node.wire`` loads.

Both keep yamux's behaviour on the wire and its locking; they only drop work
that the relay paid for on every frame (see bench/relay.py for the figures).

1. **No window update per read.** py-libp2p's ``_auto_tune_and_send_window_update``
   sends a WINDOW_UPDATE frame back on every read that leaves any credit
   owed (its "partial slack" branch, and ``PY_YAMUX_RELEASE_ON_READ``, on by
   default), so each token frame the gateway reads cost a second frame
   (encrypt, a socket send, a wakeup of the host and a parse there). Here the
   update is deferred until the credit owed reaches the hysteresis threshold
   (half the target window: 128 KiB of the 256 KiB default), which is what
   go-yamux does; then the upstream method runs unchanged and returns all of
   it at once. A sender is never starved: the update goes out long before its
   window is empty. ``PY_YAMUX_RELEASE_ON_READ`` is defaulted to off to match
   (an operator who sets it keeps their value).
2. **A lean, write-combining ``Yamux._write_frame``.** The upstream version
   decodes every outgoing header and formats a debug f-string (evaluated even
   with debug logging off), then writes the frame: one Noise message, one
   socket send, one wakeup of the peer per frame. This version (used when
   debug logging is off) lets the frames that are ready in the same scheduler
   pass (token chunks of several streams on one connection, a chunk and its
   receipt) join the first one and go out as one Noise message and one send:
   the first writer yields once without cancellation (upstream yielded once
   after the write instead), the frames that joined meanwhile ride along, and
   their writers return when it is written (or raise what the write raised).
   Frames keep their order; the connection's write lock is taken without a
   scheduler round trip when nobody holds it (a trio lock hands itself to a
   waiter on release, so an unlocked lock has none). Upstream candidates:
   guard the header decode with ``logger.isEnabledFor(logging.DEBUG)``, and
   coalesce frames per connection as go-yamux's send loop does.
3. **Read-ahead on the TCP connection.** Noise reads a 2-byte length, then
   the message, each through ``TrioTCPStream.read`` (a lock, a ``recv``
   syscall, a scheduler pass), and the next length read usually finds the
   socket empty (one more ``recv``, an epoll registration). Reading up to
   64 KiB at once and serving the exact-size reads from that buffer makes it
   one ``recv`` per wakeup. Bytes come out in the same order; a read never
   returns more than was asked for.
4. **Tuning knobs read once.** py-libp2p reads its ``PY_YAMUX_*`` environment
   variables on every frame (``os.getenv`` in the receive loop and in every
   window check: 2-3 % of the gateway's CPU at 32 streams). They are read once
   here, when this module loads; set them before starting the node.
"""

from __future__ import annotations

import logging
import os

import trio

os.environ.setdefault("PY_YAMUX_RELEASE_ON_READ", "0")

try:
    from libp2p.io.trio import TrioTCPStream as _TrioTCPStream
    from libp2p.stream_muxer.yamux import yamux as _yamux
except ImportError:  # pragma: no cover - libp2p is a hard dependency
    _yamux = _TrioTCPStream = None

READ_AHEAD = 65536

_PATCHED = "_gpunexus_lean_write_frame"


class _Batch:
    __slots__ = ("done", "error", "frames")

    def __init__(self, first: bytes) -> None:
        self.frames = [first]
        self.done = trio.Event()
        self.error: BaseException | None = None


def _install() -> None:
    if _yamux is None or getattr(_yamux.Yamux, _PATCHED, False):
        return
    original = _yamux.Yamux._write_frame
    logger = _yamux.logger

    async def _write_frame(self, data: bytes) -> None:
        if logger.isEnabledFor(logging.DEBUG):
            await original(self, data)
            return
        batch = self.__dict__.get("_gx_batch")
        if batch is not None:
            batch.frames.append(data)
            await batch.done.wait()
            if batch.error is not None:
                raise batch.error
            return
        batch = self._gx_batch = _Batch(data)
        try:
            # Let the writers that are ready in this scheduler pass join (not a cancellation point:
            # frames that joined must go out whatever happens to this task).
            await trio.lowlevel.cancel_shielded_checkpoint()
            self._gx_batch = None
            frames = batch.frames
            payload = frames[0] if len(frames) == 1 else b"".join(frames)
            lock = self._write_lock
            if lock.locked():
                async with lock:
                    await self.secured_conn.write(payload)
            else:
                lock.acquire_nowait()
                try:
                    await self.secured_conn.write(payload)
                finally:
                    lock.release()
        except BaseException as exc:
            batch.error = exc if isinstance(exc, Exception) else _yamux.RawConnError(f"write abandoned: {type(exc).__name__}")
            raise
        finally:
            if self.__dict__.get("_gx_batch") is batch:
                self._gx_batch = None
            batch.done.set()
        await trio.lowlevel.checkpoint_if_cancelled()

    for name in ("_perf_yamux_debug_enabled", "_yamux_disable_hysteresis", "_yamux_release_on_read",
                 "_yamux_batch_threshold_divisor", "_yamux_data_read_timeout"):
        getter = getattr(_yamux, name, None)
        if getter is not None:
            value = getter()
            setattr(_yamux, name, lambda value=value: value)

    if _TrioTCPStream is not None and not getattr(_TrioTCPStream, _PATCHED, False):
        original_read = _TrioTCPStream.read

        async def read(self, n: int | None = None) -> bytes:
            ahead = self.__dict__.get("_gx_ahead")
            if ahead:
                if n is None or n >= len(ahead):
                    data = bytes(ahead)
                    ahead.clear()
                else:
                    data = bytes(ahead[:n])
                    del ahead[:n]
                return data
            if not n:
                return await original_read(self, n)
            data = await original_read(self, max(n, READ_AHEAD))
            if len(data) > n:
                if ahead is None:
                    ahead = self._gx_ahead = bytearray()
                ahead += memoryview(data)[n:]
                return data[:n]
            return data

        read.__doc__ = original_read.__doc__
        _TrioTCPStream.read = read
        setattr(_TrioTCPStream, _PATCHED, True)

    _write_frame.__doc__ = original.__doc__
    _yamux.Yamux._write_frame = _write_frame

    original_tune = _yamux.YamuxStream._auto_tune_and_send_window_update

    async def _auto_tune_and_send_window_update(self, *, bytes_read: int = 0) -> None:
        buffered = self.conn.stream_buffers.get(self.stream_id)
        owed = self.target_recv_window - (self.recv_window + (len(buffered) if buffered else 0))
        if owed < self._grow_threshold():
            # Not worth a frame yet: remember the release, as upstream's batching does.
            self._pending_recv_release += bytes_read
            return
        await original_tune(self, bytes_read=bytes_read)

    _auto_tune_and_send_window_update.__doc__ = original_tune.__doc__
    _yamux.YamuxStream._auto_tune_and_send_window_update = _auto_tune_and_send_window_update
    setattr(_yamux.Yamux, _PATCHED, True)


_install()
