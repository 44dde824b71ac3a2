"""Receipts settled per second by the hub, against the Ed25519 ceiling, in one run.

Each receipt is settled the way ``POST /v1/receipts`` does it (``Hub.submit``:
decode, host and gateway signatures, cost check, exactly-once check, postings,
hub-signed hash-chained log entry, one transaction per batch), minus HTTP.
Bare Ed25519 verifications per second are measured in the same run on the
same machine; since every receipt needs two, half that rate is the ceiling.

    python bench/settle.py                      # SQLite (a temp file)
    python bench/settle.py --pg postgresql+psycopg://postgres@127.0.0.1/bench
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import trio
from gpunexus.hub import keys
from gpunexus.hub.config import HubConfig
from gpunexus.hub.db import Database, metadata
from gpunexus.hub.receipts import ParallelPrecheck
from gpunexus.hub.service import Hub, host_registration_statement
from gpunexus.protocol.messages import Offer, Receipt
from gpunexus.protocol.money import cost_micro
from gpunexus.protocol.signing import Signer, verify_signature

BATCHES = (1, 100, 1000)
PRICE = 200_000


def ed25519_per_s(seconds: float = 1.0) -> float:
    signer = Signer.generate()
    msg = os.urandom(200)
    sig = signer.sign(msg)
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for _ in range(200):
            verify_signature(signer.peer_id, msg, sig)
        n += 200
    return n / (time.perf_counter() - start)


def receipts_for(host: Signer, gateway: Signer, n: int, issued_at: float) -> list[bytes]:
    out = []
    for i in range(n):
        r = Receipt(request_id=os.urandom(16).hex(), host_id=host.peer_id, gateway_id=gateway.peer_id, model="bench",
                    model_hash="h", price_micro_per_mtok=PRICE, tokens_in=300, tokens_out=200,
                    cost_micro=cost_micro(500, PRICE), output_hash=os.urandom(32), prompt_hash=os.urandom(32),
                    seed=i, finish_reason="stop", commitment=b"", issued_at=issued_at)
        out.append(r.signed(host, "host_sig").signed(gateway, "gateway_sig").encode())
    return out


async def settle_rate(url: str, batch: int, total: int, workers: int) -> float:
    db = Database(url)
    if db.is_postgres:
        metadata.drop_all(db.engine)
    db.create_schema()
    hub = Hub(db, Signer.generate(), HubConfig(max_batch=max(BATCHES)))
    if workers > 1:
        hub.precheck = ParallelPrecheck(workers)
        hub.precheck(receipts_for(Signer.generate(), Signer.generate(), workers, 0.0), hub.config)  # start the workers
    client, _ = db.write_sync(keys.add_user, "client@bench", "client")
    host_user, _ = db.write_sync(keys.add_user, "host@bench", "host")
    hub.grant_sync("client@bench", 10**12, "bench")
    host, gateway = Signer.generate(), Signer.generate()
    await hub.register_host(host_user, host.peer_id, host.sign(host_registration_statement(hub.hub_id, host.peer_id)))
    now = time.time()
    offer = Offer(peer_id=host.peer_id, model="bench", model_hash="h", price_micro_per_mtok=PRICE, tokens_per_s=50.0,
                  free_slots=4, max_slots=4, max_context=2048, region="", license="", follows_market=False, addrs=(),
                  seq=1, issued_at=now, expires_at=now + 600).signed(host)
    await hub.post_offer(host_user, offer.encode())  # receipts settle only at a price the host offered
    allowance = await hub.allowance(client, gateway.peer_id, 50_000_000)
    blobs = receipts_for(host, gateway, total, allowance.issued_at + 1)
    start = time.perf_counter()
    for i in range(0, total, batch):
        outcomes = await hub.submit(blobs[i:i + batch])
        assert all(o.status == "settled" for o in outcomes), outcomes[0]
    elapsed = time.perf_counter() - start
    db.dispose()
    if workers > 1:
        hub.precheck.close()
    return total / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pg", default=os.environ.get("GPUNEXUS_TEST_PG_URL"), help="PostgreSQL URL (default $GPUNEXUS_TEST_PG_URL; skipped if unset)")
    parser.add_argument("--receipts", type=int, default=5000, help="receipts per measurement at batch sizes >= 100")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes for the parallel column (default: all cores)")
    args = parser.parse_args()

    verify_rate = ed25519_per_s()
    ceiling = verify_rate / 2
    print(f"Ed25519 verifications/s on one core: {verify_rate:,.0f}  ->  one-core ceiling {ceiling:,.0f} receipts/s "
          f"(2 signatures each); {os.cpu_count()} cores\n")
    par = f"{args.workers} procs"
    print(f"{'backend':<11} {'batch':>6} {'1 thread':>10} {'of ceiling':>11} {par:>10} {'of ceiling':>11}")
    with tempfile.TemporaryDirectory() as tmp:
        backends = [("sqlite", lambda tag: f"sqlite:///{tmp}/bench-{tag}.db")]
        if args.pg:
            backends.append(("postgresql", lambda tag: args.pg))
        for name, url in backends:
            for batch in BATCHES:
                total = min(args.receipts, 300) if batch == 1 else args.receipts
                one = trio.run(settle_rate, url(f"{batch}-1"), batch, total, 1)
                many = trio.run(settle_rate, url(f"{batch}-n"), batch, total, args.workers)
                print(f"{name:<11} {batch:>6} {one:>10,.0f} {one / ceiling:>10.0%} {many:>10,.0f} {many / ceiling:>10.0%}")
    if not args.pg:
        print("\n(postgresql skipped: pass --pg URL or set GPUNEXUS_TEST_PG_URL)")


if __name__ == "__main__":
    main()
