"""Sessions against per-request streams: the transport's CPU per chunk, side by side in one run.

Run: python bench/session.py [--chunks N] [--rounds R] [--streams 1,32,128]
(quick: --streams 1,32 --rounds 3)

Two real libp2p peers on loopback (TCP, Noise, yamux) in this process. For
each row, ``streams`` requests run at once; each sends a one-chunk request
and gets ``--chunks`` real :class:`Chunk` messages back, either on a
``/gpunexus/infer/1``-style stream of its own (:class:`FramedStream`, spare
pools and all negotiation excluded: streams are opened before the clock
starts) or as a channel of one shared session (node/net/session.py). "fast"
sends every chunk as soon as the previous send returned; "paced" sends one
every 20 ms per request (50 tokens/s, the harness's paced rate). Rounds
alternate the two ways; the figure is this process's CPU time (both peers)
per chunk delivered, and for the session the entries per frame its writer
sent. The ratio is the median of each round's session/streams pair, run
back to back, with the lowest and highest pair beside it: on a shared
machine the load drifts between rounds by more than the two ways differ for
one request, and a ratio of two medians over three rounds swung from 1.2 to
1.8 for the same code. The gateway's HTTP side and the host's engine are
not in here: this is the part sessions change.
"""

from __future__ import annotations

import argparse
import time
from statistics import median

import multiaddr
import trio
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import info_from_p2p_addr

from gpunexus.node.net.p2p import P2PConfig, open_p2p
from gpunexus.node.net.session import Session
from gpunexus.node.net.wire import FramedStream, PeerGone
from gpunexus.protocol.messages import Chunk
from gpunexus.protocol.session import SESSION_PROTOCOL
from gpunexus.protocol.signing import Signer

STREAM_PROTOCOL = "/gpunexus-bench/stream/1"
PACE_S = 0.02
TOKEN = Chunk("tok ", 1, (), ())


def serve(chunks: int, paced: bool):
    async def answer(conv) -> None:
        await conv.receive()
        for _ in range(chunks):
            await conv.send(TOKEN)
            if paced:
                await trio.sleep(PACE_S)
        await conv.close()

    async def on_stream(stream) -> None:
        try:
            await answer(FramedStream(stream))
        except PeerGone:
            pass

    sessions: list[Session] = []

    async def on_session(stream) -> None:
        session = Session(stream)
        sessions.append(session)
        await session.run(accept=answer)
        await session.framed.close()  # as a host does: the gateway's side then ends too

    return on_stream, on_session, sessions


async def drain(conv, chunks: int) -> None:
    await conv.send(TOKEN)
    for _ in range(chunks):
        await conv.receive()


async def one_row(client, server, peer: ID, streams: int, chunks: int, paced: bool, way: str) -> tuple[float, float]:
    on_stream, on_session, sessions = serve(chunks, paced)
    server.host.set_stream_handler(STREAM_PROTOCOL, on_stream)
    server.host.set_stream_handler(SESSION_PROTOCOL, on_session)
    async with trio.open_nursery() as nursery:
        session = None
        if way == "streams":
            convs = [FramedStream(await client.host.new_stream(peer, [STREAM_PROTOCOL])) for _ in range(streams)]
        else:
            session = Session(await client.host.new_stream(peer, [SESSION_PROTOCOL]))
            nursery.start_soon(session.run)
            convs = [session.open() for _ in range(streams)]
        cpu = time.process_time()
        async with trio.open_nursery() as requests:
            for conv in convs:
                requests.start_soon(drain, conv, chunks)
        cpu = time.process_time() - cpu
        per_frame = sessions[0].entries_sent / max(1, sessions[0].frames_sent) if sessions else 1.0
        for conv in convs:
            await conv.close()
        if session is not None:
            await session.close()
    return 1e6 * cpu / (streams * chunks), per_frame


async def main(args) -> None:
    rows = []
    async with open_p2p(Signer.generate(), P2PConfig()) as server, open_p2p(Signer.generate(), P2PConfig()) as client:
        await client.host.connect(info_from_p2p_addr(multiaddr.Multiaddr(server.listen_addrs()[0])))
        peer = ID.from_base58(server.peer_id)
        for paced in (False, True):
            for streams in args.streams:
                chunks = args.chunks if not paced else min(args.chunks, 100)
                got = {"streams": [], "session": []}
                frames = []
                for r in range(args.rounds):
                    for way in (("streams", "session") if r % 2 == 0 else ("session", "streams")):
                        us, per_frame = await one_row(client, server, peer, streams, chunks, paced, way)
                        got[way].append(us)
                        if way == "session":
                            frames.append(per_frame)
                mode = "paced" if paced else "fast"
                a, b = median(got["streams"]), median(got["session"])
                pairs = sorted(on_session / on_streams for on_session, on_streams in zip(got["session"], got["streams"]))
                rows.append((mode, streams, a, b, median(pairs), pairs[0], pairs[-1], sum(frames) / len(frames)))
                print(f"[session-bench] {mode} x{streams}: streams {a:.1f} µs/chunk, session {b:.1f} µs/chunk", flush=True)
    print("\ntransport CPU per chunk, both peers (median of rounds; lower is better; ratio: median of the rounds' pairs)")
    print("| mode  | streams | per-request streams µs | session µs | session / streams | lowest–highest pair | entries per frame |")
    print("|-------|---------|------------------------|------------|-------------------|---------------------|-------------------|")
    for mode, streams, a, b, ratio, low, high, per_frame in rows:
        print(f"| {mode:5} | {streams:7} | {a:22.1f} | {b:10.1f} | {ratio:17.2f} | {f'{low:.2f}–{high:.2f}':>19} | {per_frame:17.1f} |")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--chunks", type=int, default=400, help="chunks per request in fast rows (paced rows send at most 100)")
    ap.add_argument("--rounds", type=int, default=7, help="rounds per row, each running both ways back to back")
    ap.add_argument("--streams", type=lambda s: [int(x) for x in s.split(",")], default=[1, 32, 128])
    trio.run(main, ap.parse_args())
