"""The gateway's settlement hook: who may spend, and where receipts go.

The gateway asks this hook, on the request path and from local state with no
network round trip: may this caller spend (and with which hub-signed
allowance), may it hold back a request's worst-case cost before a host is
sent the order, and what to do with a countersigned receipt. Reserving
before the order is what keeps hosts paid: an allowance can never be
promised to more work than it can pay for, however many requests run at
once. Anything slow (renewing allowances, delivering receipts to a hub)
happens in the hook's own background task. ``authorize`` also answers
whether the caller may use the request's model at all: a hub's allowance
names the models refused to its account (switched off, licence not
accepted), and those get 403 with the reason.

A private swarm (no hub) uses :class:`FreeSettlement`; the hub plugs in its own
implementation (``gpunexus.node.hub_client``) without the gateway changing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import trio

from gpunexus.protocol.messages import Receipt
from gpunexus.protocol.signing import Signer


class SettlementRefused(Exception):
    """The caller may not spend: carries the HTTP status and OpenAI error code."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


@dataclass(frozen=True, slots=True)
class Grant:
    """Permission for one request: the allowance bytes to put in the Order."""

    allowance: bytes
    payer: str = ""
    """Which of a settlement's accounts pays (a team gateway's member key); empty where there is one."""
    signer: Signer | None = None
    """The gateway identity that signs this payer's orders and countersigns its receipts
    (a team member's own, see ``node.team``); None: the gateway peer's."""


class Settlement(Protocol):
    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Background work (renewals, receipt delivery); started in the gateway's nursery."""

    def authorize(self, bearer: str | None, model: str) -> Grant:
        """Grant or raise SettlementRefused (401 bad key, 402 out of credits, 403 model refused to this key). No I/O."""

    def reserve(self, grant: Grant, micro: int) -> None:
        """Hold ``micro`` of the grant's allowance for one order, or raise SettlementRefused (402). No I/O."""

    def release(self, grant: Grant, micro: int) -> None:
        """Give back a reservation: the order ended (its receipt, if any, is recorded right after)."""

    def record(self, receipt: Receipt, grant: Grant | None = None) -> None:
        """Take a countersigned receipt of a request ``grant`` authorized; must make it durable before returning."""


class FreeSettlement:
    """Private-swarm mode: no hub, no money; optionally one shared bearer key."""

    def __init__(self, api_key: str | None = None) -> None:
        self.api_key = api_key
        self.receipts: list[Receipt] = []

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()

    def authorize(self, bearer: str | None, model: str) -> Grant:
        if self.api_key is not None and bearer != self.api_key:
            raise SettlementRefused(401, "invalid_api_key", "Incorrect API key provided.")
        return Grant(allowance=b"")

    def reserve(self, grant: Grant, micro: int) -> None:
        """Nothing to hold: a private swarm does not bill."""

    def release(self, grant: Grant, micro: int) -> None:
        """Nothing was held."""

    def record(self, receipt: Receipt, grant: Grant | None = None) -> None:
        self.receipts.append(receipt)
        del self.receipts[:-1000]
