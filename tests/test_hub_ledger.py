"""Ledger invariants on real databases: conservation, no overdraft, idempotency."""

from __future__ import annotations

import tempfile
import threading

import pytest
from gpunexus.hub import ledger
from gpunexus.hub.ledger import InsufficientFunds, Journal
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_hub_support import BACKENDS, backend, db, fresh_db  # noqa: F401

USERS = ["user:a", "user:b", "user:c"]

op = st.one_of(
    st.tuples(st.just("grant"), st.sampled_from(USERS), st.integers(0, 5_000), st.integers(0, 6)),
    st.tuples(st.just("move"), st.sampled_from(USERS), st.sampled_from(USERS + [ledger.FEE]), st.integers(0, 5_000), st.integers(0, 6)),
)


def _run_ops(database, ops):
    """Apply ``ops`` (with keys that repeat, as replays do) and mirror them in a model."""
    model: dict[str, int] = {}
    seen: set[str] = set()

    def setup(conn):
        ids = {n: ledger.open_account(conn, n) for n in USERS}
        ids.update({n: ledger.system_account(conn, n) for n in ledger.SYSTEM_ACCOUNTS})
        return ids

    ids = database.write_sync(setup)
    model = {n: 0 for n in ids}
    for o in ops:
        if o[0] == "grant":
            _, user, amount, k = o
            key, src, dst = f"grant:{user}:{k}", ledger.GRANTS, user
        else:
            _, src, dst, amount, k = o
            key = f"move:{src}:{dst}:{k}"
        entry = Journal(key, o[0], ((ids[src], -amount), (ids[dst], amount)))
        try:
            posted = database.write_sync(ledger.post, entry)
        except InsufficientFunds:
            assert key not in seen and model[src] - amount < 0
            continue
        assert posted == (key not in seen)
        if posted:
            seen.add(key)
            model[src] -= amount
            model[dst] += amount
    return ids, model


@pytest.mark.parametrize("backend_name", BACKENDS)
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=st.lists(op, max_size=25))
def test_conservation_no_negative_idempotent(backend_name, ops):
    with tempfile.TemporaryDirectory() as tmp:
        database = fresh_db(backend_name, tmp)
        try:
            ids, model = _run_ops(database, ops)
            check = database.read_sync(ledger.verify)
            assert check.ok, check
            balances = database.read_sync(lambda c: {n: ledger.balance(c, i) for n, i in ids.items()})
            assert balances == model
            assert all(v >= 0 for n, v in balances.items() if not ledger.SYSTEM_ACCOUNTS.get(n, False))
        finally:
            database.dispose()


def test_unbalanced_journal_is_refused():
    with pytest.raises(ValueError):
        Journal("k", "x", ((1, -5), (2, 4)))


def test_concurrent_spending_never_overdraws(db):
    """Eight threads race to spend 7 from a balance of 100: exactly 14 succeed."""
    def setup(conn):
        a = ledger.open_account(conn, "user:spender")
        b = ledger.open_account(conn, "user:payee")
        ledger.post(conn, Journal("grant:1", "grant", ((ledger.system_account(conn, ledger.GRANTS), -100), (a, 100))))
        return a, b

    a, b = db.write_sync(setup)
    results: list[bool] = []
    lock = threading.Lock()

    def spender(t: int) -> None:
        for i in range(5):
            entry = Journal(f"spend:{t}:{i}", "spend", ((a, -7), (b, 7)))
            try:
                db.write_sync(ledger.post, entry)
                ok = True
            except InsufficientFunds:
                ok = False
            with lock:
                results.append(ok)

    threads = [threading.Thread(target=spender, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results.count(True) == 14
    assert db.read_sync(lambda c: ledger.balance(c, a)) == 2
    assert db.read_sync(ledger.verify).ok


def _spend_in_process(url: str, a: int, b: int, tag: str, n: int) -> int:
    """A separate hub process spending from account ``a``: how many debits it got."""
    from gpunexus.hub.db import Database

    database = Database(url)
    ok = 0
    for i in range(n):
        entry = Journal(f"spend:{tag}:{i}", "spend", ((a, -3), (b, 3)))
        try:
            ok += database.write_sync(ledger.post, entry)
        except InsufficientFunds:
            pass
    database.dispose()
    return ok


def test_two_hub_processes_never_overdraw(db):
    """Two OS processes on one database race to spend 3 from 100: exactly 33 debits win."""
    import multiprocessing

    def setup(conn):
        a = ledger.open_account(conn, "user:shared")
        b = ledger.open_account(conn, "user:sink")
        ledger.post(conn, Journal("grant:1", "grant", ((ledger.system_account(conn, ledger.GRANTS), -100), (a, 100))))
        return a, b

    a, b = db.write_sync(setup)
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        wins = pool.starmap(_spend_in_process, [(db.url, a, b, "p1", 40), (db.url, a, b, "p2", 40)])
    assert sum(wins) == 33
    assert db.read_sync(lambda c: ledger.balance(c, a)) == 1
    assert db.read_sync(ledger.verify).ok
