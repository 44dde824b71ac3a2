"""Per-key spend limits and expiry at the hub: allowances never promise past a limit, and say which."""

from __future__ import annotations

import datetime as dt
import time

import pytest
from gpunexus.hub import keys, ledger
from gpunexus.hub.service import HubError
from gpunexus.protocol.signing import Signer
from test_hub_support import Market, backend, db  # noqa: F401

DAY = 86400.0


def _noon(day: int = 10, month: int = 3) -> float:
    return dt.datetime(2026, month, day, 12, tzinfo=dt.UTC).timestamp()


async def _limited_market(db, **limits) -> tuple[Market, str]:
    """A market on 2026-03-10 12:00 UTC whose client has a key with ``limits``; (market, key id)."""
    m = Market(db)
    m.clock.now = _noon()
    await m.register_host()
    key = db.write_sync(lambda c: keys.create_key(c, m.client, "limited", **limits))
    return m, keys.key_id_of(key)


async def _settle(m: Market, n: int, gateway: Signer | None = None) -> None:
    """``n`` receipts of 1,000 micro-USD each, from ``gateway`` (default the market's)."""
    from test_hub_support import make_receipt

    await m.post_offer(seq=int(m.clock.now))  # receipts settle at a price the host offered just before
    blobs = [make_receipt(m.host_signer, gateway or m.gateway, issued_at=m.clock.now).encode() for _ in range(n)]
    assert {o.status for o in await m.hub.submit(blobs)} == {"settled"}


async def test_an_allowance_never_holds_more_than_the_day_limit_leaves(db):
    m, key_id = await _limited_market(db, limit_day_micro=2_500)
    issued = await m.hub.issue_allowance(m.client, m.gateway.peer_id, 1_000_000, key_id)
    assert issued.allowance.budget_micro == 2_500 and issued.limited_by_balance
    assert issued.limit_note == "This API key's daily spend limit of 0.0025 USD (resets at 00:00 UTC) is reached."
    await _settle(m, 2)  # 2,000 spent, 500 still held
    assert db.read_sync(keys.spend, [key_id], m.clock.now)[key_id].day_micro == 2_000
    # A second gateway of the same key gets nothing: the first still holds what is left.
    other = Signer.generate()
    with pytest.raises(HubError) as refused:
        await m.hub.issue_allowance(m.client, other.peer_id, 1_000_000, key_id)
    assert (refused.value.status, refused.value.code) == (402, "key_limit_reached")
    assert "daily spend limit of 0.0025 USD" in refused.value.message
    # A renewal carries the 500 over and adds nothing.
    assert (await m.hub.allowance(m.client, m.gateway.peer_id, 1_000_000, key_id)).budget_micro == 500
    # A key without limits of the same account is not held back.
    assert (await m.hub.allowance(m.client, other.peer_id, 1_000_000, keys.key_id_of(m.client_key))).budget_micro == 1_000_000

    m.clock.now += DAY  # next UTC day: the day's spend starts again, less what is still held
    m.clock.now += m.hub.config.allowance_grace_s
    await m.hub.release_expired()
    assert (await m.hub.allowance(m.client, m.gateway.peer_id, 1_000_000, key_id)).budget_micro == 2_500
    assert db.read_sync(ledger.verify).ok


async def test_the_month_limit_binds_across_days_and_resets_on_the_first(db):
    m, key_id = await _limited_market(db, limit_day_micro=2_000, limit_month_micro=3_000)
    assert (await m.hub.allowance(m.client, m.gateway.peer_id, None, key_id)).budget_micro == 2_000
    await _settle(m, 2)
    m.clock.now += DAY
    issued = await m.hub.issue_allowance(m.client, m.gateway.peer_id, None, key_id)
    assert issued.allowance.budget_micro == 1_000  # the month has 1,000 left, the day 2,000
    assert "monthly spend limit of 0.003 USD (resets on the 1st, 00:00 UTC)" in issued.limit_note
    await _settle(m, 1)
    m.clock.now += DAY
    with pytest.raises(HubError) as refused:
        await m.hub.issue_allowance(m.client, m.gateway.peer_id, None, key_id)
    assert refused.value.status == 402 and "monthly spend limit" in refused.value.message
    m.clock.now = _noon(day=1, month=4)
    assert (await m.hub.allowance(m.client, m.gateway.peer_id, None, key_id)).budget_micro == 2_000


async def test_an_expired_key_gets_401_and_no_allowance_outlives_its_key(db):
    m = Market(db)
    m.clock.now = time.time()  # keys expire on wall time
    await m.register_host()
    soon = m.clock.now + 60
    key = db.write_sync(lambda c: keys.create_key(c, m.client, "short", soon))
    issued = await m.hub.issue_allowance(m.client, m.gateway.peer_id, None, keys.key_id_of(key))
    assert issued.allowance.expires_at == soon and issued.key_expires_at == soon
    gone = db.write_sync(lambda c: keys.create_key(c, m.client, "gone", time.time() - 1))
    with pytest.raises(HubError) as refused:
        await m.hub.authenticate(gone)
    assert refused.value.status == 401 and refused.value.message == "Incorrect API key provided."
    assert [k.status(time.time()) for k in db.read_sync(keys.list_keys, None)][-1] == "expired"


def test_limits_must_be_positive(db):
    m = Market(db)
    for bad in (0, -5, keys.MAX_LIMIT_MICRO + 1):
        with pytest.raises(keys.UserError, match="spend limit"):
            db.write_sync(lambda c: keys.create_key(c, m.client, "x", limit_day_micro=bad))
    assert len(db.read_sync(keys.list_keys, "client@example.com")) == 1  # nothing half-made
