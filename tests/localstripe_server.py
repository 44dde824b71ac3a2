"""Run localstripe for one test: on a loopback port of its own, its objects in memory only.

``python tests/localstripe_server.py`` prints the port it listens on, then
serves localstripe's own aiohttp app. It is not ``localstripe --port N``
for three reasons, each a place where that command differs from what a
test may do or from what Stripe does:

* ``localstripe`` binds ``::`` (every interface, IPv4 and IPv6); tests reach
  nothing beyond loopback, so this binds 127.0.0.1 only, on a port the
  kernel picks (printed first, so no free-port race).
* localstripe pickles its whole store to the fixed path
  ``/tmp/localstripe.pickle`` after every write (and the command loads it
  back unless ``--from-scratch``): tests running side by side would share
  and overwrite it. Here the store stays in this process's memory.
* localstripe's PaymentIntents lack ``amount_received``, which Stripe
  always sends (the amount captured; 0 until the payment succeeds) and the
  hub credits from. It is added as Stripe defines it, so it is also in the
  webhook events' copies of the PaymentIntent.

Webhook deliveries are logged by localstripe itself (``webhook "TYPE"
successfully delivered`` or ``... failed ...``) to stdout, one line each,
for the tests to wait on.
"""

from __future__ import annotations

import logging
import socket
import sys

from aiohttp import web
from localstripe import resources, server


def _amount_received(intent: resources.PaymentIntent) -> int:
    return intent.amount if intent.status == "succeeded" else 0


def main() -> None:
    resources.Store.dump_to_disk = lambda self: None
    resources.PaymentIntent.amount_received = property(_amount_received)
    deliveries = logging.getLogger("aiohttp.access")
    deliveries.setLevel(logging.INFO)
    deliveries.addHandler(logging.StreamHandler(sys.stdout))
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    print(sock.getsockname()[1], flush=True)
    web.run_app(server.app, sock=sock, access_log=None, print=None, handle_signals=True)


if __name__ == "__main__":
    main()
