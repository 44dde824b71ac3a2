"""Peer verifiers as real peers: the hub sends audits to other hosts of the same model, judges, escalates, pays.

``hub_replay=False`` makes the hub treat "tiny" as a model it cannot run, so
every audit goes to peer verifiers exactly as one of an exllamav2 or
``--backend openai`` model does. Hosts run the reference backend; verifiers
are hosts too (``--verify`` is on by default), polled explicitly here so the
test decides when they work.
"""

from __future__ import annotations

import argparse
import dataclasses

import httpx
import sqlalchemy as sa
import trio

from gpunexus.hub import cli as hub_cli
from gpunexus.hub import honesty, ledger
from gpunexus.hub.config import HubConfig
from gpunexus.hub.db import audit_jobs, audits
from gpunexus.node.backends.reference import ReferenceBackend
from gpunexus.node.runtime import HubLogin
from gpunexus.node.host.verifier import PeerVerifier
from gpunexus.verify.peer import PrefillReport
from market import running_hub
from peers import running_gateway, running_host, wait_for_offers
from test_honesty_network import OtherModelBackend

USD = 1_000_000
NEVER = 3600.0
PRICE = 100_000_000  # micro-USD per million tokens: receipts of a few thousand micro-USD, so the fee account fills  # background polls: once at start (the hub learns the verifier), then the test drives them


class LazyVerifier(ReferenceBackend):
    """Never computes: echoes the host's commitment and claims every token was the likeliest."""

    async def prefill(self, job) -> PrefillReport:
        n = len(job.opening.output_ids)
        return PrefillReport("reference-float32", job.tokens_in, job.commitment, (-0.1,) * n, (0,) * n, 20, True, ())


async def _ask(http: httpx.AsyncClient, text: str) -> None:
    r = await http.post("/chat/completions", json={"model": "tiny", "messages": [{"role": "user", "content": text}],
                                                   "max_tokens": 24, "temperature": 1.0})
    assert r.status_code == 200, r.text


async def _open_audits(gateway) -> None:
    settlement = gateway.service.settlement
    await settlement.flush()
    assert len(settlement.queue) == 0
    await settlement.answer_audits()


async def _work(hub, verifiers, rounds: int = 4) -> None:
    """Let every verifier answer what it is given until no audit waits for one (or nothing moves)."""
    for _ in range(rounds):
        for v in verifiers:
            await v.verifier.poll_once()
        if not _statuses(hub).get("verifying"):
            return


def _statuses(hub) -> dict[str, int]:
    rows = hub.hub.db.read_sync(lambda c: c.execute(sa.select(audits.c.status, sa.func.count())
                                                    .group_by(audits.c.status)).all())
    return {s: n for s, n in rows}


def _jobs(hub) -> list:
    return hub.hub.db.read_sync(lambda c: c.execute(sa.select(audit_jobs).order_by(audit_jobs.c.created_at,
                                                                                 audit_jobs.c.round)).all())


def _total(hub) -> int:
    from gpunexus.hub.db import accounts

    return hub.hub.db.read_sync(lambda c: c.execute(sa.select(sa.func.sum(accounts.c.balance))).scalar_one())


async def test_an_honest_host_passes_on_an_honest_peer_verifier_who_is_paid_once(tmp_path):
    config = HubConfig(reference_price_micro_per_mtok=10 * PRICE, audit_rate=1.0, hub_replay=False, known_answer_rate=0.0, verifier_fee_micro=7)
    async with running_hub(tmp_path / "hub", config) as hub:
        client_key = hub.add_user("dev@example.com", "client", USD)
        host_key, verifier_key = hub.add_user("gpu@example.com", "host"), hub.add_user("verifier@example.com", "host")
        async with (
            running_host(hub=HubLogin(hub.url, host_key), price=PRICE, verify_poll_s=NEVER) as host,
            running_host(hub=HubLogin(hub.url, verifier_key), price=3 * PRICE, verify_poll_s=NEVER) as verifier,
        ):
            boot = [h.node.listen_addrs()[0] for h in (host, verifier)]
            async with running_gateway(boot, hub=HubLogin(hub.url, client_key), home=tmp_path / "gw") as gateway:
                await wait_for_offers(gateway, count=2)
                async with httpx.AsyncClient(base_url=gateway.base_url, timeout=60,
                                             headers={"authorization": f"Bearer {client_key}"}) as http:
                    for i in range(2):
                        await _ask(http, f"honest question {i}")
                assert {r.host_id for r in gateway.service.stats.receipts} == {host.node.peer_id}
                await _open_audits(gateway)
                assert _statuses(hub) == {"verifying": 2}
                before = hub.balance("verifier@example.com")
                await _work(hub, [host, verifier])
                assert _statuses(hub) == {"passed": 2}
                jobs = _jobs(hub)
                assert [(j.verifier_id, j.verdict, j.fee) for j in jobs] == [(verifier.node.peer_id, "passed", 7)] * 2
                assert hub.balance("verifier@example.com") == before + 14
                # Answering again changes nothing: the hub keeps its verdict and pays each job once.
                again = await verifier.hub.post_result(_resend(jobs[0]))
                assert again["already"] and hub.balance("verifier@example.com") == before + 14
                # Bad input changes nothing: another account's peer id, a result by the wrong peer, a forgery.
                async with httpx.AsyncClient(base_url=hub.url, headers={"authorization": f"Bearer {host_key}"}) as api:
                    r = await api.get("/v1/audits/jobs", params={"peer_id": verifier.node.peer_id,
                                                                 "model_hash": jobs[0].model_hash})
                    assert r.status_code == 403
                    r = await api.get("/v1/audits/jobs", params={"peer_id": host.node.peer_id})
                    assert r.status_code == 400
                    theirs = dataclasses.replace(_resend(jobs[0]), verifier_id=host.node.peer_id, sig=b"")
                    r = await api.post("/v1/audits/results", json={"result": _b64(theirs.signed(host.hub.signer))})
                    assert r.status_code == 409 and r.json()["error"]["code"] == "job_refused"
                    forged = dataclasses.replace(_resend(jobs[0]), prompt_tokens=1)
                    r = await api.post("/v1/audits/results", json={"result": _b64(forged)})
                    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_result"
                assert hub.balance("verifier@example.com") == before + 14
                assert verifier.verifier.status() == {"jobs": 2, "passed": 2, "failed": 0, "refused": 0, "fees_micro": 14}
                assert hub.hub.db.read_sync(ledger.verify).ok and _total(hub) == 0
                report = {h["peer_id"]: h for h in hub.hub.db.read_sync(honesty.host_report, 10)}
                recent = report[host.node.peer_id]["recent"]
                assert all(v["status"] == "passed" and v["verifiers"] == [
                    {"round": 1, "verifier_id": verifier.node.peer_id, "verdict": "passed"}] for v in recent)


def _b64(message) -> str:
    import base64

    return base64.b64encode(message.encode()).decode()


def _resend(job_row):
    from gpunexus.protocol.codec import decode_as
    from gpunexus.protocol.messages import VerifierResult

    return decode_as(VerifierResult, job_row.result)


async def test_another_model_fails_on_two_independent_verifiers_and_its_colluder_is_never_drawn(tmp_path, monkeypatch,
                                                                                              capsys):
    config = HubConfig(reference_price_micro_per_mtok=10 * PRICE, audit_rate=1.0, hub_replay=False, known_answer_rate=0.0)
    async with running_hub(tmp_path / "hub", config) as hub:
        client_key = hub.add_user("dev@example.com", "client", USD)
        keys = {name: hub.add_user(f"{name}@example.com", "host") for name in ("cheat", "v1", "v2")}
        async with (
            running_host(OtherModelBackend(), hub=HubLogin(hub.url, keys["cheat"]), price=PRICE,
                         verify_poll_s=NEVER) as cheat,
            # The cheat's own second host, verifying lazily: it would pass everything.
            running_host(LazyVerifier(), hub=HubLogin(hub.url, keys["cheat"]), price=9 * PRICE,
                         verify_poll_s=NEVER) as colluder,
            running_host(hub=HubLogin(hub.url, keys["v1"]), price=3 * PRICE, verify_poll_s=NEVER) as v1,
            running_host(hub=HubLogin(hub.url, keys["v2"]), price=3 * PRICE, verify_poll_s=NEVER) as v2,
        ):
            boot = [h.node.listen_addrs()[0] for h in (cheat, colluder, v1, v2)]
            async with running_gateway(boot, hub=HubLogin(hub.url, client_key), home=tmp_path / "gw") as gateway:
                await wait_for_offers(gateway, count=4)
                async with httpx.AsyncClient(base_url=gateway.base_url, timeout=60,
                                             headers={"authorization": f"Bearer {client_key}"}) as http:
                    for i in range(2):
                        await _ask(http, f"cheated question {i}")
                assert {r.host_id for r in gateway.service.stats.receipts} == {cheat.node.peer_id}
                await _open_audits(gateway)
                await _work(hub, [colluder, v1, v2, cheat])
                assert _statuses(hub) == {"failed": 2}
                jobs = _jobs(hub)
                honest_ids = {v1.node.peer_id, v2.node.peer_id}
                assert all(j.verifier_id in honest_ids and j.verdict == "failed" for j in jobs)
                by_audit: dict[str, list] = {}
                for j in jobs:
                    by_audit.setdefault(j.request_id, []).append(j)
                # Each failure rests on two rounds by two different verifiers; the colluder drew nothing.
                assert all(sorted(j.round for j in js) == [1, 2] and {j.verifier_id for j in js} == honest_ids
                           for js in by_audit.values())
                assert colluder.verifier.answered == {}
                report = {h["peer_id"]: h for h in hub.hub.db.read_sync(honesty.host_report, 10)}
                for verdict in report[cheat.node.peer_id]["recent"]:
                    assert verdict["status"] == "failed" and verdict["withheld_micro"] > 0
                    assert {v["verifier_id"] for v in verdict["verifiers"]} == honest_ids
                    assert any(r.startswith(f"verifier {v1.node.peer_id}: commitment") for r in verdict["reasons"])
                assert report[cheat.node.peer_id]["failures"] == 2
                # The operator sees who judged: `gpunexus hub hosts`, and the audit export.
                monkeypatch.setenv("GPUNEXUS_HOME", str(tmp_path / "hub"))
                parser = argparse.ArgumentParser(prog="gpunexus")
                hub_cli.register(parser.add_subparsers(dest="command", required=True))
                args = parser.parse_args(["hub", "hosts"])
                assert args.func(args) == 0
                out = capsys.readouterr().out
                assert out.count("verifier round 1: ") == 2 and out.count("verifier round 2: ") == 2
                assert v1.node.peer_id in out and v2.node.peer_id in out and colluder.node.peer_id not in out
                lines = hub.hub.db.read_sync(honesty.export_audits, config, 0.0)
                assert all(len(x["verifiers"]) == 2 for x in lines if x.get("kind") == "verdict")
                # `gpunexus audit --openings` says which verdicts rest on peer verifiers, and does not redo them.
                log, openings = str(tmp_path / "receipts.jsonl"), str(tmp_path / "openings.jsonl")
                for argv in (["hub", "receipts", "export", log], ["hub", "audits", "export", openings],
                             ["audit", log, "--openings", openings]):
                    args = parser.parse_args(argv)
                    assert args.func(args) == 0
                out = capsys.readouterr().out
                assert "FAULT" not in out and out.count("rests on peer verifiers") == 2
                assert hub.hub.db.read_sync(ledger.verify).ok and _total(hub) == 0


async def test_a_lazy_verifier_is_caught_by_a_known_answer_job_and_gets_no_more_work(tmp_path):
    config = HubConfig(reference_price_micro_per_mtok=10 * PRICE, audit_rate=1.0, hub_replay=False,
                       known_answer_rate=1.0, verifier_fee_micro=5)
    async with running_hub(tmp_path / "hub", config) as hub:
        client_key = hub.add_user("dev@example.com", "client", USD)
        host_key = hub.add_user("gpu@example.com", "host")
        lazy_keys = [hub.add_user(f"lazy{i}@example.com", "host") for i in (0, 1)]
        async with (
            running_host(hub=HubLogin(hub.url, host_key), price=PRICE, verify=False) as host,
            running_host(LazyVerifier(), hub=HubLogin(hub.url, lazy_keys[0]), price=3 * PRICE, verify_poll_s=NEVER) as l0,
            running_host(LazyVerifier(), hub=HubLogin(hub.url, lazy_keys[1]), price=3 * PRICE, verify_poll_s=NEVER) as l1,
        ):
            assert host.verifier is None  # --no-verify
            boot = [h.node.listen_addrs()[0] for h in (host, l0, l1)]
            lazy = {l0.node.peer_id: l0, l1.node.peer_id: l1}
            async with running_gateway(boot, hub=HubLogin(hub.url, client_key), home=tmp_path / "gw") as gateway:
                await wait_for_offers(gateway, count=3)
                async with httpx.AsyncClient(base_url=gateway.base_url, timeout=60,
                                             headers={"authorization": f"Bearer {client_key}"}) as http:
                    await _ask(http, "first question")
                    await _open_audits(gateway)
                    await _work(hub, [l0, l1], rounds=1)
                    jobs = {j.kind: j for j in _jobs(hub)}
                    # The audit and its known-answer twin went to different verifiers; both "passed".
                    assert sorted(jobs) == ["audit", "known-bad"]
                    assert jobs["audit"].verifier_id != jobs["known-bad"].verifier_id
                    assert {j.verdict for j in jobs.values()} == {"passed"}
                    caught, other = jobs["known-bad"].verifier_id, jobs["audit"].verifier_id
                    # Passing random text: no fee for that job, a failure on its own record.
                    assert (jobs["known-bad"].fee, jobs["audit"].fee) == (0, 5)
                    reps = dict(hub.hub.db.read_sync(honesty.reputations))
                    assert reps[caught].fails == 1 and reps[caught].p_honest < config.verifier_min_p_honest
                    assert other not in reps or reps[other].fails == 0
                    # From now on the caught verifier is never drawn.
                    await _ask(http, "second question")
                    await _open_audits(gateway)
                    assert await lazy[caught].verifier.poll_once() == 0
                    assert await lazy[other].verifier.poll_once() == 1
                    first = {j.request_id for j in jobs.values()}
                    later = [j for j in _jobs(hub) if j.request_id not in first]
                    assert sorted(j.status for j in later) == ["answered", "unassigned"]
                    assert all(j.verifier_id != caught for j in later)
                    assert hub.hub.db.read_sync(ledger.verify).ok and _total(hub) == 0


class HostileVerifier(ReferenceBackend):
    """Computes honestly, then claims the replay failed: every host it checks would fail."""

    async def prefill(self, job) -> PrefillReport:
        report = await super().prefill(job)
        return dataclasses.replace(report, replay_reasons=("seed-replay: token 0 is not what the seed draws",))


async def test_a_hostile_verifier_is_outvoted_the_honest_host_passes_and_the_hostile_one_gets_no_more_work(tmp_path):
    config = HubConfig(reference_price_micro_per_mtok=10 * PRICE, audit_rate=1.0, hub_replay=False, known_answer_rate=0.0)
    async with running_hub(tmp_path / "hub", config) as hub:
        client_key = hub.add_user("dev@example.com", "client", USD)
        keys = {name: hub.add_user(f"{name}@example.com", "host") for name in ("gpu", "hostile", "v1", "v2")}
        async with (
            running_host(hub=HubLogin(hub.url, keys["gpu"]), price=PRICE, verify=False) as host,
            running_host(HostileVerifier(), hub=HubLogin(hub.url, keys["hostile"]), price=3 * PRICE,
                         verify_poll_s=NEVER) as hostile,
            # These two start verifying only later, so that the hostile one is certainly drawn first.
            running_host(hub=HubLogin(hub.url, keys["v1"]), price=3 * PRICE, verify=False) as v1,
            running_host(hub=HubLogin(hub.url, keys["v2"]), price=3 * PRICE, verify=False) as v2,
        ):
            boot = [h.node.listen_addrs()[0] for h in (host, hostile, v1, v2)]
            async with running_gateway(boot, hub=HubLogin(hub.url, client_key), home=tmp_path / "gw") as gateway:
                await wait_for_offers(gateway, count=4)
                async with httpx.AsyncClient(base_url=gateway.base_url, timeout=60,
                                             headers={"authorization": f"Bearer {client_key}"}) as http:
                    await _ask(http, "an honest answer")
                    await _open_audits(gateway)
                    assert await hostile.verifier.poll_once() == 1  # round 1: "failed"
                    late = [PeerVerifier(v.hub, [ReferenceBackend("tiny")]) for v in (v1, v2)]
                    assert await late[0].poll_once() == 1  # round 2: passed, one against one
                    assert await late[0].poll_once() == 0  # the tie-break is never its own
                    assert await late[1].poll_once() == 1  # round 3: passed
                    assert _statuses(hub) == {"passed": 1}
                    jobs = _jobs(hub)
                    assert [(j.round, j.verifier_id, j.verdict) for j in jobs] == [
                        (1, hostile.node.peer_id, "failed"), (2, v1.node.peer_id, "passed"),
                        (3, v2.node.peer_id, "passed")]
                    reps = dict(hub.hub.db.read_sync(honesty.reputations))
                    assert reps[hostile.node.peer_id].fails == 1
                    assert reps[hostile.node.peer_id].p_honest < config.verifier_min_p_honest
                    assert host.node.peer_id not in reps or reps[host.node.peer_id].fails == 0
                    # Outvoted once, the hostile verifier is drawn no more.
                    await _ask(http, "another honest answer")
                    await _open_audits(gateway)
                    assert await hostile.verifier.poll_once() == 0
                    assert await late[0].poll_once() + await late[1].poll_once() == 1
                    assert _statuses(hub) == {"passed": 2}
                    assert hub.hub.db.read_sync(ledger.verify).ok and _total(hub) == 0


def test_node_serve_verifies_by_default_and_no_verify_turns_it_off():
    from gpunexus.node import cli as node_cli

    parser = argparse.ArgumentParser(prog="gpunexus")
    node_cli.register(parser.add_subparsers(dest="command", required=True))
    assert parser.parse_args(["node", "serve", "--model", "tiny"]).verify is True
    assert parser.parse_args(["node", "serve", "--model", "tiny", "--no-verify"]).verify is False
    assert parser.parse_args(["node", "serve", "--model", "tiny", "--verify"]).verify is True


async def test_a_job_not_answered_in_time_goes_to_another_verifier_and_the_late_answer_is_refused(tmp_path):
    import time

    import pytest

    from gpunexus.node.hub_client import HubRefused
    from gpunexus.node.host.verifier import result_for

    config = HubConfig(reference_price_micro_per_mtok=10 * PRICE, audit_rate=1.0, hub_replay=False,
                       known_answer_rate=0.0, verifier_job_ttl_s=0.5)
    async with running_hub(tmp_path / "hub", config) as hub:
        client_key = hub.add_user("dev@example.com", "client", USD)
        keys = {name: hub.add_user(f"{name}@example.com", "host") for name in ("gpu", "slow", "v2")}
        async with (
            running_host(hub=HubLogin(hub.url, keys["gpu"]), price=PRICE, verify=False) as host,
            running_host(hub=HubLogin(hub.url, keys["slow"]), price=3 * PRICE, verify=False) as slow,
            running_host(hub=HubLogin(hub.url, keys["v2"]), price=3 * PRICE, verify=False) as v2,
        ):
            boot = [h.node.listen_addrs()[0] for h in (host, slow, v2)]
            async with running_gateway(boot, hub=HubLogin(hub.url, client_key), home=tmp_path / "gw") as gateway:
                await wait_for_offers(gateway, count=3)
                async with httpx.AsyncClient(base_url=gateway.base_url, timeout=60,
                                             headers={"authorization": f"Bearer {client_key}"}) as http:
                    await _ask(http, "who answers this audit?")
                await _open_audits(gateway)
                backend = ReferenceBackend("tiny")
                [job] = await slow.hub.fetch_jobs([backend.info.model_hash])  # drawn, then silent
                report = await backend.prefill(job)
                await trio.sleep(0.6)  # its time is up
                assert await PeerVerifier(v2.hub, [backend]).poll_once() == 1
                assert _statuses(hub) == {"passed": 1}
                [row] = _jobs(hub)
                assert row.verifier_id == v2.node.peer_id and slow.node.peer_id in row.avoid
                late = result_for(job, report, slow.node.peer_id, time.time()).signed(slow.hub.signer)
                with pytest.raises(HubRefused) as refused:
                    await slow.hub.post_result(late)
                assert refused.value.status == 409


async def test_an_embedding_the_hub_cannot_replay_is_skipped_not_sent_to_verifiers(tmp_path):
    config = HubConfig(reference_price_micro_per_mtok=10 * PRICE, audit_rate=1.0, hub_replay=False)
    async with running_hub(tmp_path / "hub", config) as hub:
        client_key = hub.add_user("dev@example.com", "client", USD)
        host_key = hub.add_user("gpu@example.com", "host")
        async with running_host(hub=HubLogin(hub.url, host_key), price=PRICE, verify_poll_s=NEVER) as host:
            async with running_gateway([host.node.listen_addrs()[0]], hub=HubLogin(hub.url, client_key),
                                       home=tmp_path / "gw") as gateway:
                await wait_for_offers(gateway)
                async with httpx.AsyncClient(base_url=gateway.base_url, timeout=60,
                                             headers={"authorization": f"Bearer {client_key}"}) as http:
                    r = await http.post("/embeddings", json={"model": "tiny", "input": "a vector, please"})
                    assert r.status_code == 200, r.text
                await _open_audits(gateway)
                assert _statuses(hub) == {"skipped": 1} and _jobs(hub) == []


async def test_a_peer_that_only_claims_the_model_hash_but_serves_no_offer_is_never_drawn(tmp_path):
    from gpunexus.node.hub_client import HostHubLink
    from gpunexus.protocol.signing import Signer

    config = HubConfig(reference_price_micro_per_mtok=10 * PRICE, audit_rate=1.0, hub_replay=False, known_answer_rate=0.0)
    async with running_hub(tmp_path / "hub", config) as hub:
        client_key = hub.add_user("dev@example.com", "client", USD)
        host_key, idle_key = hub.add_user("gpu@example.com", "host"), hub.add_user("idle@example.com", "host")
        idle = HostHubLink(hub.url, idle_key, Signer.generate())
        await idle.connect()  # a registered host peer of its own account, with no offer at all
        async with running_host(hub=HubLogin(hub.url, host_key), price=PRICE, verify=False) as host:
            async with running_gateway([host.node.listen_addrs()[0]], hub=HubLogin(hub.url, client_key),
                                       home=tmp_path / "gw") as gateway:
                await wait_for_offers(gateway)
                async with httpx.AsyncClient(base_url=gateway.base_url, timeout=60,
                                             headers={"authorization": f"Bearer {client_key}"}) as http:
                    await _ask(http, "who may check this?")
                await _open_audits(gateway)
                assert await idle.fetch_jobs([host.service.first.backend.info.model_hash]) == []
                assert [j.status for j in _jobs(hub)] == ["unassigned"]
        await idle.aclose()
