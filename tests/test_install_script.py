"""scripts/install-host.sh, run for real in throwaway Debian roots (containers of
the debootstrap base image): a dry run that changes nothing, refusals of
systems it does not support, and a real install, twice, registered with a real
hub on loopback, then changed to serve two models from a config file and
from two ``--model`` flags.

systemd cannot run as PID 1 in these containers, so each gets a stand-in
``systemctl`` (SYSTEMCTL_SHIM below) that records every call and really starts
and stops the unit's ExecStart as its User with its EnvironmentFile, and a
``/run/systemd/system`` folder, which is how the script (like sd_booted) tells
that systemd runs. The GPU branch is checked with a stand-in ``nvidia-smi``;
no GPU is used.

apt's and pip's downloads are kept in docker volumes between runs
(gpunexus-test-*), so only the first run pays for them.
"""

from __future__ import annotations

import base64
import os
import shutil
import sqlite3
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

from docker_support import CHECKOUT, REPO, Lines, adocker, ensure_base_image, start_image_builds, wanted_images

SCRIPT = REPO / "scripts" / "install-host.sh"
CACHES = {f"gpunexus-test-pip-cache-{CHECKOUT}": "/root/.cache/pip",  # one set per checkout: apt locks them
          f"gpunexus-test-apt-archives-{CHECKOUT}": "/var/cache/apt/archives",
          f"gpunexus-test-apt-lists-{CHECKOUT}": "/var/lib/apt/lists"}

SYSTEMCTL_SHIM = r"""#!/bin/bash
# A stand-in for systemctl where systemd is not PID 1: logs each call, and
# runs the unit's ExecStart as its User with its EnvironmentFile.
set -euo pipefail
echo "$*" >>/var/log/systemctl.calls
verb=$1; unit=${!#}; state=/run/fake-systemd; mkdir -p "$state"
file=/etc/systemd/system/$unit
field() { sed -n "s/^$1=//p" "$file" | head -n 1; }
alive() { [[ -f $state/$unit.pid ]] && kill -0 "$(cat "$state/$unit.pid")" 2>/dev/null; }
stop() {
    alive || return 0
    local pid; pid=$(cat "$state/$unit.pid")
    kill -TERM "$pid"
    while kill -0 "$pid" 2>/dev/null; do sleep 0.1; done
}
start() {
    alive && return 0
    # Like systemd: the EnvironmentFile is read as root, ExecStart runs as User with it.
    setsid bash -c 'set -a; . "$1"; set +a; exec runuser -u "$2" -- bash -c "eval \"exec \$1\"" _ "$3"' \
        _ "$(field EnvironmentFile)" "$(field User)" "$(field ExecStart)" >>"/var/log/$unit.log" 2>&1 </dev/null &
    echo $! >"$state/$unit.pid"
}
case $verb in
    daemon-reload) ;;
    enable) touch "$state/$unit.enabled" ;;
    is-enabled) [[ -f $state/$unit.enabled ]] ;;
    is-active) alive ;;
    start) start ;;
    stop) stop ;;
    restart) stop; start ;;
    *) echo "systemctl shim: $verb is not supported" >&2; exit 1 ;;
esac
"""

# Two reference models in one host, each with its own terms (node/host/config.py's grammar).
HOST_TOML = """\
[[model]]
id = "tiny"
price = 0.25
slots = 2

[[model]]
id = "nano"
price = 0.10
"""

NVIDIA_SMI_SHIM = """#!/bin/sh
# A stand-in for a working NVIDIA driver (no GPU here): what the real one prints for this query.
echo "NVIDIA H200, 143771 MiB, 570.86.15"
"""


@pytest.fixture(scope="module")
def base_image() -> str:
    image = ensure_base_image()
    start_image_builds(wanted_images)  # for tests/test_docker_host.py, next: they build while these tests run
    return image


@pytest.fixture
def source(tmp_path: Path) -> Path:
    """A writable copy of the checkout (pip builds in the source folder)."""
    dest = tmp_path / "src"
    shutil.copytree(REPO, dest, ignore=shutil.ignore_patterns(".git", ".venv", "__pycache__", ".hypothesis", ".pytest_cache",
                                                              "build", "*.egg-info", "bench"))
    return dest


class Root:
    """A throwaway Debian root: a container of the base image, steered with docker exec."""

    def __init__(self, name: str) -> None:
        self.name = name

    async def sh(self, command: str, *, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess[bytes]:
        return await adocker("exec", self.name, "bash", "-c", command, timeout=timeout, check=check)

    async def text(self, command: str, **kw) -> str:
        return (await self.sh(command, **kw)).stdout.decode()

    async def wait_for_line(self, path: str, needle: str, timeout: float) -> str:
        """The first line of a file in the container that contains ``needle``, as it is written."""
        tail = await trio.lowlevel.open_process(["docker", "exec", self.name, "tail", "-n", "+1", "-F", path],
                                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        lines = Lines(path)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(lines.pump, tail.stdout)
                line = await lines.wait_for(needle, timeout=timeout)
                nursery.cancel_scope.cancel()
        finally:
            tail.kill()
            await tail.wait()
        return line

    async def write(self, path: str, text: str) -> None:
        """A root-only file in the container (outside /src, whose every file counts in the installed source's hash)."""
        await self.sh(f"umask 077 && echo {base64.b64encode(text.encode()).decode()} | base64 -d >{path}")

    async def install(self, args: str, *, timeout: float = 600) -> tuple[int, str]:
        out = await self.sh(f"/src/scripts/install-host.sh {args} 2>&1", timeout=timeout, check=False)
        return out.returncode, out.stdout.decode()


@asynccontextmanager
async def throwaway_root(image: str, source: Path, *, systemd: bool = True, caches: bool = False) -> AsyncIterator[Root]:
    name = f"gpunexus-install-{uuid.uuid4().hex[:8]}"
    mounts = ["-v", f"{source}:/src"]
    if caches:
        for volume, path in CACHES.items():
            mounts += ["-v", f"{volume}:{path}"]
    # tini as PID 1 reaps what the systemctl stand-in's services leave (sleep would keep zombies).
    await adocker("run", "-d", "--rm", "--name", name, "--network", "host", *mounts, image, "tini", "--", "sleep", "infinity")
    root = Root(name)
    try:
        if systemd:
            shims = source / ".test-shims"
            shims.mkdir(exist_ok=True)
            (shims / "systemctl").write_text(SYSTEMCTL_SHIM)
            await root.sh("install -m 755 /src/.test-shims/systemctl /usr/local/bin/systemctl && mkdir -p /run/systemd/system"
                          " && : >/var/log/systemctl.calls")
        yield root
    finally:
        with trio.CancelScope(shield=True):
            await adocker("rm", "-f", "-v", name, check=False)  # -v: and its anonymous volumes


def test_scripts_are_shellcheck_clean() -> None:
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed (.ci/run installs Debian's)")
    out = subprocess.run(["shellcheck", str(SCRIPT), str(REPO / "docker" / "make-base.sh")], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout


async def test_dry_run_prints_every_step_and_changes_nothing(base_image: str, source: Path) -> None:
    with trio.fail_after(120):
        async with throwaway_root(base_image, source) as root:
            (source / ".test-shims" / "nvidia-smi").write_text(NVIDIA_SMI_SHIM)
            await root.sh("install -m 755 /src/.test-shims/nvidia-smi /usr/local/bin/nvidia-smi")
            changed = "find / -xdev -newer /etc/hostname -not -path '/run/*' -not -path /var/log/systemctl.calls | sort"
            before = await root.text(changed)
            rc, out = await root.install("--dry-run --require-gpu --source /src --model tiny --price 0.25 "
                                         "--hub http://127.0.0.1:9 --api-key gnx_secret_key")
            assert rc == 0, out
            for step in ("==> system", "==> GPU", "==> packages", "==> user gpunexus", "==> gpunexus in /opt/gpunexus/venv",
                         "==> check: tiny", "==> hub and /etc/gpunexus/host.env", "==> control command", "==> service gpunexus-host.service"):
                assert step in out, f"{step!r} missing:\n{out}"
            assert "NVIDIA driver found: NVIDIA H200, 143771 MiB" in out
            assert "would install python3-dev gcc libc6-dev libgmp-dev" in out  # what the base lacks
            assert "would create system user gpunexus" in out and "would install gpunexus from /src" in out
            assert "would register this host's peer id with http://127.0.0.1:9" in out
            assert "GPUNEXUS_API_KEY=<api key>" in out and "gnx_secret_key" not in out, "a dry run shows no key"
            assert "ExecStart=/opt/gpunexus/venv/bin/gpunexus node serve --model tiny --backend reference --price 0.25" in out
            assert "would start gpunexus-host.service" in out and "dry run: " in out.splitlines()[-1]
            rc, out = await root.install("--dry-run --docker --source /src")  # the image instead of a venv
            assert rc == 0, out
            assert "would install docker.io" in out
            assert "would build gpunexus-host:latest: docker build --force-rm -f /src/docker/host.Dockerfile" in out
            assert ("ExecStart=/usr/bin/docker run --rm --network host --read-only --tmpfs /tmp --cap-drop ALL --security-opt "
                    "no-new-privileges -v gpunexus-host:/var/lib/gpunexus --name gpunexus-host") in out
            assert "ExecStop=/usr/bin/docker stop -t 600 gpunexus-host" in out and "SupplementaryGroups=docker" in out
            assert await root.text(changed) == before, "a dry run wrote files"
            assert (await root.sh("id gpunexus", check=False)).returncode != 0
            calls = await root.text("cat /var/log/systemctl.calls 2>/dev/null || true")
            assert all(line.split()[0] in ("is-enabled", "is-active") for line in calls.splitlines()), calls


async def test_dry_run_of_several_models_and_of_a_config_file(base_image: str, source: Path) -> None:
    with trio.fail_after(120):
        async with throwaway_root(base_image, source) as root:
            rc, out = await root.install("--dry-run --source /src --model tiny --model nano --price 0.25")
            assert rc == 0, out
            assert "==> check: tiny, nano on the reference backend" in out
            assert "would run: gpunexus node check --model tiny --model nano --backend reference" in out
            assert "Description=gpunexus host: tiny, nano on the reference backend" in out
            assert ("ExecStart=/opt/gpunexus/venv/bin/gpunexus node serve --model tiny --model nano --backend reference "
                    "--price 0.25 --listen /ip4/0.0.0.0/tcp/4001") in out, out
            assert "host.toml" not in out

            await root.write("/root/host.toml", HOST_TOML + 'upstream_key = "sk-upstream-secret"\n')
            rc, out = await root.install("--dry-run --source /src --config /root/host.toml")
            assert rc == 0, out
            assert "==> check: the models of /etc/gpunexus/host.toml (tiny, nano) on the reference backend" in out
            assert "would run: gpunexus node check --backend reference --config <(cat /root/host.toml)" in out
            assert "would write /etc/gpunexus/host.toml (mode 640, gpunexus:gpunexus):" in out
            assert "Description=gpunexus host: the models of /etc/gpunexus/host.toml on the reference backend" in out
            assert '| id = "nano"' in out and "| upstream_key = <upstream key>" in out and "sk-upstream-secret" not in out
            assert ("ExecStart=/opt/gpunexus/venv/bin/gpunexus node serve --config /etc/gpunexus/host.toml --backend reference "
                    "--price 0.20 --listen /ip4/0.0.0.0/tcp/4001") in out, out
            assert "--model" not in next(line for line in out.splitlines() if line.lstrip("| ").startswith("ExecStart="))


async def test_refuses_a_bad_config_and_changes_nothing(base_image: str, source: Path) -> None:
    with trio.fail_after(120):
        async with throwaway_root(base_image, source) as root:
            changed = "find / -xdev -newer /etc/hostname -not -path '/run/*' -not -path /var/log/systemctl.calls | sort"
            before = await root.text(changed)
            (source / "bad.toml").write_text('[[model]\nid = "tiny"\n')
            (source / "noid.toml").write_text('[[model]]\nprice = 0.25\n')
            (source / "settings.toml").write_text('listen = "/ip4/0.0.0.0/tcp/4001"\n[[model]]\nid = "tiny"\n')
            (source / "good.toml").write_text(HOST_TOML)
            for args, error in (
                ("--config /src/bad.toml", "--config /src/bad.toml is not valid TOML: Expected ']]' at the end of an array declaration"),
                ("--config /src/noid.toml", "--config /src/noid.toml: [[model]] #1 has no id"),
                ("--config /src/settings.toml", "--config /src/settings.toml: the file holds [[model]] tables only"),
                ("--config /src/missing.toml", "--config /src/missing.toml: no such readable file"),
                ("--config /src/good.toml --model tiny", "--config and --model both name models"),
                ("--config /src/good.toml --docker", "--config is not supported with --docker yet"),
                ("--model tiny --model nano --model-dir /models/x", "but --model is given 2 times: use --config host.toml"),
            ):
                for dry in ("--dry-run ", ""):  # as root, for real: refused before the first step
                    rc, out = await root.install(f"{dry}--source /src {args}")
                    assert rc == 1 and error in out and "==> system" not in out, f"{args}:\n{out}"
            assert await root.text(changed) == before, "a refused run wrote files"
            assert (await root.sh("id gpunexus", check=False)).returncode != 0


async def test_refuses_unsupported_systems_clearly(base_image: str, source: Path) -> None:
    with trio.fail_after(120):
        async with throwaway_root(base_image, source) as root:
            rc, out = await root.install("--require-gpu")
            assert rc == 1 and "no working NVIDIA driver (nvidia-smi) and --require-gpu was given" in out
            rc, out = await root.install("--backend exllamav2 --model-dir /models/x")
            assert rc == 1 and "--backend exllamav2 needs an NVIDIA GPU" in out
            await root.sh("printf '#!/bin/sh\\n/bin/uname \"$@\" | sed -e s/x86_64/armv7l/ -e s/aarch64/armv7l/\\n' >/usr/local/bin/uname"
                          " && chmod 755 /usr/local/bin/uname")
            rc, out = await root.install("--dry-run")
            assert rc == 1 and "unsupported architecture: armv7l" in out, out
            await root.sh("rm /usr/local/bin/uname && rmdir /run/systemd/system")
            rc, out = await root.install("--dry-run")
            assert rc == 1 and "systemd is not running here" in out, out
            await root.sh("printf 'ID=fedora\\nPRETTY_NAME=\"Fedora Linux 40\"\\n' >/etc/os-release")
            rc, out = await root.install("--dry-run")
            assert rc == 1 and "unsupported system: Fedora Linux 40; this script supports Debian and Ubuntu" in out, out
            assert (await root.sh("test -e /opt/gpunexus || test -e /etc/gpunexus", check=False)).returncode != 0


@asynccontextmanager
async def running_hub(home: Path) -> AsyncIterator[tuple[str, str]]:
    """A real `gpunexus hub serve` on loopback and a host account's key on it."""
    env = {**os.environ, "GPUNEXUS_HOME": str(home)}
    add = await trio.run_process([sys.executable, "-m", "gpunexus", "hub", "user", "add", "gpu@example.com", "--role", "host"],
                                 capture_stdout=True, capture_stderr=True, env=env)
    key = add.stdout.decode().strip().splitlines()[-1]
    process = await trio.lowlevel.open_process([sys.executable, "-m", "gpunexus", "hub", "serve", "--port", "0"],
                                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env)
    out = Lines("hub serve")
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(out.pump, process.stdout)
            url = (await out.wait_for(" listening on ", timeout=60)).split(" listening on ")[1].split()[0]
            yield url, key
            nursery.cancel_scope.cancel()
    finally:
        if process.returncode is None:
            process.terminate()  # the hub drains on SIGTERM
        with trio.CancelScope(shield=True), trio.move_on_after(30):
            await process.wait()
        if process.returncode is None:
            process.kill()


async def test_installs_for_real_and_a_second_run_changes_nothing(base_image: str, source: Path, tmp_path: Path) -> None:
    with trio.fail_after(900):
        async with running_hub(tmp_path / "hub") as (hub_url, host_key), throwaway_root(base_image, source, caches=True) as root:
            args = f"--model tiny --price 0.25 --listen /ip4/127.0.0.1/tcp/0 --hub {hub_url} --api-key {host_key}"
            rc, first = await root.install(args)
            assert rc == 0, first
            assert "WARNING: no NVIDIA driver (nvidia-smi): CPU mode, the reference backend" in first
            assert "PASS: this machine can serve the model" in first
            assert "registered host 12D3KooW" in first and "done: " in first.splitlines()[-1]
            peer_id = first.split("registered host ")[1].split()[0]

            unit = await root.text("cat /etc/systemd/system/gpunexus-host.service")
            for line in ("User=gpunexus", "EnvironmentFile=/etc/gpunexus/host.env", "Restart=on-failure", "KillSignal=SIGTERM",
                         "TimeoutStopSec=630", "WantedBy=multi-user.target",
                         "ExecStart=/opt/gpunexus/venv/bin/gpunexus node serve --model tiny --backend reference --price 0.25 "
                         "--listen /ip4/127.0.0.1/tcp/0 --hub ${GPUNEXUS_HUB}"):
                assert line in unit.splitlines(), f"{line!r} not in the unit:\n{unit}"
            assert host_key not in unit, "the key stays in the env file"
            assert (await root.text("stat -c '%a %U:%G' /etc/gpunexus/host.env")).strip() == "600 root:root"
            env_file = await root.text("cat /etc/gpunexus/host.env")
            assert f"GPUNEXUS_API_KEY={host_key}" in env_file and f"GPUNEXUS_HUB={hub_url}" in env_file
            assert (await root.text("stat -c '%a %U' /var/lib/gpunexus")).strip() == "700 gpunexus"

            # The service runs (started by the systemctl stand-in as the unit says) and is steered by gpunexus-host.
            await root.wait_for_line("/var/log/gpunexus-host.service.log", "peer: ", timeout=90)
            status = await root.text("gpunexus-host status")
            assert f"host {peer_id}: enabled" in status and "earnings" in status, status
            assert peer_id in registered_hosts(tmp_path / "hub"), "the hub knows the installed host's peer id"

            stamp = "find /etc/gpunexus /etc/systemd/system /opt/gpunexus/installed-from /usr/local/bin/gpunexus-host -printf '%p %T@ %m\\n' | sort"
            files_before = await root.text(stamp)
            await root.sh(": >/var/log/systemctl.calls")
            rc, second = await root.install(args)
            assert rc == 0, second
            assert second.splitlines()[-1] == "nothing to change: every step was already done", second
            assert "would" not in second and "wrote" not in second
            for step in ("installed: ca-certificates python3", "system user gpunexus exists", "virtual environment /opt/gpunexus/venv exists",
                         "installed from /src", "registered with", "/etc/gpunexus/host.env is up to date",
                         "/usr/local/bin/gpunexus-host is up to date", "gpunexus-host.service is up to date",
                         "gpunexus-host.service is enabled at boot", "gpunexus-host.service is running"):
                assert f"already: {step}" in second or step in second, f"{step!r} missing:\n{second}"
            assert await root.text(stamp) == files_before, "the second run touched files"
            calls = (await root.text("cat /var/log/systemctl.calls")).split()
            assert {"start", "restart", "enable", "daemon-reload"}.isdisjoint(calls), calls

            # The same host, now serving two models from a config file: the file and the unit change, the service restarts.
            await root.write("/root/host.toml", HOST_TOML)  # root's alone: the check reads it through a pipe
            config_args = f"--config /root/host.toml --listen /ip4/127.0.0.1/tcp/0 --hub {hub_url} --api-key {host_key}"
            await root.sh(": >/var/log/systemctl.calls && : >/var/log/gpunexus-host.service.log")
            rc, out = await root.install(config_args)
            assert rc == 0, out
            assert "PASS" in out and "wrote /etc/gpunexus/host.toml (mode 640, gpunexus:gpunexus)" in out, out
            assert (await root.text("stat -c '%a %U:%G' /etc/gpunexus/host.toml")).strip() == "640 gpunexus:gpunexus"
            assert await root.text("cat /etc/gpunexus/host.toml") == HOST_TOML
            unit = await root.text("cat /etc/systemd/system/gpunexus-host.service")
            assert ("ExecStart=/opt/gpunexus/venv/bin/gpunexus node serve --config /etc/gpunexus/host.toml --backend reference "
                    "--price 0.20 --listen /ip4/127.0.0.1/tcp/0 --hub ${GPUNEXUS_HUB}") in unit.splitlines(), unit
            assert "restart" in (await root.text("cat /var/log/systemctl.calls")).split()
            await root.wait_for_line("/var/log/gpunexus-host.service.log", "peer: ", timeout=90)
            status = await root.text("gpunexus-host status")
            assert f"host {peer_id}: enabled" in status and "models       2, 2 taking orders" in status, status
            served = {line.split()[0]: line for line in status.splitlines() if line.startswith("    ")}
            assert "0.250000 USD/Mtok" in served["tiny"] and "0.100000 USD/Mtok" in served["nano"], status  # each its own price

            files_before = await root.text(stamp)
            await root.sh(": >/var/log/systemctl.calls")
            rc, out = await root.install(config_args)
            assert rc == 0 and out.splitlines()[-1] == "nothing to change: every step was already done", out
            assert "already: /etc/gpunexus/host.toml is up to date" in out
            assert await root.text(stamp) == files_before, "the second run with the same config touched files"

            # A config the check refuses (a key that does not exist) changes nothing, even with --skip-check.
            await root.write("/root/host.toml", HOST_TOML + "slot = 3\n")
            rc, out = await root.install(config_args + " --skip-check")
            assert rc == 1 and "unknown key(s) slot" in out and "refused the models as given" in out, out
            assert await root.text(stamp) == files_before, "a refused config touched files"
            assert {"start", "restart"}.isdisjoint((await root.text("cat /var/log/systemctl.calls")).split())

            # Back to --model flags, two of them: the unit names both, the file it no longer reads goes.
            await root.sh(": >/var/log/gpunexus-host.service.log")
            rc, out = await root.install(f"--model tiny --model nano --price 0.25 --listen /ip4/127.0.0.1/tcp/0 --hub {hub_url} --api-key {host_key}")
            assert rc == 0 and "remove /etc/gpunexus/host.toml" in out, out
            unit = await root.text("cat /etc/systemd/system/gpunexus-host.service")
            assert ("ExecStart=/opt/gpunexus/venv/bin/gpunexus node serve --model tiny --model nano --backend reference --price 0.25 "
                    "--listen /ip4/127.0.0.1/tcp/0 --hub ${GPUNEXUS_HUB}") in unit.splitlines(), unit
            assert (await root.sh("test -e /etc/gpunexus/host.toml", check=False)).returncode != 0
            await root.wait_for_line("/var/log/gpunexus-host.service.log", "peer: ", timeout=90)
            status = await root.text("gpunexus-host status")
            assert "models       2, 2 taking orders" in status, status

            # systemctl stop sends SIGTERM: the host drains and exits cleanly.
            await root.sh("systemctl stop gpunexus-host.service", timeout=60)
            log = await root.text("cat /var/log/gpunexus-host.service.log")
            assert "SIGTERM: draining 0 request(s) in flight" in log and "stopped: 0 requests served, 0 cut off" in log, log


def registered_hosts(home: Path) -> set[str]:
    """The peer ids registered in the hub's SQLite database (opened read-only)."""
    (db,) = home.glob("hub/*.db")
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return {row[0] for row in conn.execute("SELECT peer_id FROM hosts")}
    finally:
        conn.close()
