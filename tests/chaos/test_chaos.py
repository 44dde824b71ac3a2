"""A short chaos run (real hub, hosts and gateways; see gpunexus/chaos.py), one test per invariant.

The run happens once per module; each test reads one invariant from the
returned :class:`~gpunexus.chaos.ChaosResult`, so a failure names the
invariant and lists its cases.
"""

from __future__ import annotations

import pytest

from gpunexus import chaos

pytestmark = pytest.mark.chaos

CONFIG = chaos.ChaosConfig(seed=1, rounds=2, round_s=6.0, drain_s=5.0, stream_deadline_s=40.0, run_deadline_s=240.0)


@pytest.fixture(scope="module")
def result() -> chaos.ChaosResult:
    return chaos.run(CONFIG)


def test_the_schedule_is_a_function_of_the_seed_and_holds_every_failure():
    a = chaos.make_schedule(CONFIG.seed, CONFIG.rounds, CONFIG.round_s)
    assert a == chaos.make_schedule(CONFIG.seed, CONFIG.rounds, CONFIG.round_s)
    assert a != chaos.make_schedule(CONFIG.seed + 1, CONFIG.rounds, CONFIG.round_s)
    kinds = [e.kind for r in a.rounds for e in r.events]
    assert set(kinds) == {"kill_host", "kill_hub", "busy", "grant", "revoke"} and kinds.count("revoke") == 1
    assert len({r.seed for r in a.requests}) == len(a.requests)  # a seed ties each receipt to its request


def test_the_run_really_was_chaotic(result):
    assert result.events["kill_host"] >= 1 and result.events["kill_hub"] >= 1
    assert result.events["busy"] >= 1 and result.events["grant"] >= 1 and result.events["revoke"] == 1
    assert sum(s.status == "completed" for s in result.chaos_streams()) >= 5
    assert result.receipts.settled >= 10


def test_every_completed_stream_has_the_exact_uninterrupted_text(result):
    assert not result.reference_mismatch, "the reference backend did not repeat itself on the healthy swarm"
    bad = [f"{s.client} req{s.request} r{s.round}: {s.status}: {s.detail}" for s in result.streams
           if s.status in ("wrong_text", "no_usage", "truncated")]
    assert not bad, bad


def test_no_stream_breaks_after_its_first_token_or_hangs(result):
    bad = [f"{s.client} req{s.request} r{s.round}: {s.status}: {s.detail}" for s in result.streams
           if s.status in ("broken", "hung")]
    assert not bad, bad


def test_no_receipt_is_settled_twice_and_the_log_passes_audit(result):
    assert not result.receipts.double_billed
    assert result.receipts.audit_exit == 0, result.receipts.audit_output
    assert result.receipts.billed_without_stream == 0


def test_no_receipt_is_lost(result):
    assert not result.receipts.lost, result.receipts.lost
    assert not result.receipts.refused_by_hub, result.receipts.refused_by_hub


def test_every_stream_a_client_saw_complete_is_paid(result):
    assert result.receipts.unpaid_work == 0


def test_the_ledger_balances(result):
    ledger = result.ledger
    assert ledger.accounts > 0 and ledger.total == 0
    assert not ledger.negative and not ledger.mismatched
    assert ledger.holds == ledger.live_allowances
    assert not any(ledger.client_drift.values()), ledger.client_drift


def test_no_process_is_left_running(result):
    assert result.processes_started >= 1 + 3 + len(chaos.CLIENTS)
    assert not result.left_running, result.left_running
