"""The operator's model catalogue: what each model id is, its licence, and whether it is available.

Hosts name models freely in their offers; the catalogue is the operator's
word on them, shown to everyone on the dashboard's public models page.

Enforcement. A model switched off, or one whose licence needs an
acknowledgement the account has not given (``licence_ack``), is a
:class:`Refusal` for that account: every allowance the hub signs names it in
``refused_models`` (:mod:`gpunexus.hub.allowances`), the gateway answers a
request for it with 403 before any host works, and a host refuses an order
for it. An uncatalogued model is not refused: the catalogue describes
models, it is not a whitelist of what hosts may offer.

A change (switch-off, acceptance) binds from the next allowance, and
gateways get that allowance within a second: the hub's revocation long poll
also answers when :func:`terms_stamp` moved, and the gateway renews then (a
gateway that refused a model for its licence also renews straight away).
"""

from __future__ import annotations

from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from . import ledger
from .db import licence_acceptances, models, offers


class CatalogueError(Exception):
    """An acceptance that cannot be recorded (no such model, no licence to accept)."""


@dataclass(frozen=True, slots=True)
class Model:
    model: str
    display_name: str
    licence_name: str
    licence_url: str
    context_length: int | None
    available: bool
    updated_at: float
    family: str = ""
    licence_ack: bool = False
    """Clients must accept the licence before their keys may use the model."""
    min_vram_gb: float | None = None
    min_compute_capability: str = ""
    """``"8.0"``-style; empty: no minimum."""
    min_tokens_per_s: float | None = None
    """What a host must measure to serve the model (``node check`` reads them from ``GET /v1/catalogue``)."""

    def to_json(self) -> dict:
        """The public catalogue entry (``GET /v1/catalogue``)."""
        return {"model": self.model, "display_name": self.display_name, "family": self.family,
                "licence_name": self.licence_name, "licence_url": self.licence_url, "licence_ack": self.licence_ack,
                "context_length": self.context_length, "available": self.available,
                "minimums": {"vram_gb": self.min_vram_gb, "compute_capability": self.min_compute_capability or None,
                             "tokens_per_s": self.min_tokens_per_s}}

    @property
    def licence(self) -> str:
        """The licence as a person reads it: name and URL, whichever the catalogue has."""
        if self.licence_name and self.licence_url:
            return f"{self.licence_name} ({self.licence_url})"
        return self.licence_name or self.licence_url or "its licence"


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why an account's keys may not use a model: ``unavailable`` (switched off) or ``licence`` (not accepted)."""

    model: str
    reason: str
    licence_name: str = ""
    licence_url: str = ""

    def to_json(self) -> dict:
        return {"model": self.model, "reason": self.reason, "licence_name": self.licence_name,
                "licence_url": self.licence_url}


def _model(row) -> Model:
    m = row._mapping
    return Model(model=m["model"], display_name=m["display_name"], licence_name=m["licence_name"],
                 licence_url=m["licence_url"], context_length=m["context_length"], available=bool(m["available"]),
                 updated_at=m["updated_at"], family=m["family"] or "", licence_ack=bool(m["licence_ack"]),
                 min_vram_gb=m["min_vram_gb"], min_compute_capability=m["min_compute_capability"] or "",
                 min_tokens_per_s=m["min_tokens_per_s"])


def list_models(conn: Connection) -> list[Model]:
    return [_model(r) for r in conn.execute(sa.select(models).order_by(models.c.model))]


def get_model(conn: Connection, model: str) -> Model | None:
    row = conn.execute(sa.select(models).where(models.c.model == model)).first()
    return _model(row) if row else None


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


def accept_licence(conn: Connection, user_id: int, model: str, now: float) -> Model:
    """Record that ``user_id``'s account accepts ``model``'s current licence (again: the time moves)."""
    entry = get_model(conn, model)
    if entry is None:
        raise CatalogueError(f"No model {model!r} in the catalogue.")
    if not entry.licence_ack:
        raise CatalogueError(f"The model {model!r} needs no licence acceptance.")
    values = {"licence_name": entry.licence_name, "licence_url": entry.licence_url, "accepted_at": now}
    done = conn.execute(ledger.insert_ignore(conn, licence_acceptances).values(user_id=user_id, model=model, **values)
                        .returning(licence_acceptances.c.model)).first()
    if done is None:
        conn.execute(sa.update(licence_acceptances).where(licence_acceptances.c.user_id == user_id,
                                                          licence_acceptances.c.model == model).values(**values))
    return entry


def acceptances(conn: Connection, user_id: int) -> dict[str, float]:
    """model -> when ``user_id`` accepted its licence, for the licences the catalogue still names."""
    q = (sa.select(licence_acceptances.c.model, licence_acceptances.c.accepted_at)
         .join(models, sa.and_(models.c.model == licence_acceptances.c.model,
                               models.c.licence_name == licence_acceptances.c.licence_name,
                               models.c.licence_url == licence_acceptances.c.licence_url))
         .where(licence_acceptances.c.user_id == user_id))
    return dict(conn.execute(q).all())


def refusals(conn: Connection, user_id: int) -> list[Refusal]:
    """What ``user_id``'s keys may not use, in model id order: models switched off, licences not accepted."""
    accepted = acceptances(conn, user_id)
    out = []
    for m in list_models(conn):
        if not m.available:
            out.append(Refusal(m.model, "unavailable"))
        elif m.licence_ack and m.model not in accepted:
            out.append(Refusal(m.model, "licence", m.licence_name, m.licence_url))
    return out


def terms_stamp(conn: Connection, user_id: int) -> str:
    """A value that changes whenever what :func:`refusals` says of ``user_id`` may have changed.

    Gateways hold it from their allowance and hear, through the revocation
    long poll, when it moved: then they renew at once, so a switch-off or an
    acceptance binds within a second rather than at the next renewal.
    """
    edited = conn.execute(sa.select(sa.func.coalesce(sa.func.max(models.c.updated_at), 0.0))).scalar_one()
    count, accepted = conn.execute(
        sa.select(sa.func.count(), sa.func.coalesce(sa.func.max(licence_acceptances.c.accepted_at), 0.0))
        .where(licence_acceptances.c.user_id == user_id)).one()
    return f"{float(edited)!r}/{int(count)}/{float(accepted)!r}"


def change_marker(conn: Connection) -> tuple:
    """Changes with any catalogue edit or acceptance on this hub: what the long polls' watcher compares."""
    return tuple(conn.execute(sa.select(
        sa.select(sa.func.max(models.c.updated_at)).scalar_subquery(),
        sa.select(sa.func.count()).select_from(licence_acceptances).scalar_subquery(),
        sa.select(sa.func.max(licence_acceptances.c.accepted_at)).scalar_subquery())).one())


def uncatalogued(conn: Connection, now: float) -> list[str]:
    """Models hosts offer right now that the catalogue does not list (candidates for an entry)."""
    q = (sa.select(offers.c.model).distinct().where(offers.c.expires_at > now)
         .where(offers.c.model.not_in(sa.select(models.c.model))).order_by(offers.c.model))
    return list(conn.execute(q).scalars())
