"""The OpenAPI 3.1 description of the hub API, served at ``/openapi.json``.

Written by hand next to the routes rather than generated: the schema is the
contract gateways, hosts and dashboards code against, so it changes only on
purpose. Request bodies are the one exception: their schemas are emitted by
the very :class:`~gpunexus.hub.body.Body` specs the routes validate with
(:mod:`gpunexus.hub.bodies`), so what is published and what is enforced
cannot drift.

Why not quart-schema (generated from typed request models): it would move
validation to pydantic models and its own error shape, add pydantic to the
hub's runtime dependencies and rewrite every route, while the checks that
matter most here (bytes that are not UTF-8, nesting that would overflow the
parser, base64 with exact decoded lengths, integers that fit a BIGINT) come
before or beside any model and would stay ours anyway. One small field
vocabulary serving both sides gives the same guarantee with less.

Checked in the test suite: ``tests/test_hub_openapi.py`` validates the
document with openapi-spec-validator and runs schemathesis against a live
hub; ``tests/test_hub_app.py`` checks that every route the app serves is
described here and vice versa.
"""

from __future__ import annotations

from typing import Any

from . import bodies
from .service import VERSION


def _obj(props: dict[str, Any], required: list[str] | None = None) -> dict[str, Any]:
    return {"type": "object", "properties": props, "required": required or list(props)}


_INT = {"type": "integer", "minimum": 0}
_STR = {"type": "string"}
_NUM = {"type": "number"}
_B64 = {"type": "string", "contentEncoding": "base64"}
_MICRO = {"type": "integer", "description": "integer micro-USD (1 USD = 1,000,000)"}

_PAIR = {"type": "array", "items": _NUM, "minItems": 2, "maxItems": 2,
         "description": "[epoch start (unix s), price (integer micro-USD per million tokens)]"}
"""A fixed pair, said without ``prefixItems``: tools that convert the schema to older JSON Schema drafts
(schemathesis does) turn ``prefixItems`` into the tuple form of ``items``, which OpenAPI 3.1 forbids."""

ERROR = _obj({"error": _obj({"message": _STR, "type": _STR, "param": {"type": ["string", "null"]}, "code": _STR})})
SUMMARY = _obj({
    "account": _STR, "requests": _INT, "tokens": _INT, "amount_micro": _MICRO,
    "by_model": {"type": "array", "items": _obj({"model": _STR, "requests": _INT, "tokens": _INT, "amount_micro": _MICRO})},
}, ["account", "requests", "tokens", "amount_micro", "by_model"])


def operation(summary: str, response: dict, *, body: dict | None = None, auth: bool = True,
              errors: tuple[int, ...] = (), parameters: list[dict] | None = None) -> dict:
    """One operation: 200 with ``response``, the error statuses it can answer, its JSON ``body`` schema.

    A body brings 400 (malformed) and 413 (too large); ``auth`` brings 401 and 429.
    """
    op: dict[str, Any] = {
        "summary": summary,
        "responses": {"200": {"description": "OK", "content": {"application/json": {"schema": response}}}},
    }
    statuses = {*errors, *((401, 429) if auth else ()), *((400, 413) if body is not None else ())}
    for status in sorted(statuses):
        op["responses"][str(status)] = {"description": "error", "content": {"application/json": {"schema": ERROR}}}
    if body is not None:
        op["requestBody"] = {"required": True, "content": {"application/json": {"schema": body}}}
    if parameters:
        op["parameters"] = parameters
    if not auth:
        op["security"] = []
    return op



def spec(max_batch: int, extra_paths: dict[str, Any] | None = None, *, max_long_poll_s: float = 30.0) -> dict[str, Any]:
    """The document for a hub whose receipt batches hold at most ``max_batch``, with ``extra_paths`` (Stripe).

    ``max_long_poll_s`` is the longest wait a long poll may ask for (``HubConfig.max_long_poll_s``).
    """
    paths: dict[str, Any] = {
        "/v1/hub": {"get": operation("Hub identity and policy", _obj({
            "hub_id": _STR, "version": _STR, "fee_bps": _INT, "allowance_ttl_s": _NUM, "max_batch": _INT,
            "audit_period_s": _NUM, "audit_root_grace_s": _NUM,
            "billing": {"enum": ["manual", "stripe"]}}), auth=False)},
        "/v1/allowances": {"post": operation(
            "Issue a hub-signed, short-lived budget for a gateway peer id, reserved from the balance. "
            "A renewal rolls the unspent budget of the previous allowance over.",
            _obj({"allowance": _B64, "allowance_id": _STR, "hub_id": _STR, "account": _STR,
                  "budget_micro": _MICRO, "issued_at": _NUM, "expires_at": _NUM,
                  "limited_by_balance": {"type": "boolean", "description": "the account's balance, not the asked budget, set the size"},
                  "refused_models": {"type": "array", "description": "why each model the signed allowance refuses is refused: "
                                     "'unavailable' (switched off by the operator) or 'licence' (not accepted by the account)",
                                     "items": _obj({"model": _STR, "reason": {"enum": ["unavailable", "licence"]},
                                                    "licence_name": _STR, "licence_url": _STR})},
                  "limit": {"type": ["string", "null"], "description": "the key's spend limit that capped the budget, in words"},
                  "key_expires_at": {"type": ["number", "null"], "description": "when the asking key expires (the allowance never outlives it)"},
                  "terms": {"type": "string", "description": "the account's catalogue terms stamp: pass it to /v1/revocations"}}),
            body=bodies.ALLOWANCE.schema(), errors=(402, 409))},
        "/v1/receipts": {"post": operation(
            "Settle a batch of countersigned receipts (Receipt.encode(), base64). Each is settled exactly once; "
            "resubmitting is safe and answers 'duplicate'. A receipt whose price is above every price its host "
            "offered for the model (POST /v1/offers) in the minute before it was issued is refused.",
            _obj({"results": {"type": "array", "items": _obj({
                "request_id": _STR, "status": {"enum": ["settled", "duplicate", "refused"]},
                "reason": _STR, "seq": {"type": ["integer", "null"]}, "cost_micro": _MICRO})}}),
            body=bodies.receipts(max_batch).schema())},
        "/v1/revocations": {"get": operation(
            "A long poll for revocations of the key's account's keys after 'after' (unix s): answers at once when "
            "there are some, else when one happens or after wait_s. Each is a hub-signed Revocation (base64); "
            "'cursor' is the 'after' of the next poll. A revoked key may still poll (it hears of its own "
            "revocation) and still deliver receipts of work served before it. With 'terms' (the stamp its "
            "allowance came with) it also answers as soon as the account's catalogue terms moved (a model switched "
            "off, a licence accepted): the gateway then renews its allowance.",
            _obj({"hub_id": _STR, "cursor": _NUM, "terms": _STR, "revocations": {"type": "array", "items": _B64}}),
            errors=(400,),
            parameters=[
                {"name": "terms", "in": "query", "required": False, "schema": {"type": "string", "maxLength": 200}},
                {"name": "after", "in": "query", "required": False, "schema": {"type": "number", "minimum": 0, "maximum": 1e12}},
                {"name": "wait_s", "in": "query", "required": False, "schema": {"type": "number", "minimum": 0, "maximum": max_long_poll_s}},
            ])},
        "/v1/balance": {"get": operation("Available and held credit of the key's account",
                                   _obj({"account": _STR, "available_micro": _MICRO, "held_micro": _MICRO}))},
        "/v1/usage": {"get": operation("What the key's account spent, by model", SUMMARY)},
        "/v1/earnings": {"get": operation("What the key's account earned as a host, by model", {
            **SUMMARY, "properties": {**SUMMARY["properties"], "balance_micro": _MICRO}})},
        "/v1/hosts/register": {"post": operation(
            "Bind a host peer id to the key's (host) account, so receipts naming it pay this account. "
            "proof = the peer key's Ed25519 signature of 'gpunexus/host-register/1\\n<hub_id>\\n<peer_id>'.",
            _obj({"peer_id": _STR, "account": _STR}), body=bodies.HOST_REGISTER.schema(), errors=(403, 409))},
        "/v1/offers": {"post": operation(
            "A host's signed offer (Offer.encode(), base64), posted with every heartbeat: market supply, and the "
            "prices its receipts may carry. The offer's peer id must be registered to the key's host account; "
            "expired offers are refused.",
            _obj({"accepted": {"type": "boolean"}}), body=bodies.OFFER.schema(), errors=(403,)),
            "get": operation(
            "A gateway's catch-up when it joins an offer topic: the live signed offers (Offer.encode(), base64) of "
            "one shard of a model, shard = first 8 bytes of SHA-256(peer id) big-endian mod shards "
            "(protocol/discovery.py). The hub holds each host's latest posted offer, so a withdrawn host may be "
            "listed until its offer expires.",
            _obj({"model": _STR, "shard": _INT, "shards": _INT, "offers": {"type": "array", "items": _B64}}),
            auth=False, errors=(400, 429),
            parameters=[
                {"name": "model", "in": "query", "required": True, "schema": {"type": "string", "maxLength": 256}},
                {"name": "shard", "in": "query", "required": False, "schema": {"type": "integer", "minimum": 0}},
                {"name": "shards", "in": "query", "required": False,
                 "schema": {"type": "integer", "minimum": 1, "maximum": 1024}}])},
        "/v1/offers/withdraw": {"post": operation(
            "A host's signed withdrawal (Withdraw.encode(), base64), posted when it stops serving: its offers up to the "
            "withdrawal's sequence number leave market supply, the directory and the catch-up lists at once (the price "
            "history stays, so earlier receipts still settle). The peer id must be registered to the key's host account.",
            _obj({"accepted": {"type": "boolean"}, "ended": _INT}), body=bodies.WITHDRAW.schema(), errors=(403,))},
        "/v1/directory": {"get": operation(
            "Every model with a live offer: its live host count and the discovery plan peers size its offer topics "
            "by (gpunexus/offers/2/<model>/<shard>, shards a power of two; refresh_s the hosts' heartbeat).",
            _obj({"hub_id": _STR, "models": {"type": "array", "items": _obj({
                "model": _STR, "hosts": _INT, "shards": _INT, "refresh_s": _NUM})}}),
            auth=False, errors=(429,))},
        "/v1/prices": {"get": operation(
            "The latest hub-signed market price per model (PriceUpdate.encode(), base64). A price for epoch k is "
            "computed at k * epoch_s (unix seconds) from the epoch before and holds until epoch k + 1.",
            _obj({"hub_id": _STR, "prices": {"type": "array", "items": _B64}}), auth=False, errors=(429,))},
        "/v1/catalogue": {"get": operation(
            "The operator's model catalogue: each model id with its display name, family, licence (name, URL, and "
            "whether clients must accept it), context length, availability, and the minimums a host must measure "
            "to serve it (node check reads them; null: no minimum).",
            _obj({"hub_id": _STR, "models": {"type": "array", "items": _obj({
                "model": _STR, "display_name": _STR, "family": _STR, "licence_name": _STR, "licence_url": _STR,
                "licence_ack": {"type": "boolean"}, "context_length": {"type": ["integer", "null"]},
                "available": {"type": "boolean"}, "minimums": _obj({
                    "vram_gb": {"type": ["number", "null"]}, "compute_capability": {"type": ["string", "null"]},
                    "tokens_per_s": {"type": ["number", "null"]}})})}}),
            auth=False, errors=(429,))},
        "/v1/market": {"get": operation(
            "The market per model: latest price, demand (settled tokens/s: refused demand is not reported yet) and "
            "supply (offered tokens/s), utilisation (null: demand and no supply), live hosts, the price bounds, "
            "what a GPU with the median host's throughput (tokens/s x slots) would earn per hour at the price and the utilisation it could expect after joining, and the last day's prices as "
            "[epoch start unix s, price] pairs.",
            _obj({"hub_id": _STR, "epoch_s": _NUM, "models": {"type": "array", "items": _obj({
                "model": _STR, "epoch": _INT, "price_micro_per_mtok": _MICRO, "demand_tps": _NUM, "supply_tps": _NUM,
                "utilisation": {"type": ["number", "null"]}, "hosts": _INT, "floor_micro_per_mtok": _MICRO,
                "ceiling_micro_per_mtok": _MICRO, "earnings_micro_per_gpu_hour": _MICRO,
                "history": {"type": "array", "items": _PAIR}})}}),
            auth=False, errors=(429,))},
        "/v1/audits/commitment": {"get": operation(
            "Audit selection: the SHA-256 commitment to the current period's secret, and the latest revealed "
            "secret (of the last period whose root deadline, period end + root_grace_s, passed). A settled receipt "
            "of period p = floor(issued_at / period_s) is audited iff SHA-256('gpunexus-audit-select/1\\0' || "
            "len(secret):u16 || secret || root || request_id) < rate * 2**256 (verify.selection.is_selected), root "
            "being its host's published ReceiptRoot for p; without one every receipt of p is audited.",
            _obj({"hub_id": _STR, "period_s": _NUM, "root_grace_s": _NUM,
                  "current": _obj({"period": _INT, "commitment": _STR}),
                  "previous": {"type": ["object", "null"]}}), auth=False, errors=(429,))},
        "/v1/audits/roots": {"post": operation(
            "A host's signed Merkle root of the receipts it signed in one period (ReceiptRoot.encode(), base64): "
            "verify.merkle.merkle_root over receipt_leaf(request_id, receipt as the host signed it) in issue order. "
            "One per host and period, the first wins (accepted: false when another was stored); refused (409) "
            "after the period's deadline. The hub then selects that period's receipts with it.",
            _obj({"host_id": _STR, "period": _INT, "root": _STR, "count": _INT, "accepted": {"type": "boolean"},
                  "selected": _INT}),
            body=bodies.ROOT.schema(), errors=(403, 409))},
        "/v1/audits/pending": {"get": operation(
            "Request ids of receipts countersigned by the key's gateways that were selected for audit and "
            "wait for their opening.", _obj({"request_ids": {"type": "array", "items": _STR}}))},
        "/v1/audits/openings": {"post": operation(
            "A gateway's opening of a selected receipt (Opening.encode(), base64), or null with a reason when it "
            "kept none. The hub checks it against the receipt's prompt and output hashes, audits it with the "
            "reference model and answers the verdict; a failed audit withholds the host's pay for the receipt. "
            "A model the hub cannot replay goes to peer verifiers instead: status verifying, jobs created.",
            _obj({"request_id": _STR, "status": {"enum": ["passed", "failed", "unopened", "skipped", "pending", "verifying"]},
                  "passed": {"type": "boolean"}, "reasons": {"type": "array", "items": _STR},
                  "withheld_micro": _MICRO, "debt_micro": _MICRO}, ["request_id", "status"]),
            body=bodies.OPENING.schema(), errors=(404,))},
        "/v1/audits/jobs": {"get": operation(
            "A verifier host's audit jobs (each a hub-signed AuditJob, base64) for peer_id, one of the key's host "
            "peers; polling also marks it available to verify the given model hashes. Jobs are drawn "
            "SHA-256('gpunexus-verifier-draw/1\\0' || len(secret):u16 || secret || job_id) mod the eligible "
            "verifiers, sorted (hub/peer_audit.py).",
            _obj({"hub_id": _STR, "jobs": {"type": "array", "items": _B64}}), errors=(400, 403),
            parameters=[
                {"name": "peer_id", "in": "query", "required": True, "schema": {"type": "string", "maxLength": 64}},
                {"name": "model_hash", "in": "query", "required": True, "style": "form", "explode": True,
                 "schema": {"type": "array", "minItems": 1, "maxItems": 16, "items": {"type": "string", "minLength": 1, "maxLength": 256}}},
            ])},
        "/v1/audits/results": {"post": operation(
            "A verifier's signed result of one job (VerifierResult.encode(), base64). The hub judges it "
            "(verify.peer.judge): a pass decides the audit, a first failure draws a second verifier, a second "
            "failure fails the host. Each answered job pays the verifier's fee once (not a missed known-answer job).",
            _obj({"job_id": _STR, "verdict": {"enum": ["passed", "failed"]}, "fee_micro": _MICRO,
                  "escalated": {"type": "boolean"}, "already": {"type": "boolean"}, "audit": {"type": "object"}},
                 ["job_id", "verdict"]),
            body=bodies.RESULT.schema(), errors=(409,))},
        "/v1/reputation": {"get": operation(
            "Every audited host's reputation, each a hub-signed HostReputation (base64): gateways skip hosts "
            "marked excluded.", _obj({"hub_id": _STR, "reputations": {"type": "array", "items": _B64}}),
            auth=False, errors=(429,))},
        "/v1/payout-settings": {"put": operation(
            "Host payout threshold and Stripe Connect account",
            _obj({"threshold_micro": {"type": ["integer", "null"]}, "connect_account_id": {"type": ["string", "null"]}}),
            body=bodies.PAYOUT_SETTINGS.schema(), errors=(403,))},
    }
    paths.update(extra_paths or {})
    return {
        "openapi": "3.1.0",
        "info": {"title": "gpunexus hub", "version": VERSION,
                 "description": "Accounts, allowances, receipt settlement and market prices for the gpunexus inference market. "
                                "Amounts are integer micro-USD. Errors use OpenAI's shape."},
        "components": {"securitySchemes": {"apiKey": {"type": "http", "scheme": "bearer"}}},
        "security": [{"apiKey": []}],
        "paths": paths,
    }
