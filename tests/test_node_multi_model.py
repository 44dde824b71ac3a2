"""Several models in one host peer: two reference models of different shapes, a real gateway, the openai SDK.

Each model has its own offer (signed, gossiped), its own slots and counters,
and can be taken back alone (``node disable --model``) while the other keeps
serving. The gateway's offer book and its ``/v1/models`` are the witnesses.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import httpx
import openai
import pytest
import trio
import trio.testing

from gpunexus.node.backends.reference import ReferenceBackend
from gpunexus.node.host.service import UnknownModel
from gpunexus.node.runtime import ModelOptions
from peers import GatedBackend, running_gateway, running_host, wait_for_offers

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def nano(**kw) -> ModelOptions:
    return ModelOptions(ReferenceBackend("nano"), price_micro_per_mtok=300_000, max_slots=1, tokens_per_s=50.0, **kw)


async def wait_for_no_offers(gateway, model, timeout=20.0):
    with trio.fail_after(timeout):
        while gateway.book.for_model(model):
            await gateway.book.changed.wait()


def ask(base_url: str, model: str) -> openai.types.chat.ChatCompletion:
    client = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0)
    return client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hi"}], max_tokens=12, seed=7, temperature=0.8)


async def test_one_peer_serves_two_models_each_with_its_own_offer_and_slots():
    async with running_host(models=[nano()], max_slots=2) as host:
        async with running_gateway([host.node.listen_addrs()[0]]) as gateway:
            await wait_for_offers(gateway, "tiny")
            await wait_for_offers(gateway, "nano")
            [tiny_offer], [nano_offer] = gateway.book.for_model("tiny"), gateway.book.for_model("nano")
            assert tiny_offer.peer_id == nano_offer.peer_id == host.node.peer_id
            assert (tiny_offer.price_micro_per_mtok, tiny_offer.max_slots, tiny_offer.max_context) == (200_000, 2, 2048)
            assert (nano_offer.price_micro_per_mtok, nano_offer.max_slots, nano_offer.max_context) == (300_000, 1, 1024)
            assert tiny_offer.model_hash != nano_offer.model_hash

            def use_sdk():
                client = openai.OpenAI(base_url=gateway.base_url, api_key="unused", max_retries=0)
                return sorted(m.id for m in client.models.list()), ask(gateway.base_url, "tiny"), ask(gateway.base_url, "nano")

            models, tiny, small = await trio.to_thread.run_sync(use_sdk)
    assert models == ["nano", "tiny"]
    assert tiny.model == "tiny" and small.model == "nano"
    assert tiny.usage.completion_tokens > 0 and small.usage.completion_tokens > 0
    assert tiny.choices[0].message.content != small.choices[0].message.content  # other weights, same seed
    served = {m["model"]: m["served"] for m in host.service.status()["models"]}
    assert served == {"tiny": 1, "nano": 1} and host.service.stats.served == 2


async def test_disabling_one_model_drains_it_and_withdraws_only_its_offer():
    gated = GatedBackend(ReferenceBackend("nano"), pause_after=2)
    async with running_host(models=[ModelOptions(gated, price_micro_per_mtok=200_000, max_slots=1)]) as host:
        async with running_gateway([host.node.listen_addrs()[0]]) as gateway:
            await wait_for_offers(gateway, "tiny")
            await wait_for_offers(gateway, "nano")
            async with httpx.AsyncClient(base_url=gateway.base_url, timeout=30) as http, trio.open_nursery() as nursery:
                result = {}

                async def in_flight():
                    # Seeded: an unseeded draw may end early at the end-of-text token.
                    result["r"] = await http.post("/chat/completions", json={"model": "nano", "messages": [{"role": "user", "content": "x"}], "max_tokens": 6, "seed": 7})

                nursery.start_soon(in_flight)
                await gated.paused.wait()
                disabled = trio.Event()

                async def disable():
                    await host.service.disable("nano")
                    disabled.set()

                nursery.start_soon(disable)
                await trio.testing.wait_all_tasks_blocked()
                assert not disabled.is_set()  # draining nano's request, its offer not yet withdrawn
                status = {m["model"]: m for m in host.service.status()["models"]}
                assert not status["nano"]["enabled"] and status["tiny"]["enabled"] and host.service.enabled
                # The other model serves on meanwhile.
                r = await http.post("/chat/completions", json={"model": "tiny", "messages": [{"role": "user", "content": "x"}], "max_tokens": 3, "seed": 7})
                assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
                gated.release.set()
                await disabled.wait()
            finished = result["r"].json()
            assert result["r"].status_code == 200 and finished["usage"]["completion_tokens"] == 6 and finished["choices"][0]["finish_reason"] == "length"
            await wait_for_no_offers(gateway, "nano")  # a signed withdrawal, well inside the offer's TTL
            async with httpx.AsyncClient(base_url=gateway.base_url, timeout=30) as http:
                assert [m["id"] for m in (await http.get("/models")).json()["data"]] == ["tiny"]
                gone = await http.post("/chat/completions", json={"model": "nano", "messages": [{"role": "user", "content": "x"}]})
                assert gone.status_code == 404 and gone.json()["error"]["code"] == "model_not_found"
                assert [o.model for o in gateway.book.live()] == ["tiny"]  # re-announced at once, not waiting for a heartbeat
                r = await http.post("/chat/completions", json={"model": "tiny", "messages": [{"role": "user", "content": "x"}], "max_tokens": 3, "seed": 7})
                assert r.status_code == 200
                await host.service.enable("nano")
                await wait_for_offers(gateway, "nano")
                r = await http.post("/chat/completions", json={"model": "nano", "messages": [{"role": "user", "content": "x"}], "max_tokens": 3, "seed": 7})
                assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
            with pytest.raises(UnknownModel, match="serves tiny, nano, not 'huge'"):
                await host.service.disable("huge")


async def test_a_model_taken_back_by_hand_stays_back_when_the_host_comes_back():
    async with running_host(models=[nano()]) as host:
        async with running_gateway([host.node.listen_addrs()[0]]) as gateway:
            await wait_for_offers(gateway, "nano")
            await wait_for_offers(gateway, "tiny")  # each model has its own topic: its offer comes on its own
            await host.service.disable("nano")
            await host.service.disable()  # the whole host: node disable, a schedule, SIGTERM
            await wait_for_no_offers(gateway, "tiny")
            await host.service.enable()
            await wait_for_offers(gateway, "tiny")
            assert not gateway.book.for_model("nano")
            assert {m["model"]: m["enabled"] for m in host.service.status()["models"]} == {"tiny": True, "nano": False}


# --- the command line: node serve --config, node disable --model, node status ----------------
GPUNEXUS = [sys.executable, "-m", "gpunexus"]

HOST_TOML = """\
[[model]]
id = "tiny"
price = "0.25"
slots = 2

[[model]]
id = "nano"
price = 0.3
slots = 1
license = "Apache-2.0"

[[model]]
id = "too-slow"
reference = "tiny"
min_tokens_per_s = 1e12
"""


async def gpunexus(*args: str, env) -> subprocess.CompletedProcess:
    with trio.fail_after(60):
        done = await trio.run_process([*GPUNEXUS, *args], capture_stdout=True, capture_stderr=True, check=False, env=env)
    return subprocess.CompletedProcess(done.args, done.returncode, done.stdout.decode(), done.stderr.decode())


async def test_serve_config_then_take_one_model_back_from_the_command_line(tmp_path):
    env = dict(os.environ, GPUNEXUS_HOME=str(tmp_path))
    (tmp_path / "host.toml").write_text(HOST_TOML)
    log = tmp_path / "serve.log"
    with log.open("w") as err:
        host = subprocess.Popen([*GPUNEXUS, "node", "serve", "--config", str(tmp_path / "host.toml"), "--listen", "/ip4/127.0.0.1/tcp/0", "--min-tokens-per-s", "1"],
                                stdout=subprocess.PIPE, stderr=err, text=True, env=env)
    try:
        with trio.fail_after(60):
            first = (await trio.to_thread.run_sync(host.stdout.readline)).strip()
        assert first.startswith("peer: "), log.read_text()
        assert "refusing to serve too-slow: this machine fails the check: tokens/s" in log.read_text()  # the others are served
        status = await gpunexus("node", "status", env=env)
        assert status.returncode == 0 and "models       2, 2 taking orders" in status.stdout
        assert "0.250000 USD/Mtok, 0 of 2 slots" in status.stdout and "0.300000 USD/Mtok, 0 of 1 slots" in status.stdout
        async with running_gateway([first.split(" ", 1)[1]]) as gateway:
            await wait_for_offers(gateway, "tiny")
            await wait_for_offers(gateway, "nano")
            assert not gateway.book.for_model("too-slow")
            async with httpx.AsyncClient(base_url=gateway.base_url, timeout=30) as http:
                for model in ("tiny", "nano"):
                    r = await http.post("/chat/completions", json={"model": model, "messages": [{"role": "user", "content": "x"}], "max_tokens": 3, "seed": 7})
                    assert r.status_code == 200 and r.json()["model"] == model
                disabled = await gpunexus("node", "disable", "--model", "nano", env=env)
                assert disabled.returncode == 0 and "disabled (withdrawn)" in disabled.stdout and "draining nano" in disabled.stderr
                await wait_for_no_offers(gateway, "nano")
                assert [m["id"] for m in (await http.get("/models")).json()["data"]] == ["tiny"]
                r = await http.post("/chat/completions", json={"model": "tiny", "messages": [{"role": "user", "content": "x"}], "max_tokens": 3, "seed": 7})
                assert r.status_code == 200
                unknown = await gpunexus("node", "disable", "--model", "huge", env=env)
                assert unknown.returncode == 1 and "cannot disable huge: this host serves tiny, nano, not 'huge'" in unknown.stderr
                enabled = await gpunexus("node", "enable", "--model", "nano", env=env)
                assert enabled.returncode == 0 and "models       2, 2 taking orders" in enabled.stdout
                await wait_for_offers(gateway, "nano")
    finally:
        host.terminate()
        host.wait(timeout=30)


def test_check_gives_one_verdict_per_model():
    out = subprocess.run([*GPUNEXUS, "node", "check", "--model", "tiny", "--model", "nano", "--json"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["ok"] and [m["model"] for m in report["models"]] == ["tiny", "nano"]
    assert all(m["measured"]["tokens_per_s"] > 0 for m in report["models"])
    failing = subprocess.run([*GPUNEXUS, "node", "check", "--model", "tiny", "--model", "huge"], capture_output=True, text=True, timeout=120)
    assert failing.returncode == 1
    assert failing.stdout.count("PASS: this machine can serve the model") == 1 and "FAIL: backend" in failing.stdout
