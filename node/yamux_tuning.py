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
2. **A lean ``Yamux._write_frame``.** The upstream version decodes every
   outgoing header and formats a debug f-string (evaluated even with debug
   logging off) before writing. When debug logging is off this version skips
   both, and takes the connection's write lock without a scheduler round trip
   when nobody holds it (the lock hands itself to waiters on release, so an
   unlocked lock has no waiters: same ordering as ``async with``). The
   checkpoint after the write is kept, so the method is still a cancellation
   point. Upstream candidate: guard the header decode with
   ``logger.isEnabledFor(logging.DEBUG)``.
"""

from __future__ import annotations

import logging
import os

import trio

os.environ.setdefault("PY_YAMUX_RELEASE_ON_READ", "0")

try:
    from libp2p.stream_muxer.yamux import yamux as _yamux
except ImportError:  # pragma: no cover - libp2p is a hard dependency
    _yamux = None

_PATCHED = "_gpunexus_lean_write_frame"


def _install() -> None:
    if _yamux is None or getattr(_yamux.Yamux, _PATCHED, False):
        return
    original = _yamux.Yamux._write_frame
    logger = _yamux.logger

    async def _write_frame(self, data: bytes) -> None:
        if logger.isEnabledFor(logging.DEBUG):
            await original(self, data)
            return
        lock = self._write_lock
        if lock.locked():
            async with lock:
                await self.secured_conn.write(data)
        else:
            lock.acquire_nowait()
            try:
                await self.secured_conn.write(data)
            finally:
                lock.release()
        await trio.lowlevel.checkpoint()

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
