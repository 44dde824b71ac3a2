"""The hub's OpenAPI document: valid OpenAPI 3.1, and true of a live hub (schemathesis).

The hub runs for real: SQLite in ``tmp_path``, hypercorn's trio worker on
loopback in a thread of its own (schemathesis is synchronous), Stripe billing
answered by :class:`FakeStripe`, and a real API key of an admin user made
through the hub's service layer (admin: host and client routes both get past
their role checks), with 1,000 USD of credits.

Every built-in check is on (not_a_server_error, status code, content type,
response schema and header conformance, positive and negative data,
missing_required_header, ignored_auth, unsupported_method with its Allow
header, ...). Two expectations are widened, each for a reason the schema
cannot carry:

* ``positive_data_acceptance`` also accepts 400 where a schema-valid value must
  also be a real signature, signed protocol message or Ed25519 key (random
  base58 of the right pattern is a valid peer id only about a third of the
  time), and where the Stripe signature header fails;
* ``negative_data_rejection`` also accepts 413, the documented answer to a
  receipt batch over ``max_batch`` items.
"""

from __future__ import annotations

import queue
import threading
from collections import Counter
from collections.abc import Iterator

import httpx
import pytest
import schemathesis
import trio
from gpunexus.hub import keys
from gpunexus.hub.app import create_app, serve
from gpunexus.hub.config import HubConfig
from gpunexus.hub.openapi import spec
from gpunexus.hub.ratelimit import RateLimiter
from gpunexus.hub.service import Hub
from gpunexus.hub.stripe_billing import StripeBilling
from gpunexus.protocol.signing import Signer
from openapi_spec_validator import validate
from schemathesis import engine
from schemathesis.engine import events
from test_hub_stripe import SECRET, FakeStripe
from test_hub_support import fresh_db

MAX_EXAMPLES = 25
"""Per operation and phase; the whole run stays around ten seconds."""
SIGNED = ["/v1/allowances", "/v1/hosts/register", "/v1/offers", "/v1/offers/withdraw", "/v1/audits/roots", "/v1/audits/openings", "/v1/audits/results",
          "/v1/stripe/webhook"]
"""Operations whose valid bodies must also carry real keys or signatures (see the module docstring)."""


class LiveHub:
    """A hub served on an ephemeral loopback port by a trio loop in a thread."""

    def __init__(self, tmp_dir) -> None:
        db = fresh_db("sqlite", tmp_dir)
        # Long polls bounded well under schemathesis's request timeout.
        self.hub = Hub(db, Signer.generate(), HubConfig(max_long_poll_s=0.2))
        billing = StripeBilling.attach(self.hub, "sk_test_fake", SECRET, public_url="https://hub.example",
                                       http_client=FakeStripe())
        _, self.key = db.write_sync(keys.add_user, "fuzz@example.com", "admin")
        self.hub.grant_sync("fuzz@example.com", 1_000_000_000, "fuzz")
        self.app = create_app(self.hub, limiter=RateLimiter(1e9, 10**9), billing=billing)
        self._started: queue.Queue[tuple[str, trio.lowlevel.TrioToken, trio.Event]] = queue.Queue()
        self._thread = threading.Thread(target=trio.run, args=(self._main,), daemon=True)

    async def _main(self) -> None:
        stop = trio.Event()
        async with trio.open_nursery() as nursery:
            binds = await nursery.start(lambda task_status: serve(
                self.hub, self.app, port=0, shutdown_trigger=stop.wait, task_status=task_status))
            self._started.put((binds[0], trio.lowlevel.current_trio_token(), stop))

    def __enter__(self) -> LiveHub:
        self._thread.start()
        self.url, self._token, self._stop = self._started.get(timeout=30)
        return self

    def __exit__(self, *_exc: object) -> None:
        trio.from_thread.run_sync(self._stop.set, trio_token=self._token)
        self._thread.join(timeout=30)
        self.hub.db.dispose()


@pytest.fixture(scope="module")
def live_hub(tmp_path_factory) -> Iterator[LiveHub]:
    with LiveHub(tmp_path_factory.mktemp("hub")) as hub:
        yield hub


def _config(key: str) -> schemathesis.Config:
    accepted = ["2xx", "3xx", "401", "403", "404", "409", "429", "5xx"]  # schemathesis' default for valid data
    rejected = ["400", "401", "403", "404", "405", "406", "409", "415", "422", "428", "429", "5xx"]  # ... invalid data
    return schemathesis.Config.from_dict({
        "headers": {"Authorization": f"Bearer {key}"},
        "generation": {"max-examples": MAX_EXAMPLES, "mode": "all", "deterministic": True},
        "phases": {"stateful": {"enabled": False}},
        "checks": {"enabled": True,
                   "negative_data_rejection": {"expected-statuses": [*rejected, "413"]}},
        "request-timeout": 20,
        "operations": [{"include-path": path, "checks": {"positive_data_acceptance": {"expected-statuses": [*accepted, "400"]}}}
                       for path in SIGNED],
    })


def _run(schema: schemathesis.schemas.BaseSchema) -> tuple[Counter[str], list[str], list[str]]:
    """Every phase but stateful: (examples per operation, failures, engine errors)."""
    examples: Counter[str] = Counter()
    failures: list[str] = []
    errors: list[str] = []
    for event in engine.from_schema(schema).execute():
        if isinstance(event, events.ScenarioFinished):
            recorder = event.recorder
            examples[recorder.label] += len(recorder.cases)
            failures += [f"{event.phase.value} {recorder.label} {check.name}: "
                         f"{check.failure_info.failure if check.failure_info else '?'}"
                         for checks in recorder.checks.values() for check in checks
                         if check.status == engine.Status.FAILURE]
        elif isinstance(event, (events.NonFatalError, events.FatalError)):
            errors.append(repr(getattr(event, "value", None) or getattr(event, "exception", None)))
    return examples, failures, errors


def test_the_document_is_valid_openapi_3_1():
    validate(spec(1000))


def test_the_served_document_with_stripe_is_valid(live_hub):
    validate(httpx.get(f"{live_hub.url}/openapi.json").json())


def test_the_live_hub_keeps_its_documented_contract(live_hub: LiveHub, capsys) -> None:
    doc = httpx.get(f"{live_hub.url}/openapi.json").json()
    schema = schemathesis.openapi.from_url(f"{live_hub.url}/openapi.json", config=_config(live_hub.key))
    examples, failures, errors = _run(schema)
    with capsys.disabled():
        print(f"\nschemathesis: {len(examples)} operations, {sum(examples.values())} examples, {len(failures)} failures")
    assert errors == []
    assert failures == [], "\n".join(failures[:20])
    assert set(examples) == {f"{m.upper()} {p}" for p, ops in doc["paths"].items() for m in ops}
    assert all(n > 1 for n in examples.values()), examples
