"""A team's gateway: one gateway peer, each member paying with their own hub key.

A team runs one gateway (one peer, one offer book, warm streams to hosts) and
its members point their clients at it with their own hub API keys. Each key
that shows up gets a :class:`HubSettlement` of its own, under a gateway
identity of its own (:meth:`TeamSettlement.member_identity`): its own
allowance from the hub, receipt queue, audit openings and revocation watch, so every request is authorized, reserved, billed and
revocable exactly as on a member's own gateway, and one member's credit or
limits never pay for another's requests.

The request path stays free of network waits once a key is known: the first
request with a new key waits (bounded by ``admit_timeout_s``) while the hub
issues that key's first allowance, and every later one is checked from local
state. A key the hub refuses is remembered for ``REFUSED_TTL_S`` (by its
digest), so a client retrying a bad key costs the hub one call a minute, and
at most ``max_members`` keys are admitted at once.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import trio

from gpunexus.protocol.messages import Opening, Receipt
from gpunexus.protocol.signing import Signer

from ..hub_client import HubSettlement
from .settlement import Grant, SettlementRefused

log = logging.getLogger(__name__)

REFUSED_TTL_S = 60.0
"""How long a key the hub refused is answered 401 without asking the hub again."""
MAX_REMEMBERED_REFUSALS = 4096


class TeamSettlement:
    """A :class:`~gpunexus.node.gateway.settlement.Settlement` that settles each bearer key with the hub on its own."""

    def __init__(self, hub_url: str, signer: Signer, folder: str | Path, *, max_members: int = 1000,
                 admit_timeout_s: float = 10.0, audit_retention_s: float | None = 3600.0,
                 member: Callable[..., HubSettlement] = HubSettlement, clock: Callable[[], float] = time.monotonic) -> None:
        self.hub_url = hub_url
        self.signer = signer
        self.folder = Path(folder)
        self.max_members = max_members
        self.admit_timeout_s = admit_timeout_s
        self.audit_retention_s = audit_retention_s
        self._member = member
        self._clock = clock
        self._members: dict[str, HubSettlement] = {}
        self._signers: dict[str, Signer] = {}
        self._refused: OrderedDict[str, tuple[float, str]] = OrderedDict()
        """Digest of a refused key -> (until when, the hub's reason)."""
        self._admitting: dict[str, trio.Lock] = {}
        self._nursery: trio.Nursery | None = None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            await trio.sleep_forever()

    @property
    def members(self) -> int:
        return len(self._members)

    async def admit(self, bearer: str | None) -> None:
        """Make ``bearer`` a member if the hub accepts it (its first allowance), waiting at most ``admit_timeout_s``.

        Never raises: whatever stops the admission is what :meth:`authorize`
        answers next (401 refused, 503 full or hub away).
        """
        if not bearer or bearer in self._members or self._refusal(bearer) is not None:
            return
        lock = self._admitting.setdefault(bearer, trio.Lock())
        try:
            async with lock:  # concurrent first requests with one key: one admission
                if bearer in self._members or len(self._members) >= self.max_members:
                    return
                await self._admit(bearer)
        finally:
            if not lock.locked() and not lock.statistics().tasks_waiting:
                self._admitting.pop(bearer, None)

    async def _admit(self, bearer: str) -> None:
        assert self._nursery is not None, "TeamSettlement.run is not running"
        digest = _digest(bearer)
        identity = self.member_identity(bearer)
        member = self._member(self.hub_url, bearer, identity.peer_id, self.folder / f"{digest[:32]}.db",
                              audit_retention_s=self.audit_retention_s)
        scope = trio.CancelScope()

        async def run_member(*, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
            with scope:
                await member.run(task_status=task_status)

        with trio.move_on_after(self.admit_timeout_s):
            await self._nursery.start(run_member)
        if member.refused_key is not None:
            scope.cancel()
            self._remember_refusal(digest, member.refused_key)
            return
        # Admitted even when the hub did not answer in time: the member renews in the
        # background, and until it has an allowance its requests get a 503 to retry.
        self._members[bearer] = member
        self._signers[bearer] = identity
        log.info("team gateway: key %s admitted (%d members)", member.key_id or digest[:8], len(self._members))

    def member_identity(self, bearer: str) -> Signer:
        """The gateway identity a member's orders and receipts carry, derived from this gateway's seed and the key.

        The hub binds a gateway peer id to one account and finds a receipt's
        allowance by its ``gateway_id``, so each member speaks through an
        identity of its own: stable across restarts (the same key gets the
        same id, which the hub already bound to its account), distinct per
        key, and only this gateway can sign for it. Hosts check orders by
        their signature and allowance, not by the connection they came on.
        """
        material = b"gpunexus/team-member/1\n" + self.signer.seed + hashlib.sha256(bearer.encode()).digest()
        return Signer(hashlib.sha256(material).digest())

    # --- request path (no I/O) ------------------------------------------------
    def authorize(self, bearer: str | None, model: str) -> Grant:
        member = self._members.get(bearer or "")
        if member is None:
            if not bearer:
                raise SettlementRefused(401, "invalid_api_key", "This team gateway needs your own hub API key: Authorization: Bearer gnx_...")
            refusal = self._refusal(bearer)
            if refusal is not None:
                raise SettlementRefused(401, "invalid_api_key", refusal)
            if len(self._members) >= self.max_members:
                raise SettlementRefused(503, "team_gateway_full", f"This team gateway serves {self.max_members} keys already; retry later.")
            raise SettlementRefused(503, "hub_unreachable", "The settlement hub could not check your key in time; retry shortly.")
        grant = member.authorize(bearer, model)
        return Grant(allowance=grant.allowance, payer=bearer or "", signer=self._signers[bearer or ""])

    def reserve(self, grant: Grant, micro: int) -> None:
        self._members[grant.payer].reserve(grant, micro)

    def release(self, grant: Grant, micro: int) -> None:
        self._members[grant.payer].release(grant, micro)

    def retain(self, opening: Opening, grant: Grant | None = None) -> None:
        if grant is not None:
            self._members[grant.payer].retain(opening)

    def record(self, receipt: Receipt, grant: Grant | None = None) -> None:
        if grant is None or grant.payer not in self._members:
            raise ValueError("a team gateway records a receipt for the member whose grant paid it")
        self._members[grant.payer].record(receipt)

    def allowance_balances(self) -> dict[str, int]:
        """Each member key's allowance left, by key id (for the gateway's ``/metrics``)."""
        return {m.key_id: m.available_micro() for m in self._members.values()}

    def excluded_host(self, peer_id: str) -> bool:
        """Hosts the hub's signed reputations exclude (every member reads the same list; the first that has one says)."""
        return any(m.excluded_host(peer_id) for m in self._members.values())

    # --- refusals -------------------------------------------------------------
    def _refusal(self, bearer: str) -> str | None:
        entry = self._refused.get(_digest(bearer))
        if entry is None:
            return None
        until, reason = entry
        if self._clock() >= until:
            del self._refused[_digest(bearer)]
            return None
        return reason

    def _remember_refusal(self, digest: str, reason: str) -> None:
        self._refused[digest] = (self._clock() + REFUSED_TTL_S, reason)
        self._refused.move_to_end(digest)
        while len(self._refused) > MAX_REMEMBERED_REFUSALS:
            self._refused.popitem(last=False)


def _digest(bearer: str) -> str:
    return hashlib.sha256(bearer.encode()).hexdigest()
