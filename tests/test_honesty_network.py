"""Cheating hosts as real peers: a real hub audits every receipt, withholds their pay, gateways drop them.

Three hosts serve "tiny" with the reference backend through one paid gateway:
the cheapest runs another model under the right model's name (other weight
seed), the next ignores the order's seed, the dearest is honest. With
``audit_rate=1.0`` every settled receipt is audited; the gateway sends the
cheapest host traffic until the hub's signed reputation excludes it, so the
traffic walks from cheat to cheat to the honest host.
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import hashlib
import json

import httpx
import sqlalchemy as sa
import trio

from gpunexus.hub import cli as hub_cli
from gpunexus.hub import honesty, ledger
from gpunexus.hub.config import HubConfig
from gpunexus.hub.db import audits, receipt_log
from gpunexus.node.backends.base import GenerationRequest, GenerationResult, Token
from gpunexus.node.backends.reference import ReferenceBackend
from gpunexus.node.runtime import HubLogin
from gpunexus.protocol.codec import decode_as
from gpunexus.protocol.messages import ChatMessage, HostReputation, Opening, Sampling
from gpunexus.verify import selection
from gpunexus.verify.attacks import other_model, quantized_copy
from market import running_hub
from peers import running_gateway, running_host, wait_for_offers

USD = 1_000_000


class OtherModelBackend(ReferenceBackend):
    """Runs another weight seed but announces (and signs receipts with) the reference model's hash."""

    def __init__(self) -> None:
        super().__init__("tiny")
        self.model = other_model(self.model, self.tokenizer, weight_seed=99)


class WrongSeedBackend:
    """The right model, but its own seed instead of the order's."""

    def __init__(self) -> None:
        self.inner = ReferenceBackend("tiny")
        self.info = self.inner.info

    async def generate(self, request: GenerationRequest, tokens: trio.MemorySendChannel[Token]) -> GenerationResult:
        sampling = dataclasses.replace(request.sampling, seed=(request.sampling.seed + 12345) % 2**63)
        return await self.inner.generate(dataclasses.replace(request, sampling=sampling), tokens)

    async def aclose(self) -> None:
        await self.inner.aclose()


class InflatingBackend(ReferenceBackend):
    """Serves honestly but bills 40 prompt tokens more than the prompt has.

    The gateway cannot count prompt tokens without the host's tokenizer, so it
    countersigns; the audit recounts them. (An inflated ``tokens_out`` never
    gets that far: the gateway counts the tokens it received and refuses to
    countersign, see ``test_node_failover`` / ``_receipt_problems``.)
    """

    async def generate(self, request: GenerationRequest, tokens: trio.MemorySendChannel[Token]) -> GenerationResult:
        result = await super().generate(request, tokens)
        return dataclasses.replace(result, prompt_tokens=result.prompt_tokens + 40)


class RoundedWeightsBackend(ReferenceBackend):
    """The reference weights rounded to 4 bits per channel (a cheaper model), under the reference hash."""

    def __init__(self) -> None:
        super().__init__("tiny")
        self.model = quantized_copy(self.model, bits=4)


class ReplayBackend(ReferenceBackend):
    """Answers its first request honestly, then replays that answer (and receipt data) to every later one."""

    def __init__(self) -> None:
        super().__init__("tiny")
        self.recorded: tuple[list[Token], GenerationResult] | None = None

    async def generate(self, request: GenerationRequest, tokens: trio.MemorySendChannel[Token]) -> GenerationResult:
        if self.recorded is None:
            send, receive = trio.open_memory_channel(float("inf"))
            result = await super().generate(request, send)
            send.close()
            seen = [t async for t in receive]
            for t in seen:
                tokens.send_nowait(t)
            self.recorded = (seen, result)
            return result
        seen, result = self.recorded
        for t in seen:
            tokens.send_nowait(t)
        return result


class _CountDoubler:
    def __init__(self, inner) -> None:
        self.inner, self.first = inner, True

    def send_nowait(self, token: Token) -> None:
        if self.first:  # bill the first token twice (its chunk then carries no ids)
            token, self.first = dataclasses.replace(token, count=2), False
        self.inner.send_nowait(token)


class InflatedOutputBackend(ReferenceBackend):
    """Claims one token more than it produced, by reporting the first token as two.

    The gateway counts what the host claims per chunk, so it countersigns; the
    audit sees token ids that do not add up to ``tokens_out``.
    """

    async def generate(self, request: GenerationRequest, tokens: trio.MemorySendChannel[Token]) -> GenerationResult:
        return await super().generate(dataclasses.replace(request, max_tokens=request.max_tokens - 1), _CountDoubler(tokens))


async def _ask(http: httpx.AsyncClient, text: str) -> None:
    r = await http.post("/chat/completions", json={"model": "tiny", "messages": [{"role": "user", "content": text}],
                                                   "max_tokens": 24, "temperature": 1.0})
    assert r.status_code == 200, r.text


async def test_cheaters_fail_audits_lose_pay_and_are_excluded_honest_host_keeps_earnings(tmp_path, monkeypatch, capsys):
    config = HubConfig(audit_rate=1.0)
    async with running_hub(tmp_path / "hub", config) as hub:
        client_key = hub.add_user("dev@example.com", "client", 5 * USD)
        keys = {name: hub.add_user(f"{name}@example.com", "host") for name in ("other", "seed", "inflate", "honest")}
        async with (
            running_host(OtherModelBackend(), hub=HubLogin(hub.url, keys["other"]), price=100_000) as other,
            running_host(WrongSeedBackend(), hub=HubLogin(hub.url, keys["seed"]), price=150_000) as seed,
            running_host(InflatingBackend(), hub=HubLogin(hub.url, keys["inflate"]), price=175_000) as inflate,
            running_host(hub=HubLogin(hub.url, keys["honest"]), price=200_000) as honest,
        ):
            boot = [h.node.listen_addrs()[0] for h in (other, seed, inflate, honest)]
            async with running_gateway(boot, hub=HubLogin(hub.url, client_key), home=tmp_path / "gw") as gateway:
                await wait_for_offers(gateway, count=4)
                settlement = gateway.service.settlement
                ids = {"other": other.node.peer_id, "seed": seed.node.peer_id, "inflate": inflate.node.peer_id,
                       "honest": honest.node.peer_id}
                served: dict[str, list] = {}
                async with httpx.AsyncClient(base_url=gateway.base_url, timeout=60,
                                             headers={"authorization": f"Bearer {client_key}"}) as http:
                    for phase in ("other", "seed", "inflate", "honest"):
                        before = len(gateway.service.stats.receipts)
                        for i in range(2):
                            await _ask(http, f"{phase} question {i}")
                        new = gateway.service.stats.receipts[before:]
                        # The cheapest host not yet excluded got the traffic.
                        assert {r.host_id for r in new} == {ids[phase]}
                        assert all(r.commitment for r in new)  # hosts commit while generating
                        served[phase] = new
                        await settlement.flush()
                        assert len(settlement.queue) == 0
                        await settlement.answer_audits()  # audit_rate=1: every receipt opened
                        await settlement.refresh_reputation()
                        assert settlement.excluded_host(ids[phase]) == (phase != "honest")

                # The hub's verdicts, with the right reasons.
                report = {h["peer_id"]: h for h in hub.hub.db.read_sync(honesty.host_report, 10)}
                verdicts = {name: report[pid]["recent"] for name, pid in ids.items()}
                cheats = verdicts["other"] + verdicts["seed"] + verdicts["inflate"]
                assert len(cheats) == 6 and all(v["status"] == "failed" for v in cheats)
                assert all(v["status"] == "passed" and not v["reasons"] for v in verdicts["honest"])
                codes = lambda v: {r.split(":", 1)[0] for r in v["reasons"]}
                assert all("commitment" in codes(v) and "seed-replay" in codes(v) for v in verdicts["other"])
                # Right model, wrong seed: the activations check out, the draws do not.
                assert all(codes(v) == {"seed-replay"} for v in verdicts["seed"])
                assert all(codes(v) == {"count"} and "tokens_in" in v["reasons"][0] for v in verdicts["inflate"])
                assert all(report[ids[name]]["excluded"] for name in ("other", "seed", "inflate"))
                assert not report[ids["honest"]]["excluded"]

                # Money: the cheats' shares went back to the client, the honest host keeps its pay.
                fee = hub.hub.config.fee
                share = {name: sum(r.cost_micro - fee(r.cost_micro) for r in rs) for name, rs in served.items()}
                assert all(hub.balance(f"{name}@example.com") == 0 for name in ("other", "seed", "inflate"))
                assert all(v["withheld_micro"] > 0 and v["debt_micro"] == 0 for v in cheats)
                assert sum(v["withheld_micro"] for v in verdicts["other"]) == share["other"]
                assert hub.balance("honest@example.com") == share["honest"] > 0
                assert (await honest.hub.earnings())["balance_micro"] == share["honest"]
                assert hub.hub.db.read_sync(ledger.verify).ok

                # The reputations are hub-signed; the selection is recheckable once the secret is revealed.
                async with httpx.AsyncClient(base_url=hub.url) as pub:
                    reps = (await pub.get("/v1/reputation")).json()
                    commit = (await pub.get("/v1/audits/commitment")).json()
                for blob in reps["reputations"]:
                    decode_as(HostReputation, base64.b64decode(blob)).verify()
                assert len(reps["reputations"]) == 4
                assert commit["previous"] is None and len(bytes.fromhex(commit["current"]["commitment"])) == 32

                # Nothing left pending; asking again sends nothing.
                assert await settlement.answer_audits() == 0

                # The operator's view: `gpunexus hub hosts`.
                monkeypatch.setenv("GPUNEXUS_HOME", str(tmp_path / "hub"))
                parser = argparse.ArgumentParser(prog="gpunexus")
                hub_cli.register(parser.add_subparsers(dest="command", required=True))
                args = parser.parse_args(["hub", "hosts"])
                assert args.func(args) == 0
                out = capsys.readouterr().out
                assert out.count("excluded") == 3 and "seed-replay: " in out and "count: tokens_in" in out
                assert ids["honest"] in out and "passed" in out


async def test_selection_is_recheckable_and_unopened_audits_leave_the_host_alone(tmp_path):
    """A gateway without audit retention: its receipts' audits end 'unopened', the host is not judged."""
    config = HubConfig(audit_rate=1.0, audit_period_s=100.0, audit_root_grace_s=10.0)
    async with running_hub(tmp_path / "hub", config) as hub:
        client_key = hub.add_user("dev@example.com", "client", USD)
        host_key = hub.add_user("gpu@example.com", "host")
        async with running_host(hub=HubLogin(hub.url, host_key)) as host:
            async with running_gateway([host.node.listen_addrs()[0]], hub=HubLogin(hub.url, client_key),
                                       home=tmp_path / "gw", audit_retention_s=None) as gateway:
                await wait_for_offers(gateway)
                async with httpx.AsyncClient(base_url=gateway.base_url, timeout=60,
                                             headers={"authorization": f"Bearer {client_key}"}) as http:
                    await _ask(http, "no retention")
                settlement = gateway.service.settlement
                await settlement.flush()
                assert len(settlement.queue) == 0
                # An opening that is not what the receipt covers is refused and changes nothing;
                # another account cannot open this gateway's audits at all.
                rid = gateway.service.stats.receipts[0].request_id
                forged = Opening(rid, "chat", (ChatMessage("user", "something else"),), "", "", Sampling(1.0, 1.0, 0, (), 1),
                                 24, 0, (65, 66), "AB")
                body = {"request_id": rid, "opening": base64.b64encode(forged.encode()).decode()}
                async with httpx.AsyncClient(base_url=hub.url) as api:
                    r = await api.post("/v1/audits/openings", json=body, headers={"authorization": f"Bearer {client_key}"})
                    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_opening"
                    r = await api.post("/v1/audits/openings", json=body, headers={"authorization": f"Bearer {host_key}"})
                    assert r.status_code == 404
                    pending = await api.get("/v1/audits/pending", headers={"authorization": f"Bearer {client_key}"})
                    assert pending.json()["request_ids"] == [rid]
                assert await settlement.answer_audits() == 0
                rows = hub.hub.db.read_sync(lambda c: c.execute(sa.select(audits.c.status, audits.c.reasons, audits.c.receipt,
                                                                          audits.c.request_id, audits.c.rate)).all())
                assert [r.status for r in rows] == ["unopened"] and "not retained" in json.loads(rows[0].reasons)[0]
                assert hub.hub.db.read_sync(honesty.reputations) == []
                # The secret is revealed once the period's roots are due (period end + grace), not before:
                # then anyone can recheck the selection.
                period = hub.hub.db.read_sync(lambda c: c.execute(sa.select(audits.c.period)).scalar_one())
                async with httpx.AsyncClient(base_url=hub.url) as pub:
                    hub.hub.clock = lambda: (period + 1) * config.audit_period_s + 1.0
                    early = (await pub.get("/v1/audits/commitment")).json()
                    assert early["previous"] is None or early["previous"]["period"] < period
                    hub.hub.clock = lambda: (period + 1) * config.audit_period_s + config.audit_root_grace_s + 1.0
                    later = (await pub.get("/v1/audits/commitment")).json()
                prev = later["previous"]
                assert prev["period"] == period and later["current"]["period"] == period + 1
                secret = bytes.fromhex(prev["secret"])
                assert selection.check_reveal(bytes.fromhex(prev["commitment"]), secret)
                r = rows[0]
                # At rate 1 the choice does not depend on the host's root (made at settlement, before any root).
                assert r.rate == 1.0
                assert selection.is_selected(secret, hashlib.sha256(r.receipt).digest(), r.request_id, r.rate)
                assert not selection.is_selected(secret, hashlib.sha256(r.receipt).digest(), r.request_id, 0.0)
                host_paid = hub.hub.db.read_sync(lambda c: c.execute(sa.select(receipt_log.c.cost - receipt_log.c.fee)).scalar_one())
                assert hub.balance("gpu@example.com") == host_paid


def test_a_gateway_without_audit_retention_only_uses_hosts_in_good_standing(tmp_path):
    from gpunexus.node.hub_client import HubSettlement
    from gpunexus.protocol.signing import Signer

    hub_signer, good, suspect, bad = (Signer.generate() for _ in range(4))

    def rep(peer, p, excluded):
        return HostReputation(hub_signer.peer_id, peer.peer_id, p, excluded, 3, 1, 0.0).signed(hub_signer)

    reps = {s.peer_id: r for s, r in ((good, rep(good, 0.99, False)), (suspect, rep(suspect, 0.05, False)), (bad, rep(bad, 0.001, True)))}
    for retention, expected in ((3600.0, [False, False, True]), (None, [False, True, True])):
        settlement = HubSettlement("http://127.0.0.1:9", "gnx_x_y", good.peer_id, tmp_path / f"{retention}.db",
                                   audit_retention_s=retention)
        settlement.reputations = reps
        assert [settlement.excluded_host(s.peer_id) for s in (good, suspect, bad)] == expected
        assert not settlement.excluded_host(Signer.generate().peer_id)  # never audited: admitted
        settlement.queue.close()


async def test_rounded_weights_replayed_answers_and_inflated_output_counts_are_caught(tmp_path):
    config = HubConfig(audit_rate=1.0)
    async with running_hub(tmp_path / "hub", config) as hub:
        client_key = hub.add_user("dev@example.com", "client", 5 * USD)
        keys = {name: hub.add_user(f"{name}@example.com", "host") for name in ("rounded", "replay", "inflate")}
        async with (
            running_host(RoundedWeightsBackend(), hub=HubLogin(hub.url, keys["rounded"]), price=100_000) as rounded,
            running_host(ReplayBackend(), hub=HubLogin(hub.url, keys["replay"]), price=150_000) as replay,
            running_host(InflatedOutputBackend(), hub=HubLogin(hub.url, keys["inflate"]), price=175_000) as inflate,
        ):
            boot = [h.node.listen_addrs()[0] for h in (rounded, replay, inflate)]
            async with running_gateway(boot, hub=HubLogin(hub.url, client_key), home=tmp_path / "gw") as gateway:
                await wait_for_offers(gateway, count=3)
                settlement = gateway.service.settlement
                ids = {"rounded": rounded.node.peer_id, "replay": replay.node.peer_id, "inflate": inflate.node.peer_id}
                async with httpx.AsyncClient(base_url=gateway.base_url, timeout=60,
                                             headers={"authorization": f"Bearer {client_key}"}) as http:
                    # The replaying host's first (honest) answer passes, so it takes a third request to exclude it.
                    for phase, n in (("rounded", 2), ("replay", 3), ("inflate", 2)):
                        before = len(gateway.service.stats.receipts)
                        for i in range(n):
                            await _ask(http, f"{phase} question number {i}")
                        assert {r.host_id for r in gateway.service.stats.receipts[before:]} == {ids[phase]}
                        await settlement.flush()
                        assert len(settlement.queue) == 0
                        if phase == "inflate":  # this host was paid out before its audits: they leave a debt
                            payout = hub.hub.db.write_sync(_pay_out, "inflate@example.com")
                            assert payout > 0
                        await settlement.answer_audits()
                        await settlement.refresh_reputation()
                        assert settlement.excluded_host(ids[phase])
                report = {h["peer_id"]: h for h in hub.hub.db.read_sync(honesty.host_report, 10)}
                codes = lambda v: {r.split(":", 1)[0] for r in v["reasons"]}  # noqa: E731
                v = {name: sorted(report[pid]["recent"], key=lambda x: x["decided_at"]) for name, pid in ids.items()}
                assert all(x["status"] == "failed" and "commitment" in codes(x) for x in v["rounded"])
                assert v["replay"][0]["status"] == "passed"
                assert all(x["status"] == "failed" and "seed-replay" in codes(x) for x in v["replay"][1:])
                assert all(x["status"] == "failed" and "count" in codes(x) for x in v["inflate"])
                assert all(x["withheld_micro"] == 0 and x["debt_micro"] > 0 for x in v["inflate"])
                assert sum(x["debt_micro"] for x in v["inflate"]) == payout
                assert report[ids["replay"]]["audits"] == 3 and report[ids["replay"]]["failures"] == 2
                # Pay for the passed audit stays; the failed ones are withheld.
                passed_rid = v["replay"][0]["request_id"]
                paid = hub.hub.db.read_sync(lambda c: c.execute(
                    sa.select(receipt_log.c.cost - receipt_log.c.fee).where(receipt_log.c.request_id == passed_rid)).scalar_one())
                assert hub.balance("replay@example.com") == paid
                assert hub.balance("rounded@example.com") == hub.balance("inflate@example.com") == 0
                assert hub.hub.db.read_sync(ledger.verify).ok


def _pay_out(conn, email):
    """Move a host's whole balance out as a payout would (to Stripe clearing)."""
    from gpunexus.hub import keys as hub_keys

    user = hub_keys.get_user(conn, email)
    amount = ledger.balance(conn, user.account_id)
    clearing = ledger.system_account(conn, ledger.CLEARING)
    ledger.post(conn, ledger.Journal(f"payout:test:{email}", "payout", ((user.account_id, -amount), (clearing, amount))))
    return amount


async def test_challenge_requests_through_a_fresh_gateway_are_all_audited(tmp_path):
    """audit_rate=0: real traffic is never audited, the hub's challenges always are, and they catch the cheat."""
    import random

    from gpunexus.hub.challenge import send_challenges

    config = HubConfig(audit_rate=0.0, challenge_accounts=frozenset({"Probe@Hub.example"}))
    async with running_hub(tmp_path / "hub", config) as hub:
        client_key = hub.add_user("dev@example.com", "client", USD)
        probe_key = hub.add_user("probe@hub.example", "client", USD)
        host_key = hub.add_user("gpu@example.com", "host")
        async with running_host(WrongSeedBackend(), hub=HubLogin(hub.url, host_key)) as host:
            boot = [host.node.listen_addrs()[0]]
            async with (
                running_gateway(boot, hub=HubLogin(hub.url, client_key), home=tmp_path / "gw") as gateway,
                running_gateway(boot, hub=HubLogin(hub.url, probe_key), home=tmp_path / "probe") as probe,
            ):
                await wait_for_offers(gateway)
                await wait_for_offers(probe)
                assert probe.node.peer_id != gateway.node.peer_id  # its own, fresh identity
                async with httpx.AsyncClient(base_url=gateway.base_url, timeout=60,
                                             headers={"authorization": f"Bearer {client_key}"}) as http:
                    for i in range(2):
                        await _ask(http, f"real question {i}")
                rng = random.Random(7)
                statuses = await send_challenges(probe.base_url, probe_key, "tiny", 3, rng=rng)
                assert statuses == [200, 200, 200]
                await gateway.service.settlement.flush()
                assert len(gateway.service.settlement.queue) == 0
                await probe.service.settlement.flush()
                assert len(probe.service.settlement.queue) == 0
                assert await gateway.service.settlement.answer_audits() == 0
                await probe.service.settlement.answer_audits()
                report = hub.hub.db.read_sync(honesty.host_report, 10)
                [record] = report
                # temperature 0 challenges are seed-independent, so the sampled ones are what catch it
                failed = [v for v in record["recent"] if v["status"] == "failed"]
                assert record["audits"] == 3 and failed
                assert all({r.split(":", 1)[0] for r in v["reasons"]} == {"seed-replay"} for v in failed)
                probe_rids = {r.request_id for r in probe.service.stats.receipts}
                assert {v["request_id"] for v in record["recent"]} == probe_rids


async def test_gateway_keeps_openings_for_the_retention_window_only(tmp_path):
    from gpunexus.node.hub_client import HubSettlement
    from gpunexus.protocol.signing import Signer

    posted: list[dict] = []
    rids: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/audits/pending":
            return httpx.Response(200, json={"request_ids": rids})
        posted.append(json.loads(request.content))
        return httpx.Response(200, json={"status": "passed"})

    now = [1000.0]
    gw = Signer.generate()
    settlement = HubSettlement("http://hub", "gnx_a_b", gw.peer_id, tmp_path / "q.db", audit_retention_s=60.0,
                               transport=httpx.MockTransport(handler), clock=lambda: now[0])
    try:
        for i in range(2):
            opening = Opening(f"{i:032x}", "completion", (), "hello", "", Sampling(1.0, 1.0, 0, (), 3), 8, 0, (104, 105), "hi")
            receipt = _receipt_for(opening.request_id, gw)
            settlement.retain(opening)
            settlement.record(receipt)
            now[0] += 50.0
        rids[:] = [f"{0:032x}", f"{1:032x}"]
        # t = 1100: the first opening (t = 1000) is past the 60 s window, the second (t = 1050) is not.
        assert await settlement.answer_audits() == 1
        assert posted[0] == {"request_id": f"{0:032x}", "opening": None, "reason": "expired"}
        opened = decode_as(Opening, base64.b64decode(posted[1]["opening"]))
        assert opened.request_id == f"{1:032x}" and opened.output_ids == (104, 105)
    finally:
        await settlement.aclose()


def _receipt_for(request_id: str, gateway) -> object:
    from gpunexus.protocol.messages import Receipt
    from gpunexus.protocol.signing import Signer

    host = Signer.generate()
    return Receipt(request_id, host.peer_id, gateway.peer_id, "tiny", "h", 1, 1, 2, 0, b"\0" * 32, b"\0" * 32, 3,
                   "length", b"", 1.0).signed(host, "host_sig").signed(gateway, "gateway_sig")


async def test_hosts_publish_signed_period_roots_and_a_host_without_one_has_every_receipt_audited(tmp_path):
    """Periods are driven explicitly: host A publishes its root, host B never does (it is refused once late)."""
    from gpunexus.hub.db import audit_periods, audit_roots, audit_waiting
    from gpunexus.protocol.messages import ReceiptRoot
    from gpunexus.verify import merkle

    config = HubConfig(audit_rate=0.5, audit_period_s=1e6, audit_root_grace_s=60.0)  # one period for the whole test
    async with running_hub(tmp_path / "hub", config) as hub:
        client_key = hub.add_user("dev@example.com", "client", USD)
        ka, kb = hub.add_user("a@example.com", "host"), hub.add_user("b@example.com", "host")
        async with (
            running_host(hub=HubLogin(hub.url, ka), price=100_000) as a,
            running_host(hub=HubLogin(hub.url, kb), price=200_000) as b,
        ):
            assert a.hub.audit_period_s == config.audit_period_s  # learnt from GET /v1/hub
            boot = [h.node.listen_addrs()[0] for h in (a, b)]
            async with running_gateway(boot, hub=HubLogin(hub.url, client_key), home=tmp_path / "gw") as gateway:
                await wait_for_offers(gateway, count=2)
                async with httpx.AsyncClient(base_url=gateway.base_url, timeout=60,
                                             headers={"authorization": f"Bearer {client_key}"}) as http:
                    for i in range(6):
                        await _ask(http, f"root question {i}")
                    await a.service.disable()  # the rest goes to B
                    for i in range(3):
                        await _ask(http, f"late question {i}")
                got = {n: [r for r in gateway.service.stats.receipts if r.host_id == h.node.peer_id] for n, h in (("a", a), ("b", b))}
                assert len(got["a"]) == 6 and len(got["b"]) == 3
                settlement = gateway.service.settlement
                await settlement.flush()
                assert len(settlement.queue) == 0
                db = hub.hub.db
                # Settled before any root: selection waits (nothing pending, everything parked).
                waiting = db.read_sync(lambda c: c.execute(sa.select(audit_waiting.c.request_id, audit_waiting.c.rate)).all())
                assert len(waiting) == 9 and db.read_sync(lambda c: c.execute(sa.select(sa.func.count()).select_from(audits)).scalar_one()) == 0
                rate = waiting[0].rate
                assert 0.5 <= rate < 1.0
                assert await settlement.answer_audits() == 0

                # A's period ends (driven, not slept): it publishes the signed root of what it signed.
                published = await a.hub.publish_roots(now=2e12)
                assert [r.count for r in published] == [6] and not a.hub.leaves
                period = published[0].period
                stored = db.read_sync(lambda c: c.execute(sa.select(audit_roots)).all())
                assert [(s.host_id, s.period, s.count) for s in stored] == [(a.node.peer_id, period, 6)]
                msg = decode_as(ReceiptRoot, stored[0].blob)
                msg.verify()
                assert msg.host_id == a.node.peer_id and msg.root == stored[0].root
                # The root proves inclusion of every receipt A signed, in issue order (gateway signature off).
                ordered = sorted(got["a"], key=lambda r: r.issued_at)
                leaves = [merkle.receipt_leaf(r.request_id, dataclasses.replace(r, gateway_sig=b"").encode()) for r in ordered]
                assert merkle.merkle_root(leaves) == msg.root
                for i, leaf in enumerate(leaves):
                    assert merkle.verify_proof(msg.root, leaf, i, len(leaves), merkle.prove(leaves, i))
                foreign = merkle.receipt_leaf(got["b"][0].request_id, dataclasses.replace(got["b"][0], gateway_sig=b"").encode())
                assert not merkle.verify_proof(msg.root, foreign, 0, len(leaves), merkle.prove(leaves, 0))
                # A second root for the same period does not replace the first.
                again = dataclasses.replace(msg, root=bytes(32), sig=b"").signed(a.node.signer)
                async with httpx.AsyncClient(base_url=hub.url, headers={"authorization": f"Bearer {ka}"}) as api:
                    r = await api.post("/v1/audits/roots", json={"root": base64.b64encode(again.encode()).decode()})
                    assert r.status_code == 200 and r.json()["accepted"] is False and r.json()["root"] == msg.root.hex()
                    r = await api.post("/v1/audits/roots", json={"root": base64.b64encode(b"junk").decode()})
                    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_root"
                # ... and A's receipts were selected with it, exactly as anyone can recompute.
                secret = db.read_sync(lambda c: c.execute(sa.select(audit_periods.c.secret)
                                                          .where(audit_periods.c.period == period)).scalar_one())
                expected = {r.request_id for r in ordered if selection.is_selected(secret, msg.root, r.request_id, rate)}
                rows = db.read_sync(lambda c: c.execute(sa.select(audits.c.request_id, audits.c.host_id, audits.c.rate)).all())
                assert {x.request_id for x in rows} == expected and all(x.rate == rate for x in rows)

                # B never publishes: once the deadline passed, every one of its receipts is audited, and its
                # late root is refused.
                hub.hub.clock = lambda: (period + 1) * config.audit_period_s + config.audit_root_grace_s + 1.0
                answered = await settlement.answer_audits()
                assert answered == len(expected) + 3
                rows = db.read_sync(lambda c: c.execute(sa.select(audits.c.request_id, audits.c.host_id, audits.c.rate,
                                                                  audits.c.status)).all())
                mine = {x.request_id: x for x in rows if x.host_id == b.node.peer_id}
                assert set(mine) == {r.request_id for r in got["b"]} and all(x.rate == 1.0 for x in mine.values())
                assert all(x.status == "passed" for x in rows)
                assert db.read_sync(lambda c: c.execute(sa.select(sa.func.count()).select_from(audit_waiting)).scalar_one()) == 0
                assert await b.hub.publish_roots(now=2e12) == []
                assert db.read_sync(lambda c: c.execute(sa.select(audit_roots.c.host_id)).scalars().all()) == [a.node.peer_id]


async def test_audit_cli_recomputes_verdicts_from_openings_and_names_a_tampered_one(tmp_path, monkeypatch, capsys):
    """`hub receipts export` + `hub audits export` + `gpunexus audit LOG --openings FILE`, end to end."""
    config = HubConfig(audit_rate=1.0, audit_period_s=1e6, audit_root_grace_s=60.0)
    async with running_hub(tmp_path / "hub", config) as hub:
        client_key = hub.add_user("dev@example.com", "client", 5 * USD)
        kc, kh = hub.add_user("cheat@example.com", "host"), hub.add_user("honest@example.com", "host")
        async with (
            running_host(WrongSeedBackend(), hub=HubLogin(hub.url, kc), price=100_000) as cheat,
            running_host(hub=HubLogin(hub.url, kh), price=200_000) as honest,
        ):
            boot = [h.node.listen_addrs()[0] for h in (cheat, honest)]
            async with running_gateway(boot, hub=HubLogin(hub.url, client_key), home=tmp_path / "gw") as gateway:
                await wait_for_offers(gateway, count=2)
                settlement = gateway.service.settlement
                async with httpx.AsyncClient(base_url=gateway.base_url, timeout=60,
                                             headers={"authorization": f"Bearer {client_key}"}) as http:
                    for phase in ("cheat", "honest"):
                        for i in range(2):
                            await _ask(http, f"{phase} recheck {i}")
                        await settlement.flush()
                        await settlement.answer_audits()
                        await settlement.refresh_reputation()
                assert await honest.hub.publish_roots(now=2e12)  # the honest host's root; the cheat withholds its own
        rows = {r.request_id: r for r in hub.hub.db.read_sync(lambda c: c.execute(sa.select(audits)).all())}
        assert sorted(r.status for r in rows.values()) == ["failed", "failed", "passed", "passed"]
        failed = sorted(rid for rid, r in rows.items() if r.status == "failed")
        passed = sorted(rid for rid, r in rows.items() if r.status == "passed")

    # The operator exports once every period's secret is revealed (its root deadline passed).
    period = next(iter(rows.values())).period
    monkeypatch.setattr(hub_cli, "_now", lambda: (period + 1) * config.audit_period_s + config.audit_root_grace_s + 1.0)
    monkeypatch.setenv("GPUNEXUS_HOME", str(tmp_path / "hub"))
    parser = argparse.ArgumentParser(prog="gpunexus")
    hub_cli.register(parser.add_subparsers(dest="command", required=True))

    def cli(*argv: str) -> tuple[int, str]:
        args = parser.parse_args(list(argv))
        code = args.func(args)
        return code, capsys.readouterr().out

    log, openings = str(tmp_path / "receipts.jsonl"), str(tmp_path / "openings.jsonl")
    timing = ["--audit-period-s", str(config.audit_period_s), "--audit-root-grace-s", str(config.audit_root_grace_s)]
    code, out = cli("hub", "receipts", "export", log, *timing)
    assert code == 0 and "4 audits" in out
    code, out = cli("hub", "audits", "export", openings)
    assert code == 0 and "wrote 4 openings" in out
    with open(log + ".audits", encoding="utf-8") as f:  # noqa: ASYNC230 (a test, after the network is gone)
        lines = [json.loads(x) for x in f]
    assert lines[0]["format"] == "gpunexus/audit-log/1"
    assert [x["kind"] for x in lines[1:]].count("period") == 1 and [x["kind"] for x in lines[1:]].count("root") == 1

    code, out = cli("audit", log, "--openings", openings)
    assert code == 0, out
    assert "FAULT" not in out and "OK" in out and "note" not in out

    def rewrite(edit) -> None:
        with open(log + ".audits", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(edit(dict(x))) + "\n" for x in lines)

    # The hub recorded a pass where the recomputation fails (and a failure of an honest answer).
    rewrite(lambda x: {**x, "status": "passed", "reasons": []} if x.get("request_id") == failed[0] else
            {**x, "status": "failed", "reasons": ["seed-replay: made up"]} if x.get("request_id") == passed[0] else x)
    code, out = cli("audit", log, "--openings", openings)
    assert code == 1
    faults = [x for x in out.splitlines() if x.startswith("FAULT")]
    assert len(faults) == 2, out
    assert failed[0] in out and "recorded passed [], recomputed failed ['seed-replay']" in out
    assert passed[0] in out and "recomputed passed []" in out
    # A receipt of the host that published its root, claimed selected at a rate its root does not select it at;
    # one of the host without a root, claimed selected at a rate below 1.
    rewrite(lambda x: {**x, "rate": 0.0} if x.get("request_id") in (passed[1], failed[1]) else x)
    code, out = cli("audit", log, "--openings", openings)
    assert code == 1
    assert f"audit of receipt {passed[1]}: not selected by the revealed secret" in out
    assert f"audit of receipt {failed[1]}: selected at rate 0.0 but its host published no root" in out
    # Without openings the verdicts stand unchecked, but the selection is still rechecked.
    rewrite(lambda x: x)
    code, out = cli("audit", log, "--audits", log + ".audits")
    assert code == 0 and "OK" in out
