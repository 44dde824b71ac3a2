"""The scripts in examples/ run as a user copies them: real processes, real SDK."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"


def test_chat_example_streams_through_the_demo():
    demo = subprocess.Popen([sys.executable, "-m", "gpunexus", "demo", "--port", "0"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        shown = {}
        while "api_key" not in shown:
            line = demo.stdout.readline()
            assert line, "the demo exited before printing its API key"
            if ":" in line:
                name, value = line.split(":", 1)
                shown[name.strip()] = value.strip()
        out = subprocess.run([sys.executable, str(EXAMPLES / "chat.py"), "--base-url", shown["base_url"], "--api-key", shown["api_key"], "--max-tokens", "8"], capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        assert "model: tiny" in out.stdout
        assert "completion tokens" in out.stdout and " 0 completion" not in out.stdout
        assert "finish_reason" in out.stdout
    finally:
        demo.terminate()
        demo.wait(timeout=30)


def test_two_peers_example_answers_a_completion():
    env = dict(os.environ, PATH=f"{pathlib.Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    out = subprocess.run(["bash", str(EXAMPLES / "two_peers.sh")], capture_output=True, text=True, timeout=180, env=env)
    assert out.returncode == 0, out.stderr
    assert "host:    /ip4/127.0.0.1/tcp/" in out.stdout and "/p2p/12D3KooW" in out.stdout
    assert '"object":"chat.completion"' in out.stdout.replace(" ", "")
