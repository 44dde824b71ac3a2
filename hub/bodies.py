"""The request body of every JSON route of the hub: what the routes check and what ``/openapi.json`` publishes.

String lengths are at most the sizes of the columns the values land in
(:mod:`gpunexus.hub.db`; ``tests/test_hub_body.py`` holds them to it); binary protocol
messages are bounded by the protocol's frame cap, their content is checked by
the protocol decoder afterwards.
"""

from __future__ import annotations

import math

from gpunexus.protocol.limits import MAX_FRAME_BYTES

from . import db
from .body import B64, Array, Body, Int, Nullable, Str

FRAME_BYTES = 3 * math.ceil(MAX_FRAME_BYTES / 3)
"""Decoded size bound of one base64 protocol message (the frame cap, up to a multiple of 3)."""

MAX_REASON_CHARS = 500

PEER_ID = Str(52, 52, pattern="12D3KooW[1-9A-HJ-NP-Za-km-z]{44}",
              description="an Ed25519 libp2p peer id (base58btc, 12D3KooW...)")
REQUEST_ID = Str(32, 32, pattern="[0-9a-f]{32}", description="a request id (32 lowercase hex characters)")


def _message(what: str) -> B64:
    return B64(FRAME_BYTES, description=f"{what}, base64")


ALLOWANCE = Body({
    "gateway_id": PEER_ID,
    "budget_micro": Nullable(Int(description="requested budget in micro-USD (capped by the hub); absent or null: "
                                             "the hub's default")),
}, required=("gateway_id",))


def receipts(max_batch: int) -> Body:
    """The receipt batch body; ``max_batch`` is the hub's ``HubConfig.max_batch`` (more answers 413)."""
    return Body({"receipts": Array(_message("Receipt.encode()"), max_batch, over_status=413)}, required=("receipts",))


HOST_REGISTER = Body({
    "peer_id": PEER_ID,
    "proof": B64(exact_bytes=64, description="the peer key's Ed25519 signature (64 bytes), base64"),
}, required=("peer_id", "proof"))

OFFER = Body({"offer": _message("Offer.encode()")}, required=("offer",))

WITHDRAW = Body({"withdraw": _message("Withdraw.encode()")}, required=("withdraw",))

ROOT = Body({"root": _message("ReceiptRoot.encode()")}, required=("root",))

RESULT = Body({"result": _message("VerifierResult.encode()")}, required=("result",))

OPENING = Body({
    "request_id": REQUEST_ID,
    "opening": Nullable(_message("Opening.encode()")),
    "reason": Str(MAX_REASON_CHARS, 0, pattern="[^\\u0000]*",
                  description="why no opening is given (with opening null); no NUL characters"),
}, required=("request_id", "opening"))

PAYOUT_SETTINGS = Body({
    "threshold_micro": Nullable(Int(description="pay out once the balance reaches this (micro-USD); null: never")),
    "connect_account_id": Nullable(Str(db.users.c.connect_account_id.type.length, 6, pattern="acct_[0-9A-Za-z]+",
                                       description="the Stripe Connect account paid; null: none")),
})
