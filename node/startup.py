"""Start-up mistakes told in one line.

An operator who types ``--listen garbage``, ``--port 99999`` or a port that is
already taken should read what is wrong, not a hundred lines of nested
traceback groups from inside hypercorn or py-libp2p. The argument types below
make argparse refuse bad values before anything starts (its usual
``error: argument --listen: ...`` line), and the bind checks turn an address
that cannot be taken into one line on stderr and exit status 1, before
trio starts (``SystemExit`` raised there needs no unwrapping). The port and
bind checks themselves live in :mod:`gpunexus.usage`, shared with the hub.
"""

from __future__ import annotations

import argparse

import httpx
import multiaddr
from multiaddr.exceptions import Error as MultiaddrError

from gpunexus.usage import check_bindable, usage_error

HUB_PROBE_TIMEOUT_S = 5.0


def multiaddr_arg(text: str) -> str:
    """An argparse type: any parseable libp2p multiaddr (``/ip4/0.0.0.0/tcp/4001``)."""
    try:
        multiaddr.Multiaddr(text)
    except (MultiaddrError, ValueError) as exc:
        raise argparse.ArgumentTypeError(f"not a multiaddr: {text!r} ({_reason(exc)}); e.g. /ip4/0.0.0.0/tcp/4001") from None
    return text


def peer_multiaddr_arg(text: str) -> str:
    """An argparse type: a dialable peer address, which must end in ``/p2p/<peer id>``."""
    multiaddr_arg(text)
    if "/p2p/" not in text:
        raise argparse.ArgumentTypeError(f"{text!r} names no peer: copy a host's whole 'peer:' line, ending in /p2p/<peer id>")
    return text


def hub_url_arg(text: str) -> str:
    """An argparse type: the hub's base URL, ``http(s)://host[:port]``, without a trailing slash."""
    try:
        url = httpx.URL(text)
    except (httpx.InvalidURL, TypeError):
        url = None
    if url is None or url.scheme not in ("http", "https") or not url.host:
        raise argparse.ArgumentTypeError(f"not an http:// or https:// URL with a host: {text!r}; e.g. http://127.0.0.1:8080")
    return text.rstrip("/")


def check_hub(url: str, api_key: str | None = None, *, timeout_s: float = HUB_PROBE_TIMEOUT_S) -> None:
    """Exit (status 2, one line) unless ``url`` answers as a gpunexus hub and, given a key, accepts it.

    Once running, a node rides out a hub that goes away (it retries and
    says so once); at start-up a hub that is not there is far more often a
    typo in ``--hub`` or a key pasted wrong, and is said at once.
    """
    with httpx.Client(base_url=url, timeout=timeout_s) as http:
        try:
            info = http.get("/v1/hub")
        except httpx.HTTPError as exc:
            raise usage_error(f"cannot reach the hub at {url} ({type(exc).__name__}: {exc}); check --hub, or start the hub first") from None
        if info.status_code != 200 or "hub_id" not in _json(info):
            raise usage_error(f"{url} does not answer as a gpunexus hub (GET /v1/hub: HTTP {info.status_code}); check --hub")
        if api_key:
            try:
                answer = http.get("/v1/balance", headers={"authorization": f"Bearer {api_key}"})
            except httpx.HTTPError as exc:
                raise usage_error(f"cannot reach the hub at {url} ({type(exc).__name__}: {exc})") from None
            if answer.status_code == 401:
                message = (_json(answer).get("error") or {}).get("message", "")
                raise usage_error(f"the hub at {url} refused --api-key: {message or 'HTTP 401'}")


def _json(response: httpx.Response) -> dict:
    try:
        body = response.json()
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}


def check_libp2p_listen(addrs: list[str]) -> None:
    """``check_bindable`` for each TCP listen multiaddr of a peer."""
    for text in addrs:
        addr = multiaddr.Multiaddr(text)
        protocols = {p.name for p in addr.protocols()}
        if "tcp" not in protocols:
            continue
        host = next((addr.value_for_protocol(p) for p in ("ip4", "ip6", "dns", "dns4", "dns6") if p in protocols), None)
        if host is not None:
            check_bindable(host, int(addr.value_for_protocol("tcp")), f"libp2p ({text})")


def _reason(exc: Exception) -> str:
    text = str(exc)
    # multiaddr repeats the whole address around its reason: keep the reason.
    if ": " in text:
        text = text.split(": ", 1)[1]
    return text.split(" (string:")[0]
