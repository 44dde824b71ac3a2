"""The operator's model catalogue: what each model id is, its licence, and whether it is available.

Hosts name models freely in their offers; the catalogue is the operator's
word on them, shown to everyone on the dashboard's public models page.

Enforcement, today: a model switched off is shown as unavailable and named
in :func:`unavailable`; nothing on the request path refuses it yet. An
allowance is a budget for a gateway, not for a model (``Allowance`` in
``protocol/messages.py`` carries no model), and the gateway, not the hub,
picks the model of each order, so the hub cannot refuse one model at
allowance time. Refusing the receipts or the offers of a switched-off model
instead would make hosts serve requests that are then never paid. Making
availability bind needs the allowance (or the signed reputation list
gateways already fetch) to carry the refused models, and the gateway to
check them: a change to protocol/ and node/, left for the issue that owns
them.
"""

from __future__ import annotations

from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from . import ledger
from .db import models, offers


@dataclass(frozen=True, slots=True)
class Model:
    model: str
    display_name: str
    licence_name: str
    licence_url: str
    context_length: int | None
    available: bool
    updated_at: float


def list_models(conn: Connection) -> list[Model]:
    return [Model(**r._mapping) for r in conn.execute(sa.select(models).order_by(models.c.model))]


def upsert(conn: Connection, entry: Model) -> None:
    """Add ``entry`` or replace the catalogue entry of its model id."""
    values = {f: getattr(entry, f) for f in Model.__slots__}
    inserted = conn.execute(ledger.insert_ignore(conn, models).values(**values).returning(models.c.model)).first()
    if inserted is None:
        conn.execute(sa.update(models).where(models.c.model == entry.model).values(**values))


def set_available(conn: Connection, model: str, available: bool, now: float) -> bool:
    """Switch a catalogued model on or off; False if it is not in the catalogue."""
    return conn.execute(sa.update(models).where(models.c.model == model)
                        .values(available=available, updated_at=now).returning(models.c.model)).first() is not None


def unavailable(conn: Connection) -> set[str]:
    """Model ids the operator switched off."""
    return set(conn.execute(sa.select(models.c.model).where(sa.not_(models.c.available))).scalars())


def uncatalogued(conn: Connection, now: float) -> list[str]:
    """Models hosts offer right now that the catalogue does not list (candidates for an entry)."""
    q = (sa.select(offers.c.model).distinct().where(offers.c.expires_at > now)
         .where(offers.c.model.not_in(sa.select(models.c.model))).order_by(offers.c.model))
    return list(conn.execute(q).scalars())
