"""Allowances and receipt settlement on real databases: exactly once, nothing for forgeries."""

from __future__ import annotations

import base64
import json
import threading

import pytest
from gpunexus.hub import audit, catalogue, chain, keys, ledger, receipts
from gpunexus.hub.service import HubError
from gpunexus.protocol.signing import Signer
from test_hub_support import backend, db, make_receipt, market  # noqa: F401


def _state(m):
    return m.hub.db.read_sync(lambda c: {
        "client": ledger.balance(c, m.client.account_id),
        "host": ledger.balance(c, m.host.account_id),
        "fee": ledger.balance(c, ledger.system_account(c, ledger.FEE)),
        "holds": ledger.balance(c, ledger.system_account(c, ledger.HOLDS)),
        "ok": ledger.verify(c).ok,
    })


async def test_allowance_is_signed_and_reserved(market):
    a = await market.hub.allowance(market.client, market.gateway.peer_id, 1_000_000)
    a.verify()
    assert (a.hub_id, a.gateway_id, a.budget_micro) == (market.hub.hub_id, market.gateway.peer_id, 1_000_000)
    assert a.expires_at == market.clock.now + market.hub.config.allowance_ttl_s
    assert _state(market)["client"] == 9_000_000 and _state(market)["holds"] == 1_000_000
    # a renewal rolls the unspent budget over and only tops it up
    b = await market.hub.allowance(market.client, market.gateway.peer_id, 1_500_000)
    assert b.budget_micro == 1_500_000 and _state(market)["holds"] == 1_500_000
    assert (await market.hub.balance(market.client))["held_micro"] == 1_500_000


async def test_allowance_refusals(market):
    with pytest.raises(HubError) as e:
        await market.hub.allowance(market.host, market.gateway.peer_id, None)  # host has no credit
    assert e.value.status == 402
    await market.hub.allowance(market.client, market.gateway.peer_id, None)
    market.hub.grant_sync("host@example.com", 5, "g")
    with pytest.raises(HubError) as e:
        await market.hub.allowance(market.host, market.gateway.peer_id, None)  # peer id bound to client
    assert e.value.status == 409


async def test_settle_once_and_split(market):
    await market.hub.allowance(market.client, market.gateway.peer_id, 1_000_000)
    r = market.receipt(tokens_in=100, tokens_out=400)
    assert r.cost_micro == 1000
    [o] = await market.hub.submit([r.encode()])
    assert (o.status, o.seq, o.cost_micro) == ("settled", 1, 1000)
    s = _state(market)
    assert (s["host"], s["fee"], s["holds"], s["ok"]) == (900, 100, 999_000, True)
    # the same receipt again, alone and inside a batch: duplicate, nothing posted
    outs = await market.hub.submit([r.encode(), r.encode()])
    assert [o.status for o in outs] == ["duplicate", "duplicate"]
    assert _state(market) == s
    earnings = await market.hub.earnings(market.host)
    assert (earnings["amount_micro"], earnings["requests"], earnings["balance_micro"]) == (900, 1, 900)
    usage = await market.hub.usage(market.client)
    assert (usage["tokens"], usage["amount_micro"]) == (500, 1000)


async def test_a_receipt_for_a_model_every_covering_allowance_refuses_settles_nothing(market):
    hub, clock = market.hub, market.clock
    hub.db.write_sync(catalogue.upsert, catalogue.Model("ref-tiny", "Reference tiny", "", "", None, True, clock.now))
    await hub.allowance(market.client, market.gateway.peer_id, 1_000_000)
    clock.now += 10
    admin = hub.db.write_sync(keys.create_user, "ops@example.com", "admin")
    await hub.set_model_available(admin, "ref-tiny", False)
    a = await hub.allowance(market.client, market.gateway.peer_id, 1_000_000)
    assert a.refused_models == ("ref-tiny",)
    # Issued while the allowance from before the switch-off was still valid: served in good faith, paid.
    [o] = await hub.submit([market.receipt(issued_at=clock.now).encode()])
    assert o.status == "settled"
    clock.now += hub.config.allowance_ttl_s + hub.config.clock_skew_s + 1
    await market.post_offer()
    await hub.allowance(market.client, market.gateway.peer_id, 1_000_000)
    before = _state(market)
    [o] = await hub.submit([market.receipt(issued_at=clock.now).encode()])
    assert o.status == "refused" and "refuses model 'ref-tiny'" in o.reason
    assert _state(market) == before


async def test_forgeries_post_nothing(market):
    await market.hub.allowance(market.client, market.gateway.peer_id, 1_000_000)
    before = _state(market)
    good = market.receipt()
    data = bytearray(good.encode())
    data[-70] ^= 0x01  # one byte of the host signature... or of what it covers
    tampered_count = bytearray(good.encode())
    idx = tampered_count.index(good.model.encode())
    tampered_count[idx] ^= 0x01
    host_only = market.receipt(countersign=False)
    wrong_cost = market.receipt(cost=1)
    unknown_host = make_receipt(Signer.generate(), market.gateway, issued_at=market.clock.now)
    future = market.receipt(issued_at=market.clock.now + 3600)
    outs = await market.hub.submit([bytes(data), bytes(tampered_count), host_only.encode(), wrong_cost.encode(),
                                    unknown_host.encode(), future.encode(), b"\x93garbage"])
    assert [o.status for o in outs] == ["refused"] * 7
    reasons = [o.reason for o in outs]
    assert "signature" in reasons[0] and "signature" in reasons[1]
    assert "missing gateway_sig" in reasons[2]
    assert "cost" in reasons[3] and "unknown host" in reasons[4] and "future" in reasons[5]
    assert outs[0].request_id == good.request_id
    assert _state(market) == before
    # the genuine receipt still settles afterwards
    assert (await market.hub.submit([good.encode()]))[0].status == "settled"


async def test_allowance_window_and_late_delivery(market):
    cfg = market.hub.config
    a = await market.hub.allowance(market.client, market.gateway.peer_id, 1_000_000)
    served = market.receipt(issued_at=a.expires_at - 1)
    too_late = market.receipt(issued_at=a.expires_at + cfg.clock_skew_s + 1)
    # hub unreachable for a long while: holds are released, the receipt comes later
    market.clock.now = a.expires_at + cfg.allowance_grace_s + 10
    assert await market.hub.release_expired() == 1
    assert _state(market)["holds"] == 0 and _state(market)["client"] == 10_000_000
    outs = await market.hub.submit([served.encode(), too_late.encode()])
    assert [o.status for o in outs] == ["settled", "refused"]
    assert outs[1].reason == "allowance expired"
    assert _state(market)["client"] == 10_000_000 - served.cost_micro
    [o] = await market.hub.submit([make_receipt(market.host_signer, Signer.generate(), issued_at=market.clock.now).encode()])
    assert o.reason == "no allowance issued to this gateway"


async def test_insufficient_funds_refused(market):
    await market.hub.allowance(market.client, market.gateway.peer_id, 10_000_000)  # everything held
    big = market.receipt(tokens_in=5_000_000, tokens_out=0)  # 10 USD
    bigger = market.receipt(tokens_in=1, tokens_out=0)
    outs = await market.hub.submit([big.encode(), bigger.encode()])
    assert [o.status for o in outs] == ["settled", "refused"]
    assert outs[1].reason == "insufficient funds"
    s = _state(market)
    assert s["client"] == 0 and s["holds"] == 0 and s["ok"]


async def test_concurrent_batches_settle_each_receipt_once(market):
    await market.hub.allowance(market.client, market.gateway.peer_id, 5_000_000)
    batch = [market.receipt().encode() for _ in range(50)]
    results = []

    def submit():
        checked = receipts.precheck(batch, market.hub.config)
        results.append(market.hub.db.write_sync(receipts.settle, market.hub.signer, market.hub.config, checked, market.clock.now))

    threads = [threading.Thread(target=submit) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    statuses = sorted(o.status for res in results for o in res)
    assert statuses.count("settled") == 50 and statuses.count("duplicate") == 100
    assert _state(market)["host"] == sum(900 for _ in range(50))


async def test_export_and_audit(market, tmp_path, capsys):
    await market.hub.allowance(market.client, market.gateway.peer_id, 1_000_000)
    await market.hub.submit([market.receipt().encode() for _ in range(5)])
    path = tmp_path / "log.jsonl"
    chain.write_log(str(path), market.hub.hub_id, await market.hub.export())
    assert audit.run(str(path)) == 0
    out = capsys.readouterr().out
    assert "5 entries, 0 faults" in out and "OK" in out
    assert audit.run(str(path), hub_id=market.gateway.peer_id) == 1

    lines = path.read_text().splitlines()
    third = json.loads(lines[3])
    entry = bytearray(base64.b64decode(third["entry"]))
    entry[-20] ^= 0x01  # one byte inside the embedded receipt
    third["entry"] = base64.b64encode(bytes(entry)).decode()
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(lines[:3] + [json.dumps(third)] + lines[4:]) + "\n")
    capsys.readouterr()
    assert audit.run(str(bad)) == 1
    out = capsys.readouterr().out
    assert "FAULT entry 3" in out and "entry hash does not match" in out
    # dropping an entry breaks the chain at the next one
    gap = tmp_path / "gap.jsonl"
    gap.write_text("\n".join(lines[:2] + lines[3:]) + "\n")
    capsys.readouterr()
    assert audit.run(str(gap)) == 1
    assert "hash chain broken" in capsys.readouterr().out


async def test_revoked_key_fails_next_request(market):
    user = await market.hub.authenticate(market.client_key)
    assert user.email == "client@example.com"
    market.hub.db.write_sync(keys.revoke_key, market.client_key.split("_")[1])
    with pytest.raises(HubError) as e:
        await market.hub.authenticate(market.client_key)
    assert e.value.status == 401
    with pytest.raises(HubError):
        await market.hub.authenticate(market.client_key[:-1] + "x")


async def test_failure_mid_batch_commits_nothing(market, monkeypatch):
    """A hub dying halfway through a batch leaves no postings and no log entries behind."""
    await market.hub.allowance(market.client, market.gateway.peer_id, 1_000_000)
    before = _state(market)
    batch = [market.receipt().encode() for _ in range(10)]
    real_sign, calls = chain.sign_hash, []

    def dies_on_sixth(signer, digest):
        calls.append(digest)
        if len(calls) == 6:
            raise SystemExit("hub process killed")
        return real_sign(signer, digest)

    monkeypatch.setattr(chain, "sign_hash", dies_on_sixth)
    with pytest.raises(SystemExit):
        await market.hub.submit(batch)
    assert _state(market) == before and await market.hub.export() == []
    monkeypatch.setattr(chain, "sign_hash", real_sign)
    assert [o.status for o in await market.hub.submit(batch)] == ["settled"] * 10
    assert [seq for seq, *_ in await market.hub.export()] == list(range(1, 11))


async def test_parallel_precheck_matches_in_thread(market):
    good = [market.receipt().encode() for _ in range(7)]
    batch = good[:3] + [b"\x93junk", market.receipt(cost=5).encode()] + good[3:]
    parallel = receipts.ParallelPrecheck(2)
    try:
        assert parallel(batch, market.hub.config) == receipts.precheck(batch, market.hub.config)
    finally:
        parallel.close()
