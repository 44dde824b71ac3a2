"""The settlement hub: accounts, API keys, allowances, receipts, market prices, Stripe.

One module per job:

``db``             schema, engine, the thread limiter every query goes through
``ledger``         double-entry postings in micro-USD, idempotent, never negative
``keys``           users, roles, hashed API keys
``allowances``     hub-signed budgets for a gateway peer id, held in escrow
``receipts``       verification and exactly-once settlement of receipt batches
``market``         hosts' offers, market epochs, signed prices, the receipt price check
``chain``          the signed, hash-chained log of settled receipts
``audit``          ``gpunexus audit``: verify an exported log from scratch
``accounts``       people: sign-up, argon2id passwords, login sessions, suspension
``reports``        usage, earnings, request logs, ledger totals, host views (read-only)
``catalogue``      the operator's model catalogue and availability
``service``        the ``Hub`` object the HTTP app, the dashboard and the CLI all drive
``app``            quart-trio HTTP API and the hypercorn runner
``web``            the dashboard: server-rendered pages at ``/`` over the same service layer
``body``           request body decoding and field specs (validation and JSON Schema from one source)
``bodies``         the request body of every JSON route
``openapi``        the API contract served at ``/openapi.json``
``ratelimit``      per-key token buckets (429 + ``retry-after``)
``stripe_billing`` Checkout top-ups, webhooks, auto-recharge, Connect payouts
``cli``            ``gpunexus hub ...`` and ``gpunexus audit``

Design notes:

* A receipt does not name its allowance. The hub binds a gateway peer id to
  one account on its first allowance and keeps every allowance it issued; a
  receipt is authorised by the allowance of its ``gateway_id`` that was valid
  at its ``issued_at``, and bills that allowance's account.
* Allowance budgets sit in the ``platform:holds`` escrow account. They are
  released a grace period *after* expiry, so receipts queued by a gateway
  while the hub was unreachable still settle against the budget they were
  served under.
* Settlement serialises on the chain head row: one writer at a time appends
  to the hash chain, which is also what makes "already settled?" race-free
  across hub processes sharing one PostgreSQL.

node/ and hub/ never import each other; ``gpunexus.node.hub_client`` is the
node's side of this HTTP API.
"""
