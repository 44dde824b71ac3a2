"""A host on an availability schedule, with real peers on loopback and a hand-moved wall clock.

The gateway's offer book is the witness: it loses the host when a window
closes (after the request in flight has finished) and regains it when the
next one opens. Only the network is waited for, never the schedule's time.
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from zoneinfo import ZoneInfo

import httpx
import trio
import trio.testing

from gpunexus.node.host.schedule import parse_windows
from peers import GatedBackend, reference_backend, running_gateway, running_host, wait_for_offers
from wallclock import FakeClock

BERLIN = ZoneInfo("Europe/Berlin")
NIGHT = parse_windows("18:00-08:00")


async def wait_for_no_offers(gateway, model="tiny", timeout=20.0):
    with trio.fail_after(timeout):
        while gateway.book.for_model(model):
            await gateway.book.changed.wait()


async def test_a_scheduled_host_withdraws_and_returns_by_itself():
    clock = FakeClock(datetime(2024, 5, 1, 12, 0, tzinfo=BERLIN))
    async with running_host(schedule=NIGHT, clock=clock) as host:
        assert not host.service.enabled and not host.service.announcer.active  # started outside its window: never announced
        assert host.schedule.status()["next_change"] == "2024-05-01T18:00:00+02:00"
        async with running_gateway([host.node.listen_addrs()[0]]) as gateway:
            clock.set(datetime(2024, 5, 1, 18, 0, tzinfo=BERLIN))
            await wait_for_offers(gateway)
            [offer] = gateway.book.for_model("tiny")
            assert offer.peer_id == host.node.peer_id and host.service.enabled
            clock.set(datetime(2024, 5, 2, 8, 0, tzinfo=BERLIN))
            await wait_for_no_offers(gateway)  # a signed Withdraw, not an expiry: well inside the offer's TTL
            assert not host.service.enabled
            clock.set(datetime(2024, 5, 2, 18, 0, tzinfo=BERLIN))
            await wait_for_offers(gateway)
            async with httpx.AsyncClient(base_url=gateway.base_url, timeout=30) as http:
                r = await http.post("/chat/completions", json={"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3})
            assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3


async def test_a_window_closing_drains_the_request_in_flight_before_withdrawing():
    clock = FakeClock(datetime(2024, 5, 1, 23, 0, tzinfo=BERLIN))
    gated = GatedBackend(reference_backend(), pause_after=2)
    async with running_host(gated, schedule=NIGHT, clock=clock) as host:
        async with running_gateway([host.node.listen_addrs()[0]]) as gateway:
            await wait_for_offers(gateway)
            async with httpx.AsyncClient(base_url=gateway.base_url, timeout=30) as http, trio.open_nursery() as nursery:
                result = {}

                async def in_flight():
                    result["r"] = await http.post("/chat/completions", json={"model": "tiny", "messages": [{"role": "user", "content": "x"}], "max_tokens": 6})

                nursery.start_soon(in_flight)
                await gated.paused.wait()
                clock.set(datetime(2024, 5, 2, 8, 0, tzinfo=BERLIN))
                await trio.testing.wait_all_tasks_blocked()
                assert not host.service.enabled and host.service.free_slots() == 0  # no new orders...
                assert gateway.book.for_model("tiny")  # ...but not withdrawn while a request runs
                gated.release.set()
            assert result["r"].status_code == 200 and result["r"].json()["usage"]["completion_tokens"] == 6
            await wait_for_no_offers(gateway)


async def test_enabled_again_while_draining_keeps_the_offer():
    """The schedule reopening (or `node enable`) during a drain must not end in a withdrawn, 'enabled' host."""
    gated = GatedBackend(reference_backend(), pause_after=1)
    async with running_host(gated) as host:
        async with running_gateway([host.node.listen_addrs()[0]]) as gateway:
            await wait_for_offers(gateway)
            async with httpx.AsyncClient(base_url=gateway.base_url, timeout=30) as http, trio.open_nursery() as nursery:
                nursery.start_soon(functools.partial(http.post, "/chat/completions", json={"model": "tiny", "messages": [{"role": "user", "content": "x"}], "max_tokens": 4}))
                await gated.paused.wait()
                nursery.start_soon(host.service.disable)
                await trio.testing.wait_all_tasks_blocked()
                await host.service.enable()
                gated.release.set()
            assert host.service.enabled and host.service.announcer.active
            seq = gateway.book.for_model("tiny")[0].seq
            with trio.fail_after(20):  # still announcing: a newer offer arrives, and no Withdraw removed it
                while not (gateway.book.for_model("tiny") and gateway.book.for_model("tiny")[0].seq > seq):
                    await gateway.book.changed.wait()


def test_node_status_shows_the_schedule_and_its_next_change(tmp_path):
    now = datetime.now(timezone.utc)
    later = now + timedelta(hours=3)
    window = f"{later:%H}:00-{(later + timedelta(hours=1)):%H}:00"  # a window that is not now, in UTC
    env = dict(os.environ, GPUNEXUS_HOME=str(tmp_path), TZ="UTC")
    cmd = [sys.executable, "-m", "gpunexus"]
    host = subprocess.Popen([*cmd, "node", "serve", "--model", "tiny", "--listen", "/ip4/127.0.0.1/tcp/0", "--available", window],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    try:
        assert host.stdout.readline().startswith("peer: ")
        status = subprocess.run([*cmd, "node", "status"], capture_output=True, text=True, timeout=30, env=env)
        assert status.returncode == 0, status.stderr
        assert "disabled (withdrawn)" in status.stdout
        [line] = [ln for ln in status.stdout.splitlines() if ln.strip().startswith("schedule")]
        assert f"{window} (UTC): outside the windows now; announces again at " in line
        assert f"{later:%Y-%m-%d %H}:00" in line
    finally:
        host.terminate()
        host.wait(timeout=30)
