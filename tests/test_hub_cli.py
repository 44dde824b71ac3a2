"""``gpunexus hub ...`` and ``gpunexus audit`` as an operator runs them."""

from __future__ import annotations

import argparse
import base64
import json
import os
import signal
import subprocess
import sys
import time

import httpx
import pytest
import trio
from gpunexus.hub import cli as hub_cli
from gpunexus.hub import keys, ledger
from gpunexus.hub.service import Hub
from gpunexus.node.hub_client import HostHubLink, HubSettlement
from gpunexus.protocol.signing import Signer
from test_hub_support import make_offer, make_receipt


def run(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="gpunexus")
    hub_cli.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("GPUNEXUS_HOME", str(tmp_path))
    monkeypatch.delenv(hub_cli.STRIPE_KEY_ENV, raising=False)
    return tmp_path


def test_operator_commands(home, capsys):
    assert run("hub", "user", "add", "Ada@Example.com", "--role", "client") == 0
    out = capsys.readouterr().out
    first_key = out.strip().splitlines()[-1]
    assert first_key.startswith("gnx_")
    assert run("hub", "user", "add", "ada@example.com", "--role", "client") == 1  # exists
    assert run("hub", "key", "create", "ada@example.com", "--name", "laptop") == 0
    second_key = capsys.readouterr().out.strip()
    assert run("hub", "key", "list") == 0
    listing = capsys.readouterr().out
    assert "laptop" in listing and listing.count("active") == 2 and second_key not in listing
    assert run("hub", "key", "revoke", second_key.split("_")[1]) == 0
    assert run("hub", "key", "revoke", second_key.split("_")[1]) == 1
    assert run("hub", "credits", "grant", "ada@example.com", "12.5") == 0
    assert run("hub", "credits", "grant", "ada@example.com", "0.0000001") == 1
    assert run("hub", "credits", "grant", "nobody@example.com", "1") == 1
    capsys.readouterr()

    hub = Hub.open(str(home))
    assert (home / "hub" / "hub.key").exists()
    user = hub.db.read_sync(keys.authenticate, first_key)
    assert hub.db.read_sync(lambda c: ledger.balance(c, user.account_id)) == 12_500_000
    with pytest.raises(keys.AuthError):
        hub.db.read_sync(keys.authenticate, second_key)


def test_key_limits_and_expiry_on_the_command_line(home, capsys):
    run("hub", "user", "add", "ada@example.com", "--role", "client")
    capsys.readouterr()
    assert run("hub", "key", "create", "ada@example.com", "--name", "capped", "--limit-day", "5",
               "--limit-month", "$50.25", "--expires", "30") == 0
    capped = capsys.readouterr().out.strip()
    assert run("hub", "key", "create", "ada@example.com", "--name", "dated", "--expires", "2099-12-31") == 0
    dated = capsys.readouterr().out.strip()
    hub = Hub.open(str(home))
    infos = {k.name: k for k in hub.db.read_sync(keys.list_keys, None)}
    assert (infos["capped"].limit_day_micro, infos["capped"].limit_month_micro) == (5_000_000, 50_250_000)
    assert 29 * 86400 < infos["capped"].expires_at - time.time() <= 30 * 86400
    assert infos["dated"].expires_at == 4102444800.0  # 2100-01-01 00:00 UTC: the end of the day given
    assert hub.db.read_sync(keys.authenticate, capped) and hub.db.read_sync(keys.authenticate, dated)
    assert run("hub", "key", "list") == 0
    listing = capsys.readouterr().out
    assert "0.00/5.00" in listing and "0.00/50.25" in listing and "0.00/-" in listing and "2100-01-01 00:00" in listing
    for bad in (["--limit-day", "0"], ["--limit-day", "five"], ["--expires", "2001-01-01"], ["--expires", "soon"],
                ["--expires", "0"]):
        with pytest.raises(SystemExit) as exit_:
            run("hub", "key", "create", "ada@example.com", *bad)
        assert exit_.value.code == 2
    assert "spend limit must be more than 0" in capsys.readouterr().err
    assert len(hub.db.read_sync(keys.list_keys, None)) == 3  # nothing made by the bad ones


def test_grant_refused_when_stripe_configured(home, capsys, monkeypatch):
    run("hub", "user", "add", "a@example.com", "--role", "client")
    monkeypatch.setenv(hub_cli.STRIPE_KEY_ENV, "sk_test_x")
    assert run("hub", "credits", "grant", "a@example.com", "1") == 1
    assert "Stripe is configured" in capsys.readouterr().err


async def test_serve_settle_kill_export_audit(home, capsys):
    """The real ``gpunexus hub serve`` process: settle, kill -9 mid-batch, restart, export, audit."""
    run("hub", "user", "add", "client@example.com", "--role", "client")
    client_key = capsys.readouterr().out.strip().splitlines()[-1]
    run("hub", "user", "add", "host@example.com", "--role", "host")
    host_key = capsys.readouterr().out.strip().splitlines()[-1]
    run("hub", "credits", "grant", "client@example.com", "10")
    host, gateway = Signer.generate(), Signer.generate()

    async def start() -> tuple[trio.Process, str]:
        proc = await trio.lowlevel.open_process(
            [sys.executable, "-m", "gpunexus", "hub", "serve", "--port", "0"],
            stdout=subprocess.PIPE, env={**os.environ, "GPUNEXUS_HOME": str(home)})
        line = b""
        with trio.fail_after(30):
            while not line.endswith(b"\n"):
                chunk = await proc.stdout.receive_some(1)
                assert chunk, "hub serve exited before listening"
                line += chunk
        return proc, line.decode().split(" listening on ")[1].split()[0]

    proc, url = await start()
    link = HostHubLink(url, host_key, host)
    await link.connect()
    await link.post_offer(make_offer(host, issued_at=time.time(), ttl=300))  # receipts settle at an offered price
    gw = HubSettlement(url, client_key, gateway.peer_id, home / "q.db")
    allowance = await gw.renew()
    batch = [make_receipt(host, gateway, issued_at=allowance.issued_at + 1) for _ in range(300)]
    body = json.dumps({"receipts": [base64.b64encode(r.encode()).decode() for r in batch]}).encode()
    port = int(url.rsplit(":", 1)[1])
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    await stream.send_all(b"POST /v1/receipts HTTP/1.1\r\nhost: hub\r\ncontent-type: application/json\r\n"
                          + f"authorization: Bearer {client_key}\r\ncontent-length: {len(body)}\r\n\r\n".encode() + body)
    proc.send_signal(signal.SIGKILL)  # whenever the batch is: not started, mid-transaction or done
    await proc.wait()
    await stream.aclose()

    proc, url = await start()
    async with httpx.AsyncClient(base_url=url, timeout=10) as http:
        r = await http.post("/v1/receipts", headers={"authorization": f"Bearer {client_key}"}, content=body)
        statuses = {x["status"] for x in r.json()["results"]}
        assert statuses in ({"settled"}, {"duplicate"})  # all or nothing, never part of a batch
        assert {x["status"] for x in (await http.post("/v1/receipts", headers={"authorization": f"Bearer {client_key}"},
                                                      content=body)).json()["results"]} == {"duplicate"}
        earned = (await http.get("/v1/earnings", headers={"authorization": f"Bearer {host_key}"})).json()
        assert earned["requests"] == 300 and earned["amount_micro"] == 300 * 900
    proc.send_signal(signal.SIGINT)
    await proc.wait()
    await gw.aclose()
    await link.aclose()

    log = home / "log.jsonl"
    assert run("hub", "receipts", "export", str(log)) == 0
    capsys.readouterr()
    assert run("audit", str(log)) == 0
    assert "300 entries, 0 faults" in capsys.readouterr().out
    lines = log.read_text().splitlines()
    entry = json.loads(lines[7])
    entry["sig"] = base64.b64encode(b"\0" * 64).decode()
    lines[7] = json.dumps(entry)
    log.write_text("\n".join(lines) + "\n")
    assert run("audit", str(log)) == 1
    assert "FAULT entry 7 (receipt " in capsys.readouterr().out
