"""The scheduled challenger (``gpunexus hub challenger``): its timetable, and a real swarm it challenges.

The timetable is pure and stepped by hand. The swarm is real: a hub (SQLite,
HTTP) with a challenge account and ``audit_rate=0`` (so only challenges are
ever audited), reference-model hosts on loopback, one of them serving another
model under the right model's name, and the challenger's own gateway peer,
whose clock the test moves by hand: the period passes when the test says so.
"""

from __future__ import annotations

import os
import random
import signal

import pytest
import sqlalchemy as sa
import trio
import trio.testing

from gpunexus import cli
from gpunexus.hub import honesty, keys
from gpunexus.hub.config import HubConfig
from gpunexus.hub.db import receipt_log
from gpunexus.node.backends.reference import ReferenceBackend
from gpunexus.node.gateway.challenge_schedule import ChallengeSchedule
from gpunexus.node.gateway.challenger import (ChallengerError, ChallengerOptions, check_account, check_hub_url,
                                      open_challenger, stop_on_signal)
from gpunexus.node.net.p2p import P2PConfig
from gpunexus.node.runtime import HubLogin
from gpunexus.node.gateway.service import GatewayConfig
from gpunexus.verify.attacks import other_model
from gpunexus.verify.challenges import challenge_body
from market import running_hub
from peers import LOOPBACK, running_host

USD = 1_000_000
PROBE = "probe@hub.example"


class ManualClock:
    """The challenger's clock, moved only by the test."""

    def __init__(self) -> None:
        self.t = 0.0
        self._moved = trio.Event()

    def now(self) -> float:
        return self.t

    async def sleep_until(self, when: float) -> None:
        while self.t < when:
            await self._moved.wait()

    def advance_to(self, t: float) -> None:
        self.t = t
        self._moved.set()
        self._moved = trio.Event()


class OtherModelBackend(ReferenceBackend):
    """Another weight seed under the reference model's name and hash: wrong on every request, greedy ones too."""

    def __init__(self) -> None:
        super().__init__("tiny")
        self.model = other_model(self.model, self.tokenizer, weight_seed=99)


async def until(predicate, timeout=60.0):
    """Wait until ``predicate()`` holds (a hang guard, not a speed assertion)."""
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.02)


# --- the timetable ---------------------------------------------------------------------
def _simulate(schedule: ChallengeSchedule, hosts, until_t: float) -> dict[str, list[float]]:
    """Step the schedule from one due time to the next; each host's challenge times."""
    times: dict[str, list[float]] = {h: [] for h in hosts}
    schedule.track(hosts, 0.0)
    while (when := schedule.next_due()) is not None and when <= until_t:
        for host in schedule.due(when):
            times[host].append(when)
    return times


def test_every_host_is_challenged_within_its_first_gap_then_every_half_to_one_and_a_half_gaps():
    period, per_period = 3600.0, 2.0
    gap = period / per_period
    hosts = [f"host{i}" for i in range(50)]
    times = _simulate(ChallengeSchedule(period, per_period, random.Random(1)), hosts, 20 * period)
    for host, when in times.items():
        assert 0 < when[0] <= gap
        gaps = [b - a for a, b in zip(when, when[1:])]
        assert all(0.5 * gap <= g <= 1.5 * gap for g in gaps), host
    per_host_per_period = sum(len(w) for w in times.values()) / len(hosts) / 20
    assert per_period * 0.9 <= per_host_per_period <= per_period * 1.1


def test_the_first_challenges_are_spread_over_the_gap_not_bunched():
    times = _simulate(ChallengeSchedule(100.0, 1.0, random.Random(2)), [f"h{i}" for i in range(40)], 100.0)
    firsts = sorted(w[0] for w in times.values())
    assert firsts[0] < 25 and firsts[-1] > 75  # a host cannot count on an early or a late turn


def test_a_seed_gives_the_same_timetable_and_hosts_that_leave_are_dropped():
    a = _simulate(ChallengeSchedule(60.0, 1.0, random.Random(5)), ["x", "y", "z"], 600.0)
    b = _simulate(ChallengeSchedule(60.0, 1.0, random.Random(5)), ["z", "y", "x"], 600.0)
    assert a == b
    schedule = ChallengeSchedule(60.0, 1.0, random.Random(5))
    schedule.track(["x", "y"], 0.0)
    schedule.track(["y"], 10.0)
    assert schedule.hosts() == ["y"]
    schedule.track(["x"], 500.0)  # x is back (y gone): a first sighting again, due within one gap of now
    assert schedule.hosts() == ["x"] and 500.0 <= schedule.next_due() <= 560.0


@pytest.mark.parametrize("period,per_period", [(0, 1), (60, 0), (-1, 1)])
def test_a_schedule_needs_a_positive_period_and_rate(period, per_period):
    with pytest.raises(ValueError):
        ChallengeSchedule(period, per_period, random.Random())


def test_challenge_bodies_are_varied_everyday_chats_the_gateway_accepts():
    from gpunexus.node.gateway.openai_api import parse_request

    rng = random.Random(3)
    bodies = [challenge_body("tiny", rng) for _ in range(200)]
    for body in bodies:
        parse_request(body, "chat")
    prompts = {b["messages"][-1]["content"] for b in bodies}
    assert len(prompts) > 100  # no short list a host could learn by heart
    assert any(b["messages"][0]["role"] == "system" for b in bodies)
    assert any(len([m for m in b["messages"] if m["role"] == "user"]) == 2 for b in bodies)
    assert {b["temperature"] for b in bodies} >= {0.0, 0.7, 1.0}


def test_inside_a_challenge_the_book_shows_only_the_aimed_host_of_every_model():
    import dataclasses

    from gpunexus.node.gateway.challenger import AimedBook, aimed_at
    from gpunexus.node.net.offers import OfferBook
    from gpunexus.protocol.messages import Offer
    from gpunexus.protocol.signing import Signer

    a, b = Signer(b"\x05" * 32), Signer(b"\x06" * 32)
    now = 1_000_000.0
    book = OfferBook(clock=lambda: now)
    base = Offer(peer_id="", model="tiny", model_hash="h", price_micro_per_mtok=200_000, tokens_per_s=50.0,
                 free_slots=2, max_slots=4, max_context=2048, region="", license="", follows_market=False,
                 addrs=("/ip4/127.0.0.1/tcp/4001",), seq=1, issued_at=now, expires_at=now + 10)
    for signer in (a, b):
        for model in ("tiny", "small"):
            book.apply(dataclasses.replace(base, peer_id=signer.peer_id, model=model).signed(signer))
    view = AimedBook(book)
    assert len(view.for_model("tiny")) == 2 and len(view.live()) == 4  # outside a challenge: the whole book
    with aimed_at(a.peer_id):
        assert [o.peer_id for o in view.for_model("tiny")] == [a.peer_id]
        assert sorted(view.models()) == ["small", "tiny"] and len(view.live()) == 2
        assert view.get(b.peer_id, "tiny") is None and view.get(a.peer_id, "small") is not None
        view.drop_host(b.peer_id)  # a dead connection leaves the real book
    assert [o.peer_id for o in book.live()] == [a.peer_id, a.peer_id]


# --- the command line ----------------------------------------------------------------------
def test_hub_challenger_is_a_hub_command_whose_help_explains_every_flag(capsys):
    with pytest.raises(SystemExit) as done:
        cli.main(["hub", "challenger", "--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--hub", "--api-key", "--period", "--per-host-per-period", "--max-in-flight", "--seed",
                 "--first-token-timeout", "--listen", "--bootstrap", "--swarm-key"):
        assert flag in out


@pytest.mark.parametrize("argv,message", [
    ([], "--hub URL is required"),
    (["--hub", "http://127.0.0.1:9"], "--api-key KEY"),
    (["--hub", "ftp://x", "--api-key", "k"], "not an http:// or https:// URL"),
    (["--hub", "http://127.0.0.1:9", "--api-key", "k", "--period", "0"], "must be > 0"),
    (["--hub", "http://127.0.0.1:9", "--api-key", "k", "--per-host-per-period", "-1"], "must be > 0"),
])
def test_hub_challenger_refuses_bad_flags_in_one_line(argv, message, monkeypatch):
    monkeypatch.delenv("GPUNEXUS_API_KEY", raising=False)
    with pytest.raises(SystemExit) as done:
        cli.main(["hub", "challenger", *argv])
    text = str(done.value.code)
    assert message in text and "\n" not in text


def test_building_the_parser_loads_no_peer_code_and_hub_never_imports_node():
    import ast
    import pathlib
    import subprocess
    import sys

    code = "import sys, gpunexus.cli; gpunexus.cli.build_parser(); print('libp2p' in sys.modules, 'gpunexus.node.gateway.challenger' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False"]
    import gpunexus.hub

    hub_dir = pathlib.Path(gpunexus.hub.__file__).parent
    for path in hub_dir.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                name = ("." * node.level) + (node.module or "")
                assert "node" not in name.split("."), f"{path} imports {name}"
            elif isinstance(node, ast.Import):
                assert not any(a.name.startswith("gpunexus.node") for a in node.names), path


def test_check_hub_url_names_what_is_wrong():
    assert check_hub_url("http://127.0.0.1:8080/") == "http://127.0.0.1:8080"
    for bad in ("127.0.0.1:8080", "http://", "mailto:x@y"):
        with pytest.raises(ChallengerError):
            check_hub_url(bad)


async def test_a_bad_key_an_unreachable_hub_and_an_empty_account_are_one_line_errors(tmp_path):
    async with running_hub(tmp_path / "hub") as hub:
        key = hub.add_user(PROBE, "client", USD)
        empty = hub.add_user("empty@hub.example", "client")
        assert (await check_account(HubLogin(hub.url, key)))["available_micro"] == USD
        with pytest.raises(ChallengerError, match="refused the API key"):
            await check_account(HubLogin(hub.url, "gnx_nope_nope"))
        with pytest.raises(ChallengerError, match="has no credits"):
            await check_account(HubLogin(hub.url, empty))
        with pytest.raises(ChallengerError, match="refused the API key"):
            async with open_challenger(ChallengerOptions(HubLogin(hub.url, "gnx_nope_nope"), home=tmp_path / "c")):
                pass
    with pytest.raises(ChallengerError, match="cannot reach the hub"):
        await check_account(HubLogin("http://127.0.0.1:9", "gnx_a_b"), timeout_s=5.0)


# --- a real swarm ----------------------------------------------------------------------------
async def test_challenger_reaches_every_host_in_a_period_and_its_challenges_alone_catch_the_cheat(tmp_path):
    """audit_rate=0 and no client traffic: whatever is audited, a challenge sent it."""
    config = HubConfig(audit_rate=0.0, challenge_accounts=frozenset({PROBE}))
    async with running_hub(tmp_path / "hub", config) as hub:
        probe_key = hub.add_user(PROBE, "client", USD)
        host_keys = [hub.add_user(f"gpu{i}@example.com", "host") for i in range(3)]
        backends = [ReferenceBackend("tiny"), ReferenceBackend("tiny"), OtherModelBackend()]
        async with (
            running_host(backends[0], hub=HubLogin(hub.url, host_keys[0])) as h0,
            running_host(backends[1], hub=HubLogin(hub.url, host_keys[1]), bootstrap=[h0.node.listen_addrs()[0]]) as h1,
            running_host(backends[2], hub=HubLogin(hub.url, host_keys[2]), bootstrap=[h0.node.listen_addrs()[0]]) as cheat,
        ):
            hosts = {h.node.peer_id for h in (h0, h1, cheat)}
            clock = ManualClock()
            options = ChallengerOptions(
                HubLogin(hub.url, probe_key), period_s=100.0, per_host_per_period=1.0,
                p2p=P2PConfig(listen=LOOPBACK, bootstrap=[h.node.listen_addrs()[0] for h in (h0, h1, cheat)]),
                config=GatewayConfig(first_token_timeout=20.0), home=tmp_path / "challenger", seed=11, clock=clock,
            )
            async with open_challenger(options) as runtime:
                challenger = runtime.challenger
                await until(lambda: set(challenger.schedule.hosts()) == hosts)
                assert runtime.peer_id not in hosts and not challenger.outcomes  # time has not moved yet

                clock.advance_to(100.0)  # one period
                await until(lambda: set(challenger.counts) == hosts and challenger.running == 0)
                assert dict(challenger.counts) == {h: 1 for h in hosts}  # the next turns are >= 50 s away
                assert {o.status for o in challenger.outcomes} == {"served"}
                assert {o.model for o in challenger.outcomes} == {"tiny"}

                async with trio.open_nursery() as nursery:  # a graceful stop: SIGTERM, as systemd sends
                    nursery.start_soon(stop_on_signal, runtime)
                    await trio.testing.wait_all_tasks_blocked()  # its signal receiver is in place
                    os.kill(os.getpid(), signal.SIGTERM)
                assert len(runtime.settlement.queue) == 0  # every receipt delivered before it stopped
                served = {o.request_id for o in challenger.outcomes}

            # the receipts were paid by the challenge account ...
            probe = hub.hub.db.read_sync(keys.get_user, PROBE)
            rows = hub.hub.db.read_sync(lambda conn: conn.execute(
                sa.select(receipt_log.c.request_id).where(receipt_log.c.client_user_id == probe.id)).scalars().all())
            assert set(rows) == served
            assert hub.balance(PROBE) < USD
            # ... and every one was audited: the honest hosts passed, the cheat failed on its only request
            report = {r["peer_id"]: r for r in hub.hub.db.read_sync(honesty.host_report, 10)}
            assert set(report) == hosts
            for host in (h0, h1):
                assert [v["status"] for v in report[host.node.peer_id]["recent"]] == ["passed"]
            [verdict] = report[cheat.node.peer_id]["recent"]
            assert verdict["status"] == "failed" and verdict["request_id"] in served


# --- the command, as an operator runs it ------------------------------------------------------
async def test_the_command_challenges_a_host_logs_it_and_stops_cleanly_on_sigint(tmp_path):
    import subprocess
    import sys

    env = dict(os.environ, GPUNEXUS_HOME=str(tmp_path / "home"))
    command = [sys.executable, "-m", "gpunexus", "hub", "challenger"]
    config = HubConfig(audit_rate=0.0, challenge_accounts=frozenset({PROBE}))
    async with running_hub(tmp_path / "hub", config) as hub:
        probe_key = hub.add_user(PROBE, "client", USD)
        bad = await trio.run_process([*command, "--hub", hub.url, "--api-key", "gnx_nope_nope"], env=env,
                                     capture_stdout=True, capture_stderr=True, check=False)
        assert bad.returncode == 1
        assert bad.stderr.decode().strip().startswith("hub challenger: the hub at") and b"refused the API key" in bad.stderr
        assert len(bad.stderr.decode().strip().splitlines()) == 1
        host_key = hub.add_user("gpu@example.com", "host")
        async with running_host(hub=HubLogin(hub.url, host_key)) as host:
            proc = subprocess.Popen([*command, "--hub", hub.url, "--api-key", probe_key, "--period", "1", "--seed", "3",
                                     "--listen", LOOPBACK[0], "--bootstrap", host.node.listen_addrs()[0]],
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
            try:
                first = await trio.to_thread.run_sync(proc.stdout.readline)
                assert first.startswith("challenger peer 12D3KooW") and "every 1 s" in first

                def read_until_a_challenge() -> str:
                    for line in proc.stderr:
                        if "challenge host=" in line:
                            return line
                    return ""

                with trio.fail_after(60):
                    line = await trio.to_thread.run_sync(read_until_a_challenge)
                assert f"host={host.node.peer_id} model=tiny served" in line
                proc.send_signal(signal.SIGINT)
                _, rest = await trio.to_thread.run_sync(lambda: proc.communicate(timeout=60))
                assert proc.returncode == 0
                assert "SIGINT: no new challenges" in rest and "stopped:" in rest and "0 receipts still queued" in rest
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait(timeout=20)
        report = {r["peer_id"]: r for r in hub.hub.db.read_sync(honesty.host_report, 10)}
        assert report[host.node.peer_id]["audits"] >= 1
