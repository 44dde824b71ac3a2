"""The scheduled challenger: ``gpunexus hub challenger --hub URL --api-key KEY``.

An operator-run gateway peer that sends every host of the swarm ordinary
orders on a timetable (:mod:`gpunexus.node.gateway.challenge_schedule`), paid by a
challenge account: an account the hub serves with ``--challenge-account``,
so that every receipt it pays is audited (``hub/honesty.py``). A host that
cheats is then caught even when no client ever sends it a request the
hub's random sample picks.

Indistinguishable from a client's orders, because they are a client's
orders: each challenge is a ``/v1/chat/completions`` body from
:mod:`gpunexus.verify.challenges` (the set the hand-run ``hub challenge``
uses), parsed by the gateway's own ``parse_request`` and run by the
gateway's own :class:`GatewayService` (same Order, same seed derivation,
same stream reuse, same receipt checks and countersignature, same
``HubSettlement`` with its audit openings). The one difference is aim: a
challenge must reach the host the timetable names, so the service sees the
offer book through :class:`AimedBook`, which, inside a challenge, shows only
that host. A failed host therefore gets no failover: its challenge fails
and says why.

Each run has a fresh peer identity (no long-lived gateway id for hosts to
learn); the receipt queue and the audit openings stay under
``$GPUNEXUS_HOME/node/challenger`` so a restart still settles and answers
what the last run left. node/ never imports hub/: this module meets the hub
over HTTP only; the ``hub challenger`` command (node/gateway/challenger_cli.py) is
filed under ``hub`` by ``gpunexus/cli.py``.
"""

from __future__ import annotations

import logging
import random
import signal
from collections import Counter
from contextlib import asynccontextmanager, contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import AsyncIterator, Iterator

import httpx
import trio

from gpunexus.protocol.errors import ProtocolError
from gpunexus.protocol.messages import Offer, Receipt
from gpunexus.verify.challenges import challenge_body

from ..hub_client import HubRefused, HubSettlement, HubUnavailable, _call
from ..net.offers import OfferBook
from ..net.p2p import P2PConfig, open_p2p
from ..runtime import HubLogin, follow_market, load_identity, node_home
from .challenge_schedule import ChallengeSchedule, Clock, TrioClock
from .openai_api import APIError, parse_request
from .service import Delta, GatewayConfig, GatewayService
from .settlement import Grant

log = logging.getLogger(__name__)

OPENING_RETENTION_S = 86_400.0
"""How long a challenge's request and output are kept for the hub's audit. Longer than a
gateway's hour: every challenge is audited, and a hub that was away must still get them all."""


@dataclass
class _Aim:
    """The challenge running in this task: its host, and the receipt it earned."""

    host: str
    receipts: list[Receipt] = field(default_factory=list)


_aim: ContextVar[_Aim | None] = ContextVar("gpunexus_challenge_aim", default=None)
"""Set for the duration of one challenge; trio gives each task its own copy, so
challenges running side by side each see their own host."""


@contextmanager
def aimed_at(host: str) -> Iterator[_Aim]:
    """Inside: this task's gateway orders can only go to ``host`` (see :class:`AimedBook`)."""
    aim = _Aim(host)
    token = _aim.set(aim)
    try:
        yield aim
    finally:
        _aim.reset(token)


class AimedBook:
    """The offer book as the challenger's gateway service sees it.

    Outside a challenge, the whole book; inside one, only the aimed host's
    offers, so ranking can only pick that host. Drops (a dead connection)
    go to the real book, as a gateway's would.
    """

    def __init__(self, book: OfferBook) -> None:
        self.book = book

    @property
    def changed(self) -> trio.Event:
        return self.book.changed

    def live(self) -> list[Offer]:
        return self._aimed(self.book.live())

    def for_model(self, model: str) -> list[Offer]:
        return self._aimed(self.book.for_model(model))

    def get(self, peer_id: str, model: str) -> Offer | None:
        aim = _aim.get()
        return None if aim is not None and aim.host != peer_id else self.book.get(peer_id, model)

    def models(self) -> dict[str, list[Offer]]:
        out: dict[str, list[Offer]] = {}
        for offer in self.live():
            out.setdefault(offer.model, []).append(offer)
        return out

    def drop_host(self, peer_id: str) -> None:
        self.book.drop_host(peer_id)

    @staticmethod
    def _aimed(offers: list[Offer]) -> list[Offer]:
        aim = _aim.get()
        return offers if aim is None else [o for o in offers if o.peer_id == aim.host]


class ChallengeSettlement(HubSettlement):
    """A gateway's hub settlement that also hands each receipt to the challenge that earned it."""

    def record(self, receipt: Receipt, grant: Grant | None = None) -> None:
        aim = _aim.get()
        if aim is not None:
            aim.receipts.append(receipt)
        super().record(receipt, grant)


@dataclass(frozen=True, slots=True)
class ChallengeOutcome:
    """What one challenge came to: ``served`` (a countersigned receipt, to be audited),
    ``unsigned`` (the host's receipt did not match what it sent: no pay, see the gateway's log)
    or ``failed`` (no answer: ``detail`` says why)."""

    host: str
    model: str
    status: str
    tokens: int = 0
    request_id: str = ""
    detail: str = ""

    def line(self) -> str:
        """The operator's progress line."""
        head = f"challenge host={self.host} model={self.model}"
        if self.status == "served":
            return f"{head} served {self.tokens} tokens, receipt {self.request_id} (audited once settled)"
        if self.status == "unsigned":
            return f"{head} receipt refused: it does not match the stream the host sent (not countersigned, not paid)"
        return f"{head} failed: {self.detail}"


async def _discard(delta: Delta) -> None:
    """A challenge reads its stream to the end like a client, and keeps none of it."""


class Challenger:
    """Runs the timetable: tracks the offer book's hosts and challenges each when due."""

    MAX_OUTCOMES = 1000
    RETRACK_S = 1.0
    """Shortest (real) time between two timetable passes woken by offer book changes."""

    def __init__(self, service: GatewayService, book: OfferBook, schedule: ChallengeSchedule, *, api_key: str,
                 rng: random.Random, clock: Clock | None = None, max_in_flight: int = 4) -> None:
        self.service = service
        self.book = book
        self.schedule = schedule
        self.api_key = api_key
        self.rng = rng
        self.clock = clock or TrioClock()
        self.limiter = trio.CapacityLimiter(max_in_flight)
        self.outcomes: list[ChallengeOutcome] = []
        """The latest outcomes, oldest first (at most ``MAX_OUTCOMES``)."""
        self.counts: Counter[str] = Counter()
        """Challenges finished per host, whatever their outcome."""
        self.finished = trio.Event()
        """Set (and replaced) each time a challenge finishes, for whoever waits on progress."""
        self._in_flight: set[str] = set()
        self._stopping = False
        self._timetable = trio.CancelScope()

    def stop(self) -> None:
        """Start no more challenges; those running finish (each under the gateway's own deadlines)."""
        self._stopping = True
        self._timetable.cancel()

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Follow the timetable until :meth:`stop` (then wait for the challenges running) or cancellation."""
        async with trio.open_nursery() as nursery:
            task_status.started()
            with self._timetable:
                while True:
                    now = self.clock.now()
                    self.schedule.track({o.peer_id for o in self.book.live()}, now)
                    for host in self.schedule.due(now):
                        if host not in self._in_flight:  # still on its last one: this turn is skipped
                            self._in_flight.add(host)
                            nursery.start_soon(self._run_one, host)
                    await self._wait(self.schedule.next_due())

    async def _wait(self, when: float | None) -> None:
        """Until the next due time or a change in the offer book (a new host), whichever is first.

        Every host's heartbeat changes the book, so a change wakes the
        timetable at most once per ``RETRACK_S``: a thousand hosts must not
        mean a pass over the whole book hundreds of times a second.
        """
        changed = self.book.changed
        not_before = trio.current_time() + self.RETRACK_S

        async def book_changed() -> None:
            await changed.wait()
            await trio.sleep_until(not_before)

        async with trio.open_nursery() as race:

            async def first(wait, *args) -> None:
                await wait(*args)
                race.cancel_scope.cancel()

            race.start_soon(first, book_changed)
            if when is not None:
                race.start_soon(first, self.clock.sleep_until, when)

    @property
    def running(self) -> int:
        """Challenges started (or waiting for a place under ``max_in_flight``) and not yet finished."""
        return len(self._in_flight)

    async def _run_one(self, host: str) -> None:
        try:
            async with self.limiter:
                if self._stopping:
                    return
                outcome = await self.challenge(host)
            self.outcomes.append(outcome)
            del self.outcomes[:-self.MAX_OUTCOMES]
            self.counts[host] += 1
            log.log(logging.INFO if outcome.status == "served" else logging.WARNING, "%s", outcome.line())
        finally:
            self._in_flight.discard(host)
            self.finished.set()
            self.finished = trio.Event()

    async def challenge(self, host: str) -> ChallengeOutcome:
        """One ordinary-looking order to ``host`` (one of its models, drawn), run to the end."""
        models = sorted({o.model for o in self.book.live() if o.peer_id == host})
        if not models:
            return ChallengeOutcome(host, "-", "failed", detail="its offer was gone before its turn")
        model = self.rng.choice(models)
        request = parse_request(challenge_body(model, self.rng), "chat")
        with aimed_at(host) as aim:
            try:
                finish = await self.service.complete(request, self.api_key, _discard)
            except APIError as error:
                return ChallengeOutcome(host, model, "failed", detail=f"HTTP {error.status}: {error.message}")
        if not aim.receipts:
            return ChallengeOutcome(host, model, "unsigned", tokens=finish.usage.completion_tokens)
        receipt = aim.receipts[-1]
        return ChallengeOutcome(host, model, "served", tokens=receipt.tokens_out, request_id=receipt.request_id)


class ChallengerError(Exception):
    """The challenger cannot start (bad hub URL, key refused, no credits): one line for the operator."""


@dataclass
class ChallengerOptions:
    hub: HubLogin
    period_s: float = 3600.0
    per_host_per_period: float = 1.0
    p2p: P2PConfig = field(default_factory=P2PConfig)
    config: GatewayConfig = field(default_factory=GatewayConfig)
    home: str | Path | None = None
    """Where the receipt queue and the audit openings live (``$GPUNEXUS_HOME``); required."""
    seed: int | None = None
    """Seeds the timetable and the drawn requests (tests, reproducing a run); None: unpredictable."""
    clock: Clock | None = None
    max_in_flight: int = 4


@dataclass
class ChallengerRuntime:
    challenger: Challenger
    service: GatewayService
    book: OfferBook
    settlement: ChallengeSettlement
    peer_id: str
    account: str
    balance_micro: int


def check_hub_url(url: str) -> str:
    """The hub's base URL, or ChallengerError saying what is wrong with it."""
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, TypeError) as exc:
        raise ChallengerError(f"--hub {url!r} is not a URL: {exc}") from None
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise ChallengerError(f"--hub {url!r} is not an http:// or https:// URL with a host, e.g. http://127.0.0.1:8080")
    return url.rstrip("/")


async def check_account(hub: HubLogin, timeout_s: float = 10.0) -> dict:
    """The challenge account's balance (``GET /v1/balance``), or ChallengerError naming the problem.

    Asked before joining the swarm: a wrong URL or key is the operator's
    typo, better said in one line at start than as a warning per challenge.
    """
    url = check_hub_url(hub.url)
    async with httpx.AsyncClient(base_url=url, headers={"authorization": f"Bearer {hub.api_key}"}) as http:
        try:
            data = await _call(http, "GET", "/v1/balance", timeout_s)
        except HubUnavailable as exc:
            raise ChallengerError(f"cannot reach the hub at {url}: {exc}") from None
        except HubRefused as exc:
            if exc.status == 401:
                raise ChallengerError(f"the hub at {url} refused the API key: {exc.message}") from None
            raise ChallengerError(f"the hub at {url} refused: HTTP {exc.status} {exc.message} (is it a gpunexus hub?)") from None
    if not isinstance(data, dict) or not isinstance(data.get("available_micro"), int):
        raise ChallengerError(f"{url} answered GET /v1/balance without a balance: is it a gpunexus hub?")
    if data["available_micro"] <= 0:
        raise ChallengerError(f"the challenge account {data.get('account', '')} has no credits: "
                              "grant some ('gpunexus hub credits grant EMAIL USD') first")
    return data


@asynccontextmanager
async def open_challenger(options: ChallengerOptions) -> AsyncIterator[ChallengerRuntime]:
    """A challenger peer in the swarm, its timetable running; ChallengerError if the hub says no."""
    if options.home is None:
        raise ValueError("a challenger needs a home folder for its receipt queue and audit openings")
    account = await check_account(options.hub)
    rng = random.Random(options.seed)
    schedule = ChallengeSchedule(options.period_s, options.per_host_per_period, rng)  # ValueError for bad numbers
    signer = load_identity(None, "challenger")
    settlement = ChallengeSettlement(options.hub.url, options.hub.api_key, signer.peer_id,
                                     node_home(options.home, "challenger") / "receipts.db",
                                     audit_retention_s=OPENING_RETENTION_S)
    async with open_p2p(signer, options.p2p) as node, trio.open_nursery() as nursery:
        # A challenger checks every host: it follows every shard of every model, whatever the market's size.
        book, prices, topics = await follow_market(node, nursery, options.hub.url, options.config.price_poll_s,
                                                   follow_known=True, all_shards=True)
        await nursery.start(settlement.run)
        service = GatewayService(node, AimedBook(book), settlement, options.config, prices=prices, topics=topics)
        await nursery.start(service.run)
        challenger = Challenger(service, book, schedule, api_key=options.hub.api_key, rng=rng, clock=options.clock,
                                max_in_flight=options.max_in_flight)
        await nursery.start(challenger.run)
        try:
            yield ChallengerRuntime(challenger, service, book, settlement, signer.peer_id,
                                    str(account.get("account", "")), account["available_micro"])
        finally:
            nursery.cancel_scope.cancel()


STOP_GRACE_S = 60.0
"""After a stop signal: longest wait for running challenges, then for delivering receipts and openings."""


async def stop_on_signal(runtime: ChallengerRuntime) -> None:
    """Wait for SIGINT or SIGTERM, then stop gracefully (see :func:`stop_gracefully`); a second signal stops at once."""
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        first = await signals.__anext__()
        log.info("%s: no new challenges; finishing %d running, then delivering receipts",
                 signal.Signals(first).name, runtime.challenger.running)
        async with trio.open_nursery() as nursery:

            async def stop_on_second_signal() -> None:
                await signals.__anext__()
                log.warning("second signal: stopping now; undelivered receipts stay queued for the next run")
                nursery.cancel_scope.cancel()

            nursery.start_soon(stop_on_second_signal)
            await stop_gracefully(runtime)
            nursery.cancel_scope.cancel()


async def stop_gracefully(runtime: ChallengerRuntime, grace_s: float = STOP_GRACE_S) -> None:
    """No new challenges; wait for the running ones, deliver the receipts and answer the pending audits.

    What cannot be delivered within ``grace_s`` stays in the queue on disk:
    the next run delivers it.
    """
    challenger = runtime.challenger
    challenger.stop()
    with trio.move_on_after(grace_s):
        while challenger.running:
            await challenger.finished.wait()
    with trio.move_on_after(grace_s):
        try:
            await runtime.settlement.flush()
            await runtime.settlement.answer_audits()
        except (HubUnavailable, HubRefused, ProtocolError) as exc:
            log.warning("stopping with receipts or audit openings undelivered (%s); the next run delivers them", exc)
    counts = challenger.counts
    log.info("stopped: %d challenges to %d hosts, %d receipts still queued", sum(counts.values()), len(counts),
             len(runtime.settlement.queue))
