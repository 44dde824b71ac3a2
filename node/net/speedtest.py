"""Throughput between two peers: ``/gpunexus/speedtest/1``, for ``node check``'s bandwidth line.

Latency says what a first token pays; bandwidth says whether a link can
carry many streams (and large prompts) at once. Measuring it needs bytes
moved each way over the path a gateway uses, so every gpunexus peer answers
this protocol (``open_p2p`` registers it):

- the prober opens a stream and sends one header, a direction byte (``D``
  for download, ``U`` for upload) and a big-endian uint64 byte count;
- ``D``: the peer sends that many bytes, then closes its side;
- ``U``: the prober sends up to that many bytes and closes its side; the
  peer answers with the uint64 count it received.

A peer sends or takes at most :data:`MAX_BYTES` per stream, runs one test
at a time (another asking meanwhile is reset at once) and moves at most
:data:`PEER_BUDGET_BYTES` per asking peer and :data:`TOTAL_BUDGET_BYTES`
for all peers together each :data:`PEER_BUDGET_S` (past either, reset): a
new identity per probe gets past the first but not the second, so answering
costs a host at most about 18 Mbit/s however many peers ask, and in practice
a few megabytes when a host or the setup script checks. The prober stops after
:data:`TIME_BUDGET_S` whatever it moved, so a slow link gives a slow figure,
not a hung check. Download speed is timed from the first byte to the last
(the request's round trip excluded); upload from the first byte sent to the
peer's count, less one round trip (the ping's, measured before).
"""

from __future__ import annotations

import struct
import time
from dataclasses import dataclass

import trio

PROTOCOL = "/gpunexus/speedtest/1"
MAX_BYTES = 8 * 2**20
DEFAULT_BYTES = 4 * 2**20
TIME_BUDGET_S = 3.0
SERVE_LIMIT_S = 15.0
CHUNK = 64 * 1024
PEER_BUDGET_BYTES = 4 * MAX_BYTES
TOTAL_BUDGET_BYTES = 16 * MAX_BYTES
PEER_BUDGET_S = 60.0
_HEADER = struct.Struct(">cQ")
_COUNT = struct.Struct(">Q")
_ZEROS = bytes(CHUNK)


@dataclass(frozen=True, slots=True)
class Bandwidth:
    down_mbps: float
    up_mbps: float
    """Megabits (10^6 bits) per second, as links are sold."""


def _mbps(nbytes: int, seconds: float) -> float:
    return round(nbytes * 8 / max(seconds, 1e-6) / 1e6, 1)


async def _read_exactly(stream, n: int) -> bytes:
    data = b""
    while len(data) < n:
        data += await stream.read(n - len(data))
    return data


class PeerBudget:
    """Bytes each peer had moved for it lately; ``take`` says whether it may have ``n`` more."""

    def __init__(self, limit: int = PEER_BUDGET_BYTES, window_s: float = PEER_BUDGET_S, clock=time.monotonic) -> None:
        self._limit, self._window, self._clock = limit, window_s, clock
        self._moved: dict[str, list[tuple[float, int]]] = {}

    def take(self, peer: str, n: int) -> bool:
        now = self._clock()
        recent = [(t, b) for t, b in self._moved.get(peer, []) if now - t < self._window]
        if sum(b for _, b in recent) + n > self._limit:
            self._moved[peer] = recent
            return False
        self._moved[peer] = recent + [(now, n)]
        for other in [p for p, moves in self._moved.items() if p != peer and all(now - t >= self._window for t, _ in moves)]:
            del self._moved[other]  # peers that stopped asking are forgotten
        return True


def speedtest_handler(budget: PeerBudget | None = None, total: PeerBudget | None = None):
    """The stream handler a peer answers ``PROTOCOL`` with: one test at a time, each bounded, each peer and all together budgeted."""
    busy = trio.Lock()
    budget = budget or PeerBudget()
    total = total or PeerBudget(limit=TOTAL_BUDGET_BYTES)

    async def handle(stream) -> None:
        if busy.locked():
            await stream.reset()
            return
        async with busy:
            try:
                with trio.move_on_after(SERVE_LIMIT_S):
                    direction, size = _HEADER.unpack(await _read_exactly(stream, _HEADER.size))
                    size = min(size, MAX_BYTES)
                    if not (budget.take(str(stream.muxed_conn.peer_id), size) and total.take("", size)):
                        await stream.reset()
                        return
                    if direction == b"D":
                        for offset in range(0, size, CHUNK):
                            await stream.write(_ZEROS[: min(CHUNK, size - offset)])
                    elif direction == b"U":
                        received = 0
                        try:
                            while received < size:
                                received += len(await stream.read(min(CHUNK, size - received)))
                        except Exception:  # the prober closed its side: what arrived is the figure
                            pass
                        await stream.write(_COUNT.pack(received))
                    else:
                        await stream.reset()
                        return
                    await stream.close()
                    return
                await stream.reset()
            except Exception:  # a prober that went away mid-test: nothing to answer
                with trio.move_on_after(1):
                    await stream.reset()

    return handle


async def measure(host, peer_id, *, round_trip_s: float, size: int = DEFAULT_BYTES, budget_s: float = TIME_BUDGET_S) -> Bandwidth:
    """Download, then upload, ``size`` bytes (or what ``budget_s`` allows each) with the connected peer."""
    down = await _download(host, peer_id, size, budget_s)
    up = await _upload(host, peer_id, size, budget_s, round_trip_s)
    return Bandwidth(down, up)


async def _download(host, peer_id, size: int, budget_s: float) -> float:
    stream = await host.new_stream(peer_id, [PROTOCOL])
    try:
        await stream.write(_HEADER.pack(b"D", size))
        first = await stream.read(CHUNK)
        start, received = time.perf_counter(), 0
        with trio.move_on_after(budget_s):
            while len(first) + received < size:
                received += len(await stream.read(CHUNK))
        return _mbps(received, time.perf_counter() - start) if received else 0.0
    finally:
        await stream.reset()


async def _upload(host, peer_id, size: int, budget_s: float, round_trip_s: float) -> float:
    stream = await host.new_stream(peer_id, [PROTOCOL])
    try:
        await stream.write(_HEADER.pack(b"U", size))
        start, sent = time.perf_counter(), 0
        with trio.move_on_after(budget_s):
            while sent < size:
                n = min(CHUNK, size - sent)
                await stream.write(_ZEROS[:n])
                sent += n
        await stream.close_write()
        (received,) = _COUNT.unpack(await _read_exactly(stream, _COUNT.size))
        return _mbps(received, max(time.perf_counter() - start - round_trip_s, 1e-6))
    finally:
        await stream.reset()
