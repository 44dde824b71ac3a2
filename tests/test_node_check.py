"""The hardware and network gate: ``node check`` and ``node serve``'s start-up check, on real runs.

The reference backend really generates; the hub and the peers are real
(HTTP and libp2p on loopback). GPUs are the one thing this machine may not
have, so the GPU lines are also checked against a stand-in ``nvidia-smi``
that prints what a driver prints.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import re
import textwrap

import pytest
import trio

from gpunexus.node.host.check import (FAIL, PASS, WARN, Measurements, Minimums, Report, Throughput, announced_tokens_per_s, evaluate,
                                 forced_region)
from gpunexus.node.host.gpu import Gpu, GpuSurvey, parse_nvidia_smi, survey_gpus
from gpunexus.node.net.netprobe import Probe
from market import running_hub
from peers import running_gateway, running_host

GPUNEXUS = [sys.executable, "-m", "gpunexus"]


def run(*args, env=None, timeout=120) -> subprocess.CompletedProcess:
    return subprocess.run([*GPUNEXUS, *args], capture_output=True, text=True, timeout=timeout, env=env)


async def arun(*args, env=None) -> subprocess.CompletedProcess:
    with trio.fail_after(120):
        return await trio.run_process([*GPUNEXUS, *args], capture_stdout=True, capture_stderr=True, check=False, env=env)


def row(stdout: str, name: str) -> list[str]:
    """The table rows of one check, split into cells (two spaces or more apart)."""
    import re

    return [re.split(r"\s{2,}", line.strip()) for line in stdout.splitlines() if line.startswith(name + " ")]


@pytest.fixture
def fake_gpu(tmp_path):
    """A PATH whose ``nvidia-smi`` answers like a driver with one RTX 4090 (24 GB, compute 8.9)."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    script = bindir / "nvidia-smi"
    script.write_text(textwrap.dedent("""\
        #!/bin/sh
        case "$1" in
          --query-gpu=name,memory.total,compute_cap) echo "NVIDIA GeForce RTX 4090, 24564 MiB, 8.9" ;;
          *) echo "unexpected: $*" >&2; exit 2 ;;
        esac
        """))
    script.chmod(0o755)
    return dict(os.environ, PATH=f"{bindir}{os.pathsep}{os.environ['PATH']}")


# --- pure parts -------------------------------------------------------------------------------
def test_nvidia_smi_lines_are_parsed_whatever_the_driver_prints():
    assert parse_nvidia_smi("NVIDIA H200, 143771 MiB, 9.0\n") == [Gpu("NVIDIA H200", 143771, (9, 0))]
    two = parse_nvidia_smi("NVIDIA A10G, 23028 MiB, 8.6\nTesla T4, 15360 MiB, 7.5\n\n")
    assert [g.compute_capability for g in two] == [(8, 6), (7, 5)]
    assert parse_nvidia_smi("Quadro RTX 6000, Ada, 49140 MiB, 8.9") == [Gpu("Quadro RTX 6000, Ada", 49140, (8, 9))]  # comma in the name
    assert parse_nvidia_smi("NVIDIA A100 (MIG parent), [N/A], 8.0") == [Gpu("NVIDIA A100 (MIG parent)", 0, (8, 0))]
    assert parse_nvidia_smi("GeForce GTX 1080, 8192 MiB") == [Gpu("GeForce GTX 1080", 8192, None)]  # asked without compute_cap
    assert Gpu("RTX 4090", 24564, (8, 9)).memory_gb > 24  # a "24 GB" card meets a 24 GB minimum


def test_an_old_driver_is_asked_again_without_compute_cap():
    asked = []

    def fake_run(argv, **kw):
        asked.append(argv[1])
        if "compute_cap" in argv[1]:
            return subprocess.CompletedProcess(argv, 2, "", 'Field "compute_cap" is not a valid field to query.\n')
        return subprocess.CompletedProcess(argv, 0, "Tesla P100-PCIE-16GB, 16280 MiB\n", "")

    survey = survey_gpus(run=fake_run, which=lambda name: "/usr/bin/nvidia-smi")
    assert asked == ["--query-gpu=name,memory.total,compute_cap", "--query-gpu=name,memory.total"]
    assert survey.gpus == (Gpu("Tesla P100-PCIE-16GB", 16280, None),) and survey.lowest_compute_capability is None
    assert survey_gpus(which=lambda name: None) == GpuSurvey((), "nvidia-smi absent")
    broken = survey_gpus(run=lambda argv, **kw: subprocess.CompletedProcess(argv, 9, "NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver.\n", ""),
                         which=lambda name: "/usr/bin/nvidia-smi")
    assert broken.gpus == () and "couldn't communicate" in broken.note


def test_the_verdict_is_judged_from_measurements_alone():
    gpus = GpuSurvey((Gpu("A", 24564, (8, 6)), Gpu("B", 24564, (7, 5))))
    measured = Measurements(gpus, Throughput(42.0), Probe("hub", "http://hub", 30.0, 90.0), (Probe("peer", "/ip4/x", error="refused"),))
    lines = {ln.name: ln for ln in evaluate(measured, Minimums(tokens_per_s=40, vram_gb=48, compute_capability=(8, 0), max_latency_ms=50))}
    assert lines["vram"].status == PASS  # all GPUs together: 51.5 GB
    assert lines["compute"].status == FAIL and lines["compute"].measured == "7.5"  # the weakest GPU
    assert lines["tokens/s"].status == PASS and lines["hub"].status == PASS and lines["peer"].status == FAIL
    # node serve: an unreachable peer warns (the host redials), a slow one still fails
    lenient = {ln.name: ln.status for ln in evaluate(measured, Minimums(max_latency_ms=20), network_strict=False)}
    assert lenient == {"vram": PASS, "compute": PASS, "tokens/s": PASS, "hub": FAIL, "peer": WARN}
    nothing = {ln.name: ln.status for ln in evaluate(Measurements(GpuSurvey((), "nvidia-smi absent"), Throughput(None, "upstream down")), Minimums(vram_gb=8))}
    assert nothing == {"vram": FAIL, "compute": PASS, "tokens/s": FAIL}


def test_a_forced_offer_names_what_it_failed_within_the_region_limit():
    failed = Report("m", "reference", Minimums(), Measurements(GpuSurvey(()), Throughput(1.0)),
                    evaluate(Measurements(GpuSurvey(()), Throughput(1.0)), Minimums(tokens_per_s=5, vram_gb=8)))
    assert forced_region("eu-west", failed) == "eu-west (forced: vram,tokens/s)"
    assert forced_region("", failed) == "(forced: vram,tokens/s)"
    long = forced_region("x" * 64, failed)
    assert len(long) == 64 and long.endswith("(forced: vram,tokens/s)")
    passed = Report("m", "reference", Minimums(), Measurements(GpuSurvey(()), Throughput(50.0)), evaluate(Measurements(GpuSurvey(()), Throughput(50.0)), Minimums()))
    assert forced_region("eu-west", passed) == "eu-west"


def test_the_offer_carries_the_measured_speed_and_a_claim_can_only_lower_it():
    assert announced_tokens_per_s(300.0, None) == (300.0, "")
    assert announced_tokens_per_s(300.0, 100.0)[0] == 100.0
    speed, note = announced_tokens_per_s(300.0, 5000.0)
    assert speed == 300.0 and "not the claimed 5000" in note
    assert announced_tokens_per_s(None, None)[0] == 0.0  # forced past a failed run: nothing measured, nothing claimed


# --- node check, for real ------------------------------------------------------------------------
def test_check_passes_low_minimums_and_fails_impossible_ones():
    ok = run("node", "check", "--model", "tiny", "--min-tokens-per-s", "1")
    assert ok.returncode == 0, ok.stderr
    [[_, result, measured, required]] = row(ok.stdout, "tokens/s")
    assert result == "PASS" and float(measured) > 1 and required == ">= 1"
    assert "minimums  from flags" in ok.stdout
    assert ok.stdout.rstrip().splitlines()[-1] == "PASS: this machine can serve the model"
    slow = run("node", "check", "--model", "tiny", "--min-tokens-per-s", "1e12")
    assert slow.returncode == 1
    [[_, result, _, required]] = row(slow.stdout, "tokens/s")
    assert result == "FAIL" and required == ">= 1e+12"
    assert slow.stdout.rstrip().splitlines()[-1].startswith("FAIL: tokens/s ")


def test_check_reads_the_gpu_from_nvidia_smi(fake_gpu):
    ok = run("node", "check", "--model", "tiny", "--min-vram-gb", "24", "--min-compute-capability", "8.0", env=fake_gpu)
    assert ok.returncode == 0, ok.stdout
    assert row(ok.stdout, "vram") == [["vram", "PASS", "25.8 GB on 1 GPU", ">= 24 GB"]]
    assert row(ok.stdout, "compute") == [["compute", "PASS", "8.9", ">= 8.0"]]
    assert "NVIDIA GeForce RTX 4090, 24564 MiB, compute 8.9" in ok.stdout
    short = run("node", "check", "--model", "tiny", "--min-vram-gb", "80", "--min-compute-capability", "9.0", "--json", env=fake_gpu)
    assert short.returncode == 1
    report = json.loads(short.stdout)
    assert report["ok"] is False
    assert {c["name"]: c["status"] for c in report["checks"]} == {"vram": "FAIL", "compute": "FAIL", "tokens/s": "PASS"}
    assert report["measured"]["gpus"] == [{"name": "NVIDIA GeForce RTX 4090", "memory_mib": 24564, "compute_capability": "8.9"}]


def test_check_without_a_gpu_fails_a_vram_minimum():
    env = dict(os.environ, PATH=os.path.dirname(sys.executable))  # no nvidia-smi on this PATH, whatever the machine
    out = run("node", "check", "--model", "tiny", "--min-vram-gb", "1", env=env)
    assert out.returncode == 1
    assert row(out.stdout, "vram") == [["vram", "FAIL", "no GPU (nvidia-smi absent)", ">= 1 GB"]]


def test_check_usage_errors_exit_2():
    for args, words in [(["--min-compute-capability", "eight"], "compute capability must look like 8.6"),
                        (["--min-tokens-per-s", "-3"], "must be a positive number"),
                        (["--backend", "openai"], "--upstream"),
                        (["--swarm-key", "/nonexistent/swarm.key"], "swarm.key")]:
        out = run("node", "check", "--model", "tiny", *args)
        assert out.returncode == 2 and words in out.stderr, (args, out.stderr)
    unknown = run("node", "check", "--model", "no-such-model")
    assert unknown.returncode == 1 and "cannot load: unknown reference model" in unknown.stdout


async def test_check_measures_round_trips_to_a_real_hub_and_peer(tmp_path):
    async with running_hub(tmp_path / "hub") as hub, running_host() as host:
        peer = host.node.listen_addrs()[0]
        out = await arun("node", "check", "--model", "tiny", "--hub", hub.url, "--bootstrap", peer, "--max-latency-ms", "2000", "--json")
        assert out.returncode == 0, out.stdout
        checks = {c["name"]: c for c in json.loads(out.stdout)["checks"]}
        assert checks["hub"]["status"] == "PASS" and checks["hub"]["target"] == hub.url and checks["hub"]["measured"].endswith("ms)")
        assert checks["peer"]["status"] == "PASS" and checks["peer"]["target"] == peer
        network = {p["kind"]: p for p in json.loads(out.stdout)["measured"]["network"]}
        assert len(network["peer"]["samples_ms"]) == 3 and 0 < network["peer"]["latency_ms"] < 2000  # libp2p pings
        tight = await arun("node", "check", "--model", "tiny", "--hub", hub.url, "--max-latency-ms", "0.0001")
        assert tight.returncode == 1 and row(tight.stdout.decode(), "hub")[0][1] == "FAIL"
    gone = await arun("node", "check", "--model", "tiny", "--hub", hub.url, "--bootstrap", peer)
    assert gone.returncode == 1
    stdout = gone.stdout.decode()
    for name in ("hub", "peer"):  # both stopped: no answer is a FAIL for node check
        [[_, result, measured, *_]] = row(stdout, name)
        assert result == "FAIL" and measured.startswith("unreachable: ")


def test_bandwidth_is_judged_each_way_and_an_unmeasured_link_only_warns():
    fast = Probe("peer", "/ip4/a", 1.0, 250.0, down_mbps=900.0, up_mbps=40.0)
    old = Probe("peer", "/ip4/b", 1.0, 250.0, bandwidth_error="an older peer: no /gpunexus/speedtest/1")
    measured = Measurements(GpuSurvey(()), Throughput(50.0), None, (fast, old))

    def bandwidth(minimums, strict=True):
        return [(ln.target, ln.status, ln.measured) for ln in evaluate(measured, minimums, network_strict=strict) if ln.name == "bandwidth"]

    assert bandwidth(Minimums()) == [("/ip4/a", PASS, "down 900 / up 40 Mbit/s"), ("/ip4/b", WARN, "not measured: an older peer: no /gpunexus/speedtest/1")]
    assert [s for _, s, _ in bandwidth(Minimums(bandwidth_mbps=50))] == [FAIL, FAIL]  # the slower direction decides; unmeasured proves nothing
    assert [s for _, s, _ in bandwidth(Minimums(bandwidth_mbps=10), strict=False)] == [PASS, WARN]  # node serve: an older peer only warns
    unreachable = Measurements(GpuSurvey(()), Throughput(50.0), None, (Probe("peer", "/ip4/c", error="refused"),))
    assert [ln.name for ln in evaluate(unreachable, Minimums(bandwidth_mbps=10))][-1] == "peer"  # one FAIL line, not two


async def test_check_measures_bandwidth_to_a_real_peer_and_gates_on_it():
    from gpunexus.node.net import speedtest
    from gpunexus.node.net.p2p import P2PConfig, open_p2p
    from gpunexus.protocol.signing import Signer

    async with running_host() as host, open_p2p(Signer.generate(), P2PConfig(["/ip4/127.0.0.1/tcp/0"])) as older:
        older.host.remove_stream_handler(speedtest.PROTOCOL)  # a peer of a version before the speed test
        peer, old = host.node.listen_addrs()[0], older.listen_addrs()[0]
        out = await arun("node", "check", "--model", "tiny", "--bootstrap", peer, "--min-bandwidth-mbps", "1", "--json")
        assert out.returncode == 0, out.stdout
        report = json.loads(out.stdout)
        [line] = [c for c in report["checks"] if c["name"] == "bandwidth"]
        assert line["status"] == "PASS" and line["target"] == peer and line["required"] == ">= 1 Mbit/s"
        [probe] = report["measured"]["network"]
        assert probe["down_mbps"] > 1 and probe["up_mbps"] > 1  # megabytes really moved each way on loopback
        assert report["minimums"]["bandwidth_mbps"] == 1
        slow = await arun("node", "check", "--model", "tiny", "--bootstrap", peer, "--bootstrap", old, "--min-bandwidth-mbps", "1e9")
        stdout = slow.stdout.decode()
        assert slow.returncode == 1
        assert [cells[1] for cells in row(stdout, "bandwidth")] == ["FAIL", "FAIL"]
        assert "not measured: an older peer: no /gpunexus/speedtest/1" in stdout
        assert [cells[1] for cells in row(stdout, "peer")] == ["PASS", "PASS"]  # the older peer is reachable all the same


def test_check_refuses_a_url_that_is_not_a_hub(tmp_path):
    import http.server
    import threading

    server = http.server.HTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        out = run("node", "check", "--model", "tiny", "--hub", f"http://127.0.0.1:{server.server_port}")
    finally:
        server.shutdown()
    assert out.returncode == 1 and "GET /v1/hub answered 404" in row(out.stdout, "hub")[0][2]


# --- node serve's gate -----------------------------------------------------------------------
def test_serve_refuses_a_model_the_machine_fails(tmp_path):
    env = dict(os.environ, GPUNEXUS_HOME=str(tmp_path))
    out = run("node", "serve", "--model", "tiny", "--listen", "/ip4/127.0.0.1/tcp/0", "--min-tokens-per-s", "1e12", env=env)
    assert out.returncode == 1
    assert out.stdout == ""  # never got as far as a peer line
    last = out.stderr.rstrip().splitlines()[-1]
    assert last.startswith("refusing to serve tiny: this machine fails the check: tokens/s ") and "needs >= 1e+12" in last
    assert "--force" in last


async def test_serve_force_announces_the_measured_speed_and_says_so_in_the_offer(tmp_path):
    env = dict(os.environ, GPUNEXUS_HOME=str(tmp_path))
    log = tmp_path / "serve.log"
    with log.open("w") as err:
        host = subprocess.Popen([*GPUNEXUS, "node", "serve", "--model", "tiny", "--listen", "/ip4/127.0.0.1/tcp/0", "--region", "eu-west",
                                 "--min-tokens-per-s", "1e12", "--force", "--tokens-per-s", "1e13"],
                                stdout=subprocess.PIPE, stderr=err, text=True, env=env)
    try:
        with trio.fail_after(60):
            first = (await trio.to_thread.run_sync(host.stdout.readline)).strip()
        assert first.startswith("peer: "), log.read_text()
        async with running_gateway([first.split(" ", 1)[1]]) as gateway:
            with trio.fail_after(30):
                while not gateway.book.for_model("tiny"):
                    await gateway.book.changed.wait()
            [offer] = gateway.book.for_model("tiny")
        assert offer.region == "eu-west (forced: tokens/s)"
        text = log.read_text()
        assert "--force: serving tiny although it fails the check (tokens/s" in text
        measured = float(text.split("announcing the measured ", 1)[1].split(" ", 1)[0])
        assert offer.tokens_per_s == measured and 0 < measured < 1e12  # what this machine did, not the 1e13 claimed
    finally:
        host.terminate()
        host.wait(timeout=30)


# --- node models: what this machine's hardware can serve ----------------------------------------
def test_gpu_memory_is_computed_from_the_architecture():
    from gpunexus.node.host.known_models import GPU_MODELS, RUNTIME_OVERHEAD_GB, vram_gb

    llama = GPU_MODELS["llama-3.1-8b-instruct"]
    # 8.03e9 weights at 4 bits + a 8192-token FP16 KV cache of 32 layers x 8 heads x 128 + the runtime.
    assert vram_gb(llama, 8192, 4.0) == round(4.015 + 2 * 32 * 8 * 128 * 2 * 8192 / 1e9 + RUNTIME_OVERHEAD_GB, 1) == 6.1
    assert vram_gb(llama, 32768, 6.0) > vram_gb(llama, 8192, 6.0) > vram_gb(llama, 8192, 4.0)


def test_models_lists_what_the_gpu_can_serve(fake_gpu):
    out = run("node", "models", env=fake_gpu)
    assert out.returncode == 0, out.stderr
    verdicts = {cells[0]: cells[-1] for cells in (re.split(r"\s{2,}", line.strip()) for line in out.stdout.splitlines()) if len(cells) == 6}
    assert verdicts.pop("MODEL") == "RESULT"
    assert verdicts["tiny"] == verdicts["nano"] == "PASS"  # measured on this CPU
    assert verdicts["llama-3.1-8b-instruct"] == verdicts["qwen2.5-32b-instruct"] == "PASS"  # 6.1 and 19.5 GB of 25.8
    assert verdicts["llama-3.1-70b-instruct"] == "FAIL"  # 39 GB
    assert "gpu       NVIDIA GeForce RTX 4090, 24564 MiB, compute 8.9" in out.stdout
    longer = json.loads(run("node", "models", "--context", "131072", "--bits", "8", "--json", env=fake_gpu).stdout)
    by_name = {m["model"]: m for m in longer["models"]}
    assert by_name["llama-3.1-8b-instruct"]["context"] == 131072 and by_name["mistral-7b-instruct-v0.3"]["context"] == 32768  # capped
    assert not by_name["llama-3.1-8b-instruct"]["ok"]  # 8 GB of weights, 17.2 GB of KV cache, 1 GB runtime: over 25.8
    assert by_name["tiny"]["checks"][2]["name"] == "tokens/s" and by_name["tiny"]["ok"]


def test_models_without_a_gpu_offers_the_reference_models_only():
    out = run("node", "models", "--json", env=dict(os.environ, PATH="/nonexistent"))
    report = json.loads(out.stdout)
    assert report["gpu"].startswith("no GPU")
    assert [m["model"] for m in report["models"] if m["ok"]] == ["tiny", "nano"]
    assert run("node", "models", "--bits", "zero").returncode == 2


async def test_models_served_together_must_fit_in_the_gpus_together():
    from gpunexus.node.backends.reference import ReferenceBackend
    from gpunexus.node.host.check import run_gates

    one_4090 = lambda: GpuSurvey((Gpu("NVIDIA GeForce RTX 4090", 24564, (8, 9)),))  # 25.8 GB
    models = [(ReferenceBackend("tiny"), "reference", Minimums(tokens_per_s=1, vram_gb=16)),
              (ReferenceBackend("nano"), "reference", Minimums(tokens_per_s=1, vram_gb=12)),  # 28 GB with tiny: does not fit
              (ReferenceBackend("nano", public_name="nano-b"), "reference", Minimums(tokens_per_s=1, vram_gb=8))]  # 24 GB with tiny: fits
    tiny, nano, nano_b = await run_gates(models, survey=one_4090)
    assert tiny.ok and not nano.ok and nano_b.ok
    assert nano.failures[0].name == "vram-shared" and nano.failures[0].required == ">= 28 GB (with tiny)"
    assert [ln.required for ln in nano_b.lines if ln.name == "vram-shared"] == [">= 24 GB (with tiny)"]
    [alone] = await run_gates(models[1:2], survey=one_4090)
    assert alone.ok and "vram-shared" not in [ln.name for ln in alone.lines]  # one model: its own line says it all


def test_a_peer_answers_speed_tests_within_a_budget_per_asking_peer():
    from gpunexus.node.net.speedtest import PeerBudget

    now = [0.0]
    budget = PeerBudget(limit=10, window_s=60, clock=lambda: now[0])
    assert budget.take("a", 6) and not budget.take("a", 6) and budget.take("b", 6)  # each asking peer has its own
    now[0] = 61.0
    assert budget.take("a", 6)  # the window has passed


async def test_a_peer_over_its_speed_test_budget_is_refused_but_still_reachable():
    from gpunexus.node.net import speedtest
    from gpunexus.node.net.netprobe import probe_peers
    from gpunexus.node.net.p2p import P2PConfig, open_p2p
    from gpunexus.protocol.signing import Signer

    async with open_p2p(Signer.generate(), P2PConfig(["/ip4/127.0.0.1/tcp/0"])) as peer:
        peer.host.set_stream_handler(speedtest.PROTOCOL, speedtest.speedtest_handler(speedtest.PeerBudget(limit=2**20)))
        [probe] = await probe_peers(peer.listen_addrs(), bandwidth_bytes=4 * 2**20)
        assert probe.reachable and probe.down_mbps is None and probe.bandwidth_error
        [small] = await probe_peers(peer.listen_addrs(), bandwidth_bytes=2**18)  # another prober identity, within its own budget
        assert small.down_mbps > 0 and small.up_mbps > 0
        peer.host.set_stream_handler(speedtest.PROTOCOL, speedtest.speedtest_handler(total=speedtest.PeerBudget(limit=2**19)))
        [first] = await probe_peers(peer.listen_addrs(), bandwidth_bytes=2**18)
        [second] = await probe_peers(peer.listen_addrs(), bandwidth_bytes=2**18)  # a new identity, but all peers together are over
        assert first.down_mbps > 0 and second.reachable and second.down_mbps is None


async def test_the_hubs_catalogue_sets_a_models_minimums(tmp_path):
    from gpunexus.hub import catalogue

    async with running_hub(tmp_path / "hub") as hub:
        hub.hub.db.write_sync(catalogue.upsert, catalogue.Model(
            model="tiny", display_name="Tiny", licence_name="Apache-2.0", licence_url="", context_length=2048,
            available=True, updated_at=0.0, min_tokens_per_s=1e9, min_compute_capability="8.0"))
        out = await arun("node", "check", "--model", "tiny", "--hub", hub.url, "--min-tokens-per-s", "1", "--json")
        flags_only = await arun("node", "check", "--model", "tiny", "--min-tokens-per-s", "1", "--json")
    report = json.loads(out.stdout)
    checks = {c["name"]: c for c in report["checks"]}
    assert out.returncode == 1 and checks["tokens/s"]["status"] == "FAIL" and "1e+09" in checks["tokens/s"]["required"]
    assert report["minimums"]["source"].startswith(f"the hub's catalogue ({hub.url})")
    assert flags_only.returncode == 0 and json.loads(flags_only.stdout)["minimums"]["source"] == "flags"
