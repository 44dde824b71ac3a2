"""The hub's market: offers, signed prices per epoch, the settlement price check, the public routes."""

from __future__ import annotations

import argparse
import base64
import time

import httpx
import pytest
import sqlalchemy as sa
import trio
from gpunexus.hub import cli as hub_cli
from gpunexus.hub import keys
from gpunexus.hub.app import create_app, serve
from gpunexus.hub.config import HubConfig
from gpunexus.hub.db import Database, offer_prices, offers
from gpunexus.hub.market import ABOVE_OFFER, NO_OFFER
from gpunexus.hub.service import Hub, HubError
from gpunexus.protocol.codec import decode_as
from gpunexus.protocol.messages import PriceUpdate, host_registration_statement
from gpunexus.protocol.signing import Signer
from test_hub_support import (  # noqa: F401
    PRICE,
    Market,
    backend,
    db,
    make_offer,
    make_receipt,
    served,
)

EPOCH_S = 10.0
CEILING = 10_000_000
CONFIG = HubConfig(epoch_s=EPOCH_S, reference_prices={"ref-tiny": CEILING})


def _auth(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


async def _market(db, config: HubConfig = CONFIG) -> Market:
    m = Market(db, config)
    await m.register_host(offer=False)
    await m.post_offer(ttl=EPOCH_S)  # at PRICE (2 USD/Mtok), 50 tok/s x 4 slots
    await m.hub.allowance(m.client, m.gateway.peer_id, 5_000_000)
    return m


async def _epoch(m: Market, k: int, tokens: int = 0, *, offer_price: int | None = PRICE) -> int:
    """Run epoch k: the host re-offers and ``tokens`` settle mid-epoch; close it at its end."""
    m.clock.now = k * EPOCH_S - EPOCH_S / 2
    if offer_price is not None:
        await m.post_offer(price=offer_price, ttl=EPOCH_S)
    if tokens:
        [o] = await m.hub.submit([m.receipt(tokens_in=tokens, tokens_out=0, price=min(PRICE, offer_price or PRICE)).encode()])
        assert o.status == "settled", o.reason
    m.clock.now = k * EPOCH_S
    [row] = await m.hub.market.close_epoch(k)
    return row["price"]


# --- offers ---------------------------------------------------------------------

async def test_offers_accepted_and_refused(served):
    market, url, _ = served
    await market.register_host(offer=False)
    now = market.clock.now
    async with httpx.AsyncClient(base_url=url, timeout=10) as http:
        async def post(offer_bytes: bytes, key: str = market.host_key) -> httpx.Response:
            return await http.post("/v1/offers", headers=_auth(key), json={"offer": _b64(offer_bytes)})

        good = make_offer(market.host_signer, issued_at=now, ttl=10)
        r = await post(good.encode())
        assert r.status_code == 200 and r.json() == {"accepted": True}

        tampered = bytearray(make_offer(market.host_signer, issued_at=now, price=PRICE + 1).encode())
        tampered[-70] ^= 1
        r = await post(bytes(tampered))
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_offer"
        assert (await post(make_offer(Signer.generate(), issued_at=now).encode())).status_code == 403  # not registered
        r = await post(make_offer(market.host_signer, issued_at=now - 100, ttl=10).encode())
        assert r.status_code == 400 and r.json()["error"]["code"] == "offer_expired"
        assert (await post(make_offer(market.host_signer, issued_at=now, ttl=86_400).encode())).status_code == 400
        assert (await post(make_offer(market.host_signer, issued_at=now + 3600).encode())).status_code == 400
        r = await post(good.encode(), market.client_key)  # a client key cannot offer
        assert r.status_code == 403 and set(r.json()["error"]) == {"message", "type", "param", "code"}
        assert (await http.post("/v1/offers", headers=_auth(market.host_key), json={"offer": "***"})).status_code == 400
        assert (await http.post("/v1/offers", json={"offer": _b64(good.encode())})).status_code == 401

        # heartbeats at one price extend one stretch of history; a new price starts another
        for i in range(1, 4):
            market.clock.now = now + 3 * i
            assert (await post(make_offer(market.host_signer, issued_at=now + 3 * i, ttl=10).encode())).status_code == 200
        assert (await post(make_offer(market.host_signer, issued_at=now + 12, ttl=10, price=PRICE // 2).encode())).status_code == 200

    db = market.hub.db
    latest = db.read_sync(lambda c: c.execute(sa.select(offers)).mappings().all())
    assert [(r["peer_id"], r["price"], r["issued_at"]) for r in latest] == [(market.host_signer.peer_id, PRICE // 2, now + 12)]
    history = db.read_sync(lambda c: c.execute(sa.select(offer_prices).order_by(offer_prices.c.since)).mappings().all())
    assert [(h["price"], h["since"]) for h in history] == [(PRICE, now), (PRICE // 2, now + 12)]
    assert history[0]["until"] >= now + 9 + 10 / 2  # heartbeats may skip the write while half the lifetime is left


# --- epochs -----------------------------------------------------------------------

async def test_epoch_computes_and_signs_prices(db):
    m = await _market(db)
    k = 101  # [1000, 1010)
    m.clock.now = 1001.0
    [o] = await m.hub.submit([m.receipt(tokens_in=1000, tokens_out=0).encode()])
    assert o.status == "settled"
    m.clock.now = k * EPOCH_S
    [row] = await m.hub.market.close_epoch(k)
    update = decode_as(PriceUpdate, row["blob"])
    update.verify()
    assert (update.hub_id, update.model, update.epoch) == (m.hub.hub_id, "ref-tiny", k)
    assert (update.demand_tps, update.supply_tps) == (100.0, 200.0)  # 1000 tokens in 10 s; 50 tok/s x 4 slots
    # u = 0.5 under the target: the price (starting at half the ceiling) falls one step, above the host's ask
    assert PRICE < update.price_micro_per_mtok < CEILING // 2
    assert (row["floor"], row["ceiling"], row["hosts"], row["utilisation"]) == (PRICE, CEILING, 1, 0.5)
    assert await m.hub.market.latest_updates() == [row["blob"]]
    # closing the same epoch again changes nothing
    assert await m.hub.market.close_epoch(k) == [row]


async def test_demand_moves_the_price_between_floor_and_ceiling(db):
    m = await _market(db)
    rising = [await _epoch(m, k, tokens=8000) for k in range(101, 113)]  # u = 4: the price climbs
    assert rising == sorted(rising) and rising[2] > rising[0]
    assert rising[-1] == CEILING and max(rising) <= CEILING
    falling = [await _epoch(m, k) for k in range(113, 175)]  # no demand: down to the host's ask, and it rests there
    assert falling == sorted(falling, reverse=True)
    assert min(falling) == PRICE and falling[-5:] == [PRICE] * 5


async def test_a_host_following_the_market_sets_no_floor(db):
    m = await _market(db)
    first = await _epoch(m, 101)  # the fixed-price host (ask 2 USD) makes a market
    follower = Signer.generate()
    proof = follower.sign(host_registration_statement(m.hub.hub_id, follower.peer_id))
    await m.hub.register_host(m.host, follower.peer_id, proof)
    prices = [first]
    for k in range(102, 140):
        m.clock.now = k * EPOCH_S - EPOCH_S / 2
        offer = make_offer(follower, issued_at=m.clock.now, ttl=EPOCH_S, price=prices[-1], seq=k, follows_market=True)  # asks what the hub published
        await m.hub.post_offer(m.host, offer.encode())
        m.clock.now = k * EPOCH_S
        [row] = await m.hub.market.close_epoch(k)
        prices.append(row["price"])
    # the fixed host stopped offering after epoch 101
    assert prices == sorted(prices, reverse=True) and len(set(prices)) == len(prices)
    assert prices[-1] < PRICE  # below the departed host's ask: the follower's price is no floor


async def test_two_hubs_on_one_database_agree(tmp_path):
    url = f"sqlite:///{tmp_path}/shared.db"
    first_db, second_db = Database(url), Database(url)
    first_db.create_schema()
    m = await _market(first_db)
    other = Hub(second_db, Signer.generate(), CONFIG, clock=m.clock)
    await _epoch(m, 101, tokens=4000)
    [mine] = await m.hub.market.close_epoch(101)
    [theirs] = await other.market.close_epoch(101)  # too late: it reads the first hub's row
    assert theirs == mine and theirs["hub_id"] == m.hub.hub_id
    for k in range(102, 106):
        m.clock.now = k * EPOCH_S - 1
        await m.post_offer()
        m.clock.now = k * EPOCH_S
        results: dict[str, list] = {}

        async def close(name: str, hub: Hub, k: int = k, results: dict = results) -> None:
            results[name] = await hub.market.close_epoch(k)

        async with trio.open_nursery() as nursery:  # both race for the epoch
            nursery.start_soon(close, "a", m.hub)
            nursery.start_soon(close, "b", other)
        assert results["a"] == results["b"] and len(results["a"]) == 1
        assert m.hub.market.book.price("ref-tiny") == other.market.book.price("ref-tiny") == results["a"][0]["price"]
    first_db.dispose()
    second_db.dispose()


# --- the settlement price check ---------------------------------------------------------

async def test_receipt_price_must_match_an_offer(db):
    m = Market(db)
    await m.register_host(offer=False)
    await m.hub.allowance(m.client, m.gateway.peer_id, 5_000_000)
    [o] = await m.hub.submit([m.receipt().encode()])
    assert (o.status, o.reason) == ("refused", NO_OFFER)

    await m.post_offer(price=PRICE, ttl=10)  # at t=1000, live until 1010
    m.clock.now = 1030.0
    await m.post_offer(price=PRICE // 2, ttl=10, seq=2)  # the host lowers its price at t=1030
    outs = await m.hub.submit([
        m.receipt(issued_at=1005.0).encode(),                       # under the old offer: its price settles
        m.receipt(issued_at=1040.0).encode(),                       # old price, within the minute after it ended
        m.receipt(issued_at=1035.0, price=PRICE // 2).encode(),     # the new price
        m.receipt(issued_at=1035.0, price=PRICE + 1).encode(),      # more than ever offered
    ])
    assert [x.status for x in outs] == ["settled", "settled", "settled", "refused"], [x.reason for x in outs]
    assert outs[3].reason == ABOVE_OFFER
    m.clock.now = 1120.0
    await m.post_offer(price=PRICE // 2, ttl=10, seq=3)
    m.clock.now = 1200.0
    late = m.receipt(issued_at=1130.0)  # old price, more than a minute after its last offer
    assert (await m.hub.submit([late.encode()]))[0].reason == ABOVE_OFFER
    assert (await m.hub.submit([m.receipt(issued_at=1130.0, price=PRICE // 2).encode()]))[0].status == "settled"


async def test_price_check_is_one_query_per_batch(db):
    m = await _market(db)
    other = Signer.generate()
    proof = other.sign(host_registration_statement(m.hub.hub_id, other.peer_id))
    await m.hub.register_host(m.host, other.peer_id, proof)
    await m.hub.post_offer(m.host, make_offer(other, issued_at=m.clock.now, price=PRICE // 2).encode())
    batch = [make_receipt(m.host_signer if i % 2 else other, m.gateway, issued_at=m.clock.now,
                          price=PRICE, tokens_in=10, tokens_out=0).encode() for i in range(300)]
    statements: list[str] = []
    sa.event.listen(db.engine, "before_cursor_execute", lambda *a: statements.append(a[2]))
    outs = await m.hub.submit(batch)
    assert [o.status for o in outs] == ["refused", "settled"] * 150
    assert {o.reason for o in outs[::2]} == {ABOVE_OFFER}
    assert sum("offer_prices" in s for s in statements) == 1


# --- the public routes and the serve loop -------------------------------------------------

async def test_prices_and_market_routes(db, nursery):
    m = await _market(db)
    for k in range(101, 106):
        await _epoch(m, k, tokens=1000)
    app = create_app(m.hub)
    stop = trio.Event()
    binds = await nursery.start(lambda task_status: serve(m.hub, app, port=0, shutdown_trigger=stop.wait, task_status=task_status))
    async with httpx.AsyncClient(base_url=binds[0], timeout=10) as http:
        r = await http.get("/v1/prices")
        assert r.status_code == 200 and r.json()["hub_id"] == m.hub.hub_id
        [blob] = r.json()["prices"]
        update = decode_as(PriceUpdate, base64.b64decode(blob))
        update.verify()
        assert update.epoch == 105
        doc = (await http.get("/v1/market")).json()
        assert doc["epoch_s"] == EPOCH_S
        [model] = doc["models"]
        assert set(model) == {"model", "epoch", "price_micro_per_mtok", "demand_tps", "supply_tps", "utilisation", "hosts",
                              "floor_micro_per_mtok", "ceiling_micro_per_mtok", "earnings_micro_per_gpu_hour", "history"}
        assert (model["model"], model["epoch"], model["price_micro_per_mtok"]) == ("ref-tiny", 105, update.price_micro_per_mtok)
        assert [h[0] for h in model["history"]] == [k * EPOCH_S for k in range(101, 106)]
        assert model["history"][-1][1] == update.price_micro_per_mtok
        assert model["ceiling_micro_per_mtok"] == CEILING and model["floor_micro_per_mtok"] == PRICE
        # 100 tok/s asked of 200 offered, a median host of 200 tok/s: a newcomer expects 1/4 of its capacity busy
        assert model["earnings_micro_per_gpu_hour"] == int(update.price_micro_per_mtok * 200 * 3600 * 0.25 // 1_000_000)
        spec = (await http.get("/openapi.json")).json()["paths"]
        assert spec["/v1/prices"]["get"]["security"] == [] and spec["/v1/market"]["get"]["security"] == []
        assert "/v1/offers" in spec
    stop.set()


async def test_served_hub_closes_epochs_on_its_own(tmp_path, nursery):
    db = Database(f"sqlite:///{tmp_path}/live.db")
    db.create_schema()
    hub = Hub(db, Signer.generate(), HubConfig(epoch_s=0.2))
    _, host_key = db.write_sync(keys.add_user, "h@example.com", "host")
    host_user = await hub.authenticate(host_key)
    host = Signer.generate()
    await hub.register_host(host_user, host.peer_id, host.sign(host_registration_statement(hub.hub_id, host.peer_id)))
    await hub.post_offer(host_user, make_offer(host, issued_at=time.time(), ttl=30, price=100_000).encode())
    stop = trio.Event()
    binds = await nursery.start(lambda task_status: serve(hub, create_app(hub), port=0, shutdown_trigger=stop.wait, task_status=task_status))
    async with httpx.AsyncClient(base_url=binds[0], timeout=10) as http:
        with trio.fail_after(10):
            while True:
                models = (await http.get("/v1/market")).json()["models"]
                if models and len(models[0]["history"]) >= 3:
                    break
                await trio.sleep(0.1)
    epochs = [round(t / 0.2) for t, _ in models[0]["history"]]
    assert epochs == sorted(set(epochs))
    assert models[0]["ceiling_micro_per_mtok"] == 600_000 and models[0]["hosts"] == 1
    stop.set()
    db.dispose()


def test_serve_flags(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("GPUNEXUS_HOME", str(tmp_path))
    assert hub_cli._reference_prices(["llama-3-8b=0.25", "org/model=v2=1.5", "0.9"]) == (
        900_000, {"llama-3-8b": 250_000, "org/model=v2": 1_500_000})
    parser = argparse.ArgumentParser(prog="gpunexus")
    hub_cli.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["hub", "serve", "--epoch-s", "30", "--reference-price", "m=1"])
    assert (args.epoch_s, args.reference_price) == (30.0, ["m=1"])
    for bad in (["--reference-price", "m=abc"], ["--reference-price", "m=0"], ["--epoch-s", "0"]):
        args = parser.parse_args(["hub", "serve", *bad])
        assert args.func(args) == 1
    assert "error" in capsys.readouterr().err


async def test_offer_refusals_at_the_service(db):
    m = Market(db)
    await m.register_host(offer=False)
    with pytest.raises(HubError) as e:
        await m.hub.post_offer(m.client, make_offer(m.host_signer, issued_at=m.clock.now).encode())
    assert e.value.status == 403
    with pytest.raises(HubError) as e:
        await m.hub.post_offer(m.host, b"\x93junk")
    assert e.value.status == 400
