"""The host image for real: built here, run with ``--network host``, used through a
gateway outside the container with the official ``openai`` SDK, and drained by
``docker stop`` in the middle of a stream.

Skips (saying why) where docker, its daemon or debootstrap is missing. The
base image is reused between runs; the host and hub images are rebuilt once per
session (docker's layer cache keeps that to seconds when only the source
changed), in the background from the start of tests/test_install_script.py on.
The last test runs the same drain on a plain ``gpunexus node serve`` process,
so SIGTERM draining is checked even where docker is not.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass

import pytest
import trio
from openai import APIStatusError, OpenAI

from docker_support import REPO, Lines, adocker, built_image, docker
from peers import GatedBackend, reference_backend, running_gateway, running_host, wait_for_offers

LOOPBACK_LISTEN = ["--listen", "/ip4/127.0.0.1/tcp/0", "--tokens-per-s", "100"]
PROMPT = [{"role": "user", "content": "Tell me a story"}]


@pytest.fixture(scope="session")
def host_image() -> str:
    return built_image("gpunexus-host")


@dataclass
class Running:
    """A host process (in a container or not) and its output, line by line."""

    process: trio.Process
    out: Lines
    err: Lines

    async def peer(self) -> str:
        return (await self.out.wait_for("peer: ", timeout=90)).split(" ", 1)[1].strip()


@asynccontextmanager
async def _process(cmd: list[str], cleanup: Callable[[Running], Awaitable[None]], env: dict[str, str] | None = None) -> AsyncIterator[Running]:
    process = await trio.lowlevel.open_process(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    running = Running(process, Lines(f"{cmd[0]} stdout"), Lines(f"{cmd[0]} stderr"))
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(running.out.pump, process.stdout)
            nursery.start_soon(running.err.pump, process.stderr)
            try:
                yield running
            finally:
                with trio.CancelScope(shield=True), trio.fail_after(60):
                    await cleanup(running)
                    await process.wait()
    finally:
        if process.returncode is None:
            process.kill()


def _container(image: str, name: str, args: list[str], *, volume: str | None = None, extra: tuple[str, ...] = ()) -> AbstractAsyncContextManager[Running]:
    """``docker run`` in the foreground, locked down as a host would run it."""
    cmd = ["docker", "run", "--rm", "--name", name, "--network", "host", "--read-only", "--tmpfs", "/tmp",
           "--cap-drop", "ALL", "--security-opt", "no-new-privileges", *extra]
    if volume:
        cmd += ["-v", f"{volume}:/var/lib/gpunexus"]

    async def remove(running: Running) -> None:  # whatever happened: no container is left behind
        await adocker("rm", "-f", "-v", name, check=False)  # -v: and its anonymous volumes

    return _process([*cmd, image, *args], remove)


def _stream(base_url: str, model: str, on_first_content: Callable[[], None]) -> tuple[str, str | None, int]:
    """One streamed chat completion with the official SDK (in a thread): text, finish_reason, usage."""
    client = OpenAI(base_url=base_url, api_key="sk-unused", max_retries=0, timeout=60)
    pieces: list[str] = []
    finish, completion_tokens = None, 0
    stream = client.chat.completions.create(model=model, messages=PROMPT, max_tokens=40, temperature=0.0,
                                            stream=True, stream_options={"include_usage": True})
    for chunk in stream:
        if chunk.usage is not None:
            completion_tokens = chunk.usage.completion_tokens
        for choice in chunk.choices:
            if choice.delta.content:
                if not pieces:
                    trio.from_thread.run_sync(on_first_content)
                pieces.append(choice.delta.content)
            finish = choice.finish_reason or finish
    return "".join(pieces), finish, completion_tokens


async def _drain_while_streaming(start: Callable[[list[str]], AbstractAsyncContextManager[Running]],
                                 stop: Callable[[Running], Awaitable[None]]) -> Running:
    """A host with the openai backend, mid-stream, is told to stop: the stream must finish whole.

    Its upstream is a gpunexus gateway in this process whose own host pauses
    after 8 tokens, so "mid-stream" is an event, not a guess at timing. It
    pauses only once the host is up: the host's start-up check streams one
    real answer through the upstream to measure its speed.
    """
    gated = GatedBackend(reference_backend())
    async with running_host(gated) as origin, running_gateway([origin.node.listen_addrs()[0]]) as upstream:
        await wait_for_offers(upstream)
        args = ["node", "serve", "--model", "gated", "--backend", "openai", "--upstream", upstream.base_url,
                "--upstream-model", "tiny", *LOOPBACK_LISTEN]
        async with start(args) as host:
            peer = await host.peer()
            gated.pause_after = 8
            async with running_gateway([peer]) as gateway:
                await wait_for_offers(gateway, model="gated")
                first_content = trio.Event()
                result: list[tuple[str, str | None, int]] = []

                async with trio.open_nursery() as nursery:
                    async def consume() -> None:
                        result.append(await trio.to_thread.run_sync(_stream, gateway.base_url, "gated", first_content.set))

                    nursery.start_soon(consume)
                    with trio.fail_after(60):
                        await first_content.wait()
                        await gated.paused.wait()  # the answer is half out
                    nursery.start_soon(stop, host)
                    await host.err.wait_for("SIGTERM: draining 1 request(s) in flight", timeout=30)
                    # Draining: a new request is refused (no other host here), the old one goes on.
                    with pytest.raises(APIStatusError) as refused:
                        await trio.to_thread.run_sync(_stream, gateway.base_url, "gated", lambda: None)
                    assert refused.value.status_code == 503
                    gated.release.set()
                text, finish, completion_tokens = result[0]
                assert finish in ("stop", "length") and len(text) > 0
                assert completion_tokens > 8, "the client got the whole answer, past the pause"
                with trio.fail_after(60):
                    await host.process.wait()
                assert host.process.returncode == 0, host.err.tail()
                assert host.err.find("stopped: 1 requests served, 0 cut off"), host.err.tail()
    return host


async def test_docker_stop_drains_a_stream_in_flight(host_image: str) -> None:
    name = f"gpunexus-test-{uuid.uuid4().hex[:8]}"

    async def docker_stop(host: Running) -> None:
        await adocker("stop", "-t", "60", name, timeout=90)

    with trio.fail_after(240):
        await _drain_while_streaming(lambda args: _container(host_image, name, args), docker_stop)


async def test_the_image_serves_the_reference_model_keeps_state_and_reports_health(host_image: str) -> None:
    volume = f"gpunexus-test-{uuid.uuid4().hex[:8]}"
    docker("volume", "create", volume)
    try:
        with trio.fail_after(240):
            peers = []
            for run in range(2):  # the same volume twice: the identity survives the container
                name = f"{volume}-{run}"
                health = Lines("docker events")
                started = int(time.time()) - 1  # docker events from here on: a health event before we listen still counts
                async with _container(host_image, name, ["node", "serve", "--model", "tiny", *LOOPBACK_LISTEN], volume=volume,
                                      extra=("--health-interval", "1s", "--health-start-period", "60s")) as host:
                    peers.append(await host.peer())
                    if run == 0:
                        # Not root, and healthy by the image's own HEALTHCHECK (`gpunexus node status`).
                        assert (await adocker("exec", name, "id", "-u")).stdout.strip() == b"10001"
                        events = await trio.lowlevel.open_process(
                            ["docker", "events", "--filter", f"container={name}", "--filter", "event=health_status", "--since", str(started)],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
                        try:
                            async with trio.open_nursery() as nursery:
                                nursery.start_soon(health.pump, events.stdout)
                                await health.wait_for("health_status: healthy", timeout=60)
                                nursery.cancel_scope.cancel()
                        finally:
                            events.kill()
                            await events.wait()
                        async with running_gateway([peers[0]]) as gateway:
                            await wait_for_offers(gateway)
                            client = OpenAI(base_url=gateway.base_url, api_key="sk-unused", max_retries=0, timeout=60)
                            answer = await trio.to_thread.run_sync(lambda: client.chat.completions.create(
                                model="tiny", messages=PROMPT, max_tokens=12))
                        assert answer.choices[0].finish_reason in ("stop", "length")
                        assert answer.usage is not None and answer.usage.completion_tokens > 0
                        status = (await adocker("exec", name, "gpunexus", "node", "status")).stdout.decode()
                        assert "served       1 requests" in status, status
                    await adocker("stop", "-t", "30", name)
                assert host.process.returncode == 0, host.err.tail()
            assert peers[0].split("/p2p/")[1] == peers[1].split("/p2p/")[1], "the identity key lives in the volume"
    finally:
        docker("volume", "rm", "-f", volume, check=False)


async def test_sigterm_drains_a_plain_host_process_too(tmp_path) -> None:
    """The drain that docker stop relies on, on `gpunexus node serve` itself (no docker needed)."""
    env = dict(os.environ, GPUNEXUS_HOME=str(tmp_path))

    def start(args: list[str]) -> AbstractAsyncContextManager[Running]:
        async def kill(running: Running) -> None:  # a no-op once the test has seen it exit
            if running.process.returncode is None:
                running.process.kill()

        return _process([sys.executable, "-m", "gpunexus", *args], kill, env=env)

    async def sigterm(host: Running) -> None:
        host.process.send_signal(signal.SIGTERM)

    with trio.fail_after(120):
        await _drain_while_streaming(start, sigterm)


def _through_dependencies(dockerfile: str) -> list[str]:
    """A Dockerfile's instructions from its build stage through the layer that pip-installs the dependencies."""
    text = (REPO / "docker" / dockerfile).read_text().replace("\\\n", " ")
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    start = lines.index("FROM ${BASE} AS build")
    end = next(i for i, line in enumerate(lines) if "pip install -q -r /tmp/requirements.txt" in line)
    return lines[start:end + 1]


def test_the_hub_image_builds_on_the_host_images_dependency_layer() -> None:
    """Docker's layer cache builds the dependencies once for both images only while these lines are the same."""
    assert _through_dependencies("hub.Dockerfile") == _through_dependencies("host.Dockerfile")


@pytest.fixture(scope="session")
def hub_image() -> str:
    return built_image("gpunexus-hub")


async def test_the_hub_image_serves_reports_health_and_stops_cleanly(hub_image: str) -> None:
    """Its own CMD and HEALTHCHECK, on the container's own loopback (--network none: no port of this machine)."""
    name = f"gpunexus-test-hub-{uuid.uuid4().hex[:8]}"
    started = int(time.time()) - 1
    await adocker("run", "-d", "--name", name, "--network", "none", "--read-only", "--tmpfs", "/tmp", "--cap-drop", "ALL",
                  "--health-interval", "1s", hub_image)
    events = await trio.lowlevel.open_process(
        ["docker", "events", "--filter", f"container={name}", "--filter", "event=health_status", "--since", str(started)],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        with trio.fail_after(120):
            health = Lines("docker events")
            async with trio.open_nursery() as nursery:
                nursery.start_soon(health.pump, events.stdout)
                await health.wait_for("health_status: healthy", timeout=90)
                nursery.cancel_scope.cancel()
            added = await adocker("exec", name, "gpunexus", "hub", "user", "add", "ops@example.com", "--role", "admin")
            assert added.stdout.decode().strip().splitlines()[-1].startswith("gnx_")
            await adocker("exec", name, "python3", "-c", "import psycopg")  # the postgres extra, for docker/compose.yaml
            await adocker("stop", "-t", "30", name)
            state = await adocker("inspect", "--format", "{{.State.ExitCode}}", name)
            assert state.stdout.strip() == b"0", (await adocker("logs", name)).stderr.decode()[-2000:]
    finally:
        events.kill()
        with trio.CancelScope(shield=True):
            await events.wait()
            await adocker("rm", "-f", "-v", name, check=False)  # -v: and its anonymous volumes
