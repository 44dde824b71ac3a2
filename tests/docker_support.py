"""Helpers for the tests that run real containers and real processes.

The base image comes from ``docker/make-base.sh`` (debootstrap, no registry
pull) and is reused between runs: only its first build costs a minute or two.
Every subprocess here has a deadline, and every wait on a process's output is
a wait for a line, never a sleep.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest
import trio

REPO = Path(__file__).resolve().parent.parent
BASE_IMAGE = "gpunexus-base:bookworm"


def docker_unavailable(*, needs_base: bool = True) -> str | None:
    """Why these tests cannot run here, or None when they can."""
    if shutil.which("docker") is None:
        return "docker is not installed (.ci/run installs Debian's docker.io)"
    try:
        info = subprocess.run(["docker", "info", "--format", "{{.ServerVersion}}"], capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        return "docker info did not answer within 30 s"
    if info.returncode != 0:
        return f"no docker daemon reachable: {info.stderr.strip()[:200]}"
    if needs_base and not image_exists(BASE_IMAGE):
        if shutil.which("debootstrap") is None:
            return f"{BASE_IMAGE} is absent and debootstrap is not installed to make it"
        if os.geteuid() != 0:
            return f"{BASE_IMAGE} is absent and debootstrap needs root to make it"
    return None


def image_exists(tag: str) -> bool:
    return subprocess.run(["docker", "image", "inspect", tag], capture_output=True, timeout=30).returncode == 0


def ensure_base_image() -> str:
    """The debootstrap base image: built once (a minute or two), then reused."""
    reason = docker_unavailable()
    if reason:
        pytest.skip(reason)
    out = subprocess.run([str(REPO / "docker" / "make-base.sh"), BASE_IMAGE], capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, f"make-base.sh failed:\n{out.stdout}\n{out.stderr}"
    return BASE_IMAGE


# Names of what the tests leave for their next run, one set per checkout, so
# that two checkouts testing at once never build over each other's images.
CHECKOUT = hashlib.sha256(str(REPO).encode()).hexdigest()[:8]


def build_image(dockerfile: str, name: str) -> str:
    """``docker build`` a tag of this checkout; the image it replaces is removed
    (its layers would pile up, one venv per source change), the cache kept."""
    tag = f"{name}:test-{CHECKOUT}"
    old = docker("image", "inspect", "--format", "{{.Id}}", tag, check=False).stdout.strip()
    start = time.monotonic()
    out = subprocess.run(["docker", "build", "--force-rm", "--network", "host", "-f", dockerfile, "-t", tag, "."],
                         cwd=REPO, capture_output=True, text=True, timeout=1200)
    assert out.returncode == 0, f"docker build -f {dockerfile} failed:\n{out.stdout[-4000:]}\n{out.stderr[-4000:]}"
    new = docker("image", "inspect", "--format", "{{.Id}}", tag).stdout.strip()
    if old and old != new:
        docker("rmi", old, check=False)
    print(f"\nbuilt {tag} in {time.monotonic() - start:.0f} s")
    return tag


IMAGES = {"gpunexus-host": "docker/host.Dockerfile", "gpunexus-hub": "docker/hub.Dockerfile"}
"""The images the tests build, in build order: the hub's reuses the host's dependency layer."""

wanted_images: set[str] = set()
"""Those of ``IMAGES`` that this session's tests use (tests/conftest.py fills it in when it collects)."""

# One build at a time (the second reuses the first's layers), in a thread of its
# own: pip inside a build keeps one core busy, the tests running meanwhile the other.
_builder = ThreadPoolExecutor(max_workers=1, thread_name_prefix="docker-build")
_builds: dict[str, Future[str]] = {}


def start_image_builds(names: set[str]) -> None:
    """Start building these of ``IMAGES`` in the background, each once a session.

    tests/conftest.py runs tests/test_install_script.py just before the tests
    that use the images, and it calls this first with ``wanted_images``: its
    minutes of apt and pip in a throwaway root then overlap the builds' own.
    """
    ensure_base_image()  # here, not in the thread: it may skip the calling test
    for name, dockerfile in IMAGES.items():
        if name in names and name not in _builds:
            _builds[name] = _builder.submit(build_image, dockerfile, name)


def drop_pending_builds() -> None:
    """At the end of a session: the builds no test waits for any more do not start (one under way ends by itself)."""
    _builder.shutdown(wait=False, cancel_futures=True)


def built_image(name: str) -> str:
    """The tag of one of ``IMAGES``, built this session (started here if nothing started it before)."""
    start_image_builds({name})
    return _builds[name].result()


def docker(*args: str, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess[str]:
    out = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout)
    if check:
        assert out.returncode == 0, f"docker {' '.join(args)} failed ({out.returncode}):\n{out.stdout}\n{out.stderr}"
    return out


class Lines:
    """A process's output stream, read line by line as it comes.

    ``wait_for`` returns the first line containing a string, waking on each
    new line: a test waits for what the process says, not for time to pass.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.lines: list[str] = []
        self.closed = False
        self._changed = trio.Event()

    async def pump(self, stream: trio.abc.ReceiveStream) -> None:
        pending = b""
        async for chunk in stream:
            pending += chunk
            *complete, pending = pending.split(b"\n")
            self.lines.extend(line.decode(errors="replace") for line in complete)
            self._wake()
        if pending:
            self.lines.append(pending.decode(errors="replace"))
        self.closed = True
        self._wake()

    def _wake(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    def find(self, needle: str) -> str | None:
        return next((line for line in self.lines if needle in line), None)

    async def wait_for(self, needle: str, timeout: float) -> str:
        with trio.move_on_after(timeout):
            while (line := self.find(needle)) is None:
                if self.closed:
                    raise AssertionError(f"{self.name} ended before printing {needle!r}; last lines:\n{self.tail()}")
                await self._changed.wait()
            return line
        raise AssertionError(f"{self.name} printed no {needle!r} within {timeout:g} s; last lines:\n{self.tail()}")

    def tail(self, n: int = 30) -> str:
        return "\n".join(self.lines[-n:])


async def adocker(*args: str, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess[bytes]:
    """``docker`` from a trio test, without blocking the peers running in its event loop."""
    with trio.fail_after(timeout):
        out = await trio.run_process(["docker", *args], capture_stdout=True, capture_stderr=True, check=False)
    if check:
        assert out.returncode == 0, f"docker {' '.join(args)} failed ({out.returncode}):\n{out.stdout.decode()}\n{out.stderr.decode()}"
    return out
