"""Start-up mistakes and pipes: one line that says what is wrong, never a traceback."""

from __future__ import annotations

import logging
import os
import socket
import subprocess

import pytest

from gpunexus.node.quietlog import QuietLog

from test_cli import GPUNEXUS, home, run  # noqa: F401  (home is a fixture)


@pytest.mark.parametrize("args, flag, says", [
    (("node", "gateway", "--listen", "garbage"), "--listen", "not a multiaddr: 'garbage'"),
    (("node", "serve", "--model", "tiny", "--listen", "/ip4/1.2.3.4/tcp/x"), "--listen", "not a multiaddr"),
    (("node", "gateway", "--port", "99999"), "--port", "out of range (0-65535"),
    (("node", "gateway", "--bootstrap", "notamultiaddr"), "--bootstrap", "not a multiaddr: 'notamultiaddr'"),
    (("node", "gateway", "--bootstrap", "/ip4/127.0.0.1/tcp/4001"), "--bootstrap", "names no peer"),
    (("node", "check", "--bootstrap", "nonsense"), "--bootstrap", "not a multiaddr"),
    (("hub", "serve", "--port", "http"), "--port", "not a port number: 'http'"),
])
def test_a_bad_address_is_refused_by_the_parser_in_one_line(home, args, flag, says):
    out = run(*args, env=home)
    assert out.returncode == 2
    last = out.stderr.strip().splitlines()[-1]
    assert f"error: argument {flag}: " in last and says in last
    assert "Traceback" not in out.stderr


@pytest.fixture
def taken_port():
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        yield holder.getsockname()[1]


@pytest.mark.parametrize("command", ["gateway", "hub", "host", "host-metrics"])
def test_a_port_in_use_is_one_line_and_exit_1(home, taken_port, command):
    args = {
        "gateway": ("node", "gateway", "--port", str(taken_port)),
        "hub": ("hub", "serve", "--port", str(taken_port)),
        "host": ("node", "serve", "--model", "tiny", "--listen", f"/ip4/127.0.0.1/tcp/{taken_port}"),
        "host-metrics": ("node", "serve", "--model", "tiny", "--listen", "/ip4/127.0.0.1/tcp/0", "--metrics-port", str(taken_port)),
    }[command]
    out = run(*args, env=home)
    assert out.returncode == 1
    assert out.stderr.strip().splitlines() == [out.stderr.strip()], out.stderr
    assert f"cannot listen on 127.0.0.1:{taken_port}" in out.stderr and "Address already in use" in out.stderr


def test_an_unassignable_listen_address_is_one_line(home):
    out = run("node", "serve", "--model", "tiny", "--listen", "/ip4/192.0.2.1/tcp/4001", env=home)
    assert out.returncode == 1 and len(out.stderr.strip().splitlines()) == 1
    assert "cannot listen on 192.0.2.1:4001" in out.stderr and "Cannot assign requested address" in out.stderr


def test_a_reader_that_leaves_early_is_no_error(home):
    """``gpunexus ... | head``: the reader closes the pipe before the command writes."""
    proc = subprocess.Popen([*GPUNEXUS, "node", "check", "--model", "tiny"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=home)
    proc.stdout.close()
    _, err = proc.communicate(timeout=60)
    assert b"BrokenPipeError" not in err and b"Traceback" not in err


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_repeating_condition_is_logged_once_per_window_with_its_count(caplog):
    clock = _Clock()
    quiet = QuietLog(logging.getLogger("gpunexus.test.quiet"), window_s=300, clock=clock)
    with caplog.at_level(logging.INFO, logger="gpunexus.test.quiet"):
        for i in range(100):  # a renewal failing every 3 s for 5 minutes
            quiet.warning("renewal", "allowance renewal failed: %s", f"attempt {i}")
            clock.now += 3
        quiet.warning("renewal", "allowance renewal failed: %s", "attempt 100")
        quiet.warning("other", "another condition")
        quiet.resolved("renewal", "allowance renewed again")
        quiet.resolved("renewal", "allowance renewed again")  # already over: nothing more
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        "allowance renewal failed: attempt 0",
        "allowance renewal failed: attempt 100 (and 99 more like this in the last 300 s)",
        "another condition",
        "allowance renewed again",
    ]
