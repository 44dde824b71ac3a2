"""The operator's side of the dashboard on the command line: ``hub user password`` and ``hub serve``'s dashboard line."""

from __future__ import annotations

import argparse
import io

import pytest
from gpunexus.hub import cli as hub_cli
from gpunexus.hub.app import create_app
from gpunexus.hub.service import Hub
from web_support import PASSWORD, Visitor


def run(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="gpunexus")
    hub_cli.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("GPUNEXUS_HOME", str(tmp_path))
    return tmp_path


async def test_an_admin_made_on_the_command_line_logs_in_with_the_password_set_there(home, monkeypatch, capsys):
    assert run("hub", "user", "add", "ops@example.com", "--role", "admin") == 0
    monkeypatch.setattr("sys.stdin", io.StringIO("short\n"))
    assert run("hub", "user", "password", "ops@example.com") == 1
    assert "at least 10 characters" in capsys.readouterr().err
    monkeypatch.setattr("sys.stdin", io.StringIO(PASSWORD + "\n"))
    assert run("hub", "user", "password", "ops@example.com") == 0
    monkeypatch.setattr("sys.stdin", io.StringIO(PASSWORD + "\n"))
    assert run("hub", "user", "password", "nobody@example.com") == 1
    v = Visitor(create_app(Hub.open(str(home))))
    assert (await v.log_in("ops@example.com")).status == 303
    page = await v.get("/admin")
    assert page.status == 200 and page.has("Conservation holds")
