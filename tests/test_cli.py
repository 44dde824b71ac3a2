"""The command line as users and scripts run it: real processes, real ports."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import httpx
import pytest

GPUNEXUS = [sys.executable, "-m", "gpunexus"]


def run(*args, env=None, timeout=60) -> subprocess.CompletedProcess:
    return subprocess.run([*GPUNEXUS, *args], capture_output=True, text=True, timeout=timeout, env=env)


@pytest.fixture
def home(tmp_path):
    env = dict(os.environ, GPUNEXUS_HOME=str(tmp_path))
    return env


def test_help_explains_every_command():
    out = run("--help")
    assert out.returncode == 0
    for command in ("node", "hub", "audit", "demo"):
        assert command in out.stdout
    serve = run("node", "serve", "--help")
    assert serve.returncode == 0 and "--price" in serve.stdout and "peer:" in serve.stdout


def test_bad_input_is_refused_clearly(home):
    out = run("node", "serve", "--model", "tiny", "--price", "cheap", env=home)
    assert out.returncode != 0 and "--price" in out.stderr
    out = run("node", "serve", "--model", "tiny", "--backend", "openai", env=home)
    assert out.returncode != 0 and "--upstream" in out.stderr
    out = run("node", "serve", "--model", "no-such-model", env=home)
    assert out.returncode != 0 and "unknown reference model" in out.stderr
    out = run("node", "status", env=home)
    assert out.returncode == 1 and "no host is running" in out.stderr


def test_demo_once_answers_a_request():
    out = run("demo", "--port", "0", "--once")
    assert out.returncode == 0, out.stderr
    lines = dict(line.split(":", 1) for line in out.stdout.splitlines() if ":" in line)
    assert lines["base_url"].strip().startswith("http://127.0.0.1:")
    assert lines["api_key"].strip().startswith("gnx_")
    assert "client@demo.local" in lines["dashboard"] and "password demo-" in lines["dashboard"]
    assert "host earned" in out.stdout
    assert "completion_tokens" in lines["usage"]


def test_serve_prints_peer_first_and_is_steered_by_enable_disable_status(home):
    host = subprocess.Popen([*GPUNEXUS, "node", "serve", "--model", "tiny", "--price", "0.25", "--listen", "/ip4/127.0.0.1/tcp/0", "--tokens-per-s", "100"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=home)
    gateway = None
    try:
        first = host.stdout.readline().strip()
        assert first.startswith("peer: /ip4/127.0.0.1/tcp/") and "/p2p/12D3KooW" in first
        addr = first.split(" ", 1)[1]
        status = run("node", "status", env=home)
        assert status.returncode == 0 and "enabled" in status.stdout and "0.250000 USD" in status.stdout
        gateway = subprocess.Popen([*GPUNEXUS, "node", "gateway", "--port", "0", "--bootstrap", addr], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=home)
        base_url = gateway.stdout.readline().strip().split(" ", 1)[1]
        with httpx.Client(base_url=base_url, timeout=30) as http:
            for _ in range(100):  # a separate process: poll its public API for the offer
                if http.get("/models").json()["data"]:
                    break
                time.sleep(0.2)
            r = http.post("/chat/completions", json={"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5})
            assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] > 0
        served = run("node", "status", env=home)
        assert "served       1 requests" in served.stdout
        disabled = run("node", "disable", env=home)
        assert disabled.returncode == 0 and "disabled (withdrawn)" in disabled.stdout
        enabled = run("node", "enable", env=home)
        assert enabled.returncode == 0 and ": enabled" in enabled.stdout
        control_file = os.path.join(home["GPUNEXUS_HOME"], "node", "host", "control.json")
        with open(control_file) as f:
            assert json.load(f)["pid"] == host.pid
        assert oct(os.stat(control_file).st_mode & 0o777) == "0o600"
    finally:
        for proc in (gateway, host):
            if proc is not None:
                proc.terminate()
                proc.wait(timeout=20)


def test_check_measures_the_reference_model():
    out = run("node", "check", "--model", "tiny")
    assert out.returncode == 0 and "PASS" in out.stdout and "tokens/s" in out.stdout


def test_swarm_key_is_written_once(tmp_path):
    path = tmp_path / "swarm.key"
    assert run("node", "swarm-key", str(path)).returncode == 0
    text = path.read_text().splitlines()
    assert text[0] == "/key/swarm/psk/1.0.0/" and len(text[2]) == 64
    assert run("node", "swarm-key", str(path)).returncode != 0


async def test_a_killed_host_leaves_the_offer_book_before_its_offer_expires(home):
    """kill -9 sends no Withdraw: the gateway notices the dead connection instead of waiting out the offer."""
    import signal

    import trio

    from peers import running_gateway

    host = subprocess.Popen([*GPUNEXUS, "node", "serve", "--model", "tiny", "--listen", "/ip4/127.0.0.1/tcp/0", "--tokens-per-s", "100"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=home)
    try:
        addr = (await trio.to_thread.run_sync(host.stdout.readline)).strip().split(" ", 1)[1]
        async with running_gateway([addr]) as gateway:
            with trio.fail_after(30):
                while not gateway.book.for_model("tiny"):
                    await gateway.book.changed.wait()
            [offer] = gateway.book.for_model("tiny")
            host.send_signal(signal.SIGKILL)
            with trio.fail_after(30):
                while gateway.book.for_model("tiny"):
                    await gateway.book.changed.wait()
            assert time.time() < offer.expires_at  # gone on the broken connection, not on expiry
    finally:
        host.kill()
        host.wait(timeout=20)
