"""Typed messages, their canonical msgpack encoding and validation on decode.

Each message class is a frozen dataclass registered with :func:`message`. On
the wire a message is a msgpack array ``[type, version, field1, field2, ...]``
in declared field order: compact (no key names in every token chunk) and
canonical (the bytes a signature covers are the same bytes on every peer).

Decoding never trusts the peer: the frame is unpacked with size limits, the
type and version must be known, the arity must match, every field is checked
against its annotation (nested messages recursively), and then the class's own
``check()`` enforces value ranges. Anything else is a :class:`ProtocolError`.

Signed messages name their signature fields in ``SIGNATURES`` as pairs
``(signature field, field holding the signer's peer id)``; a signature covers
every field declared before it, so a countersignature (a gateway signing a
receipt the host already signed) covers the first signature too.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Callable
from typing import Any, ClassVar, TypeVar

import msgpack

from .errors import ProtocolError
from .limits import MAX_FRAME_BYTES, PROTOCOL_VERSION
from .signing import Signer, verify_signature

_INT_MIN, _INT_MAX = -(2**63), 2**64 - 1

M = TypeVar("M", bound="Message")
_REGISTRY: dict[str, type[Message]] = {}


class Message:
    """Base of every wire message; see the module docstring."""

    TYPE: ClassVar[str]
    SIGNATURES: ClassVar[tuple[tuple[str, str], ...]] = ()
    _checkers: ClassVar[tuple[tuple[str, Callable[[Any], Any]], ...]]
    _float_fields: ClassVar[tuple[str, ...]]

    def __post_init__(self) -> None:
        # msgpack encodes 1 and 1.0 differently; a decoded float field is always a float,
        # so one built with an int must become one too, or its signature would not survive a round trip.
        for name in self._float_fields:
            value = getattr(self, name)
            if type(value) is int:
                object.__setattr__(self, name, float(value))

    def check(self) -> None:
        """Value-range checks beyond types; subclasses raise ProtocolError."""

    # --- encoding -------------------------------------------------------
    def to_wire(self) -> list[Any]:
        return [self.TYPE, PROTOCOL_VERSION, *(_to_wire(getattr(self, n)) for n, _ in self._checkers)]

    def encode(self) -> bytes:
        return msgpack.packb(self.to_wire(), use_bin_type=True)

    @classmethod
    def from_wire(cls: type[M], value: Any) -> M:
        if not isinstance(value, list) or len(value) < 2:
            raise ProtocolError(f"{cls.TYPE}: expected an array")
        if value[0] != cls.TYPE:
            raise ProtocolError(f"expected {cls.TYPE}, got {value[0]!r}")
        return _build(cls, value)

    # --- signatures -----------------------------------------------------
    def signing_bytes(self, signature_field: str) -> bytes:
        names = [n for n, _ in self._checkers]
        covered = names[: names.index(signature_field)]
        body = [_to_wire(getattr(self, n)) for n in covered]
        prefix = f"gpunexus/{self.TYPE}/{PROTOCOL_VERSION}/{signature_field}\n".encode()
        return prefix + msgpack.packb(body, use_bin_type=True)

    def signed(self: M, signer: Signer, signature_field: str | None = None) -> M:
        """A copy signed by ``signer`` in ``signature_field`` (default: the first)."""
        field, id_field = self._signature_pair(signature_field)
        if getattr(self, id_field) != signer.peer_id:
            raise ValueError(f"{self.TYPE}.{id_field} is not the signer's peer id")
        return dataclasses.replace(self, **{field: signer.sign(self.signing_bytes(field))})

    def verify(self, signature_field: str | None = None) -> None:
        """Raise ProtocolError unless the named (default: every) signature holds."""
        pairs = [self._signature_pair(signature_field)] if signature_field else self.SIGNATURES
        for field, id_field in pairs:
            sig = getattr(self, field)
            if not sig:
                raise ProtocolError(f"{self.TYPE}: missing {field}")
            verify_signature(getattr(self, id_field), self.signing_bytes(field), sig)

    def _signature_pair(self, signature_field: str | None) -> tuple[str, str]:
        if not self.SIGNATURES:
            raise TypeError(f"{self.TYPE} is not a signed message")
        if signature_field is None:
            return self.SIGNATURES[0]
        for pair in self.SIGNATURES:
            if pair[0] == signature_field:
                return pair
        raise KeyError(signature_field)


def message(cls: type[M]) -> type[M]:
    """Class decorator: make ``cls`` a frozen, slotted, registered wire message."""
    cls = dataclasses.dataclass(frozen=True, slots=True)(cls)
    hints = typing.get_type_hints(cls)
    cls._checkers = tuple((f.name, _checker(hints[f.name], f"{cls.TYPE}.{f.name}")) for f in dataclasses.fields(cls))
    cls._float_fields = tuple(f.name for f in dataclasses.fields(cls) if hints[f.name] is float)
    if cls.TYPE in _REGISTRY:
        raise TypeError(f"duplicate message type {cls.TYPE}")
    _REGISTRY[cls.TYPE] = cls
    return cls


def decode(data: bytes) -> Message:
    """Decode one frame body into a validated message, or raise ProtocolError."""
    if len(data) > MAX_FRAME_BYTES:
        raise ProtocolError("frame too large")
    try:
        value = msgpack.unpackb(data, raw=False, use_list=True, strict_map_key=True, ext_hook=_no_ext)
    except ProtocolError:
        raise
    except Exception as exc:  # msgpack raises a zoo of types for garbage
        raise ProtocolError(f"malformed msgpack: {type(exc).__name__}") from None
    if not isinstance(value, list) or len(value) < 2 or not isinstance(value[0], str):
        raise ProtocolError("a message is an array starting with its type")
    cls = _REGISTRY.get(value[0])
    if cls is None:
        raise ProtocolError(f"unknown message type {value[0][:40]!r}")
    return _build(cls, value)


def decode_as(cls: type[M], data: bytes) -> M:
    """Decode and insist on one message class (an Error raises its own ProtocolError)."""
    msg = decode(data)
    if not isinstance(msg, cls):
        raise ProtocolError(f"expected {cls.TYPE}, got {msg.TYPE}")
    return msg


def _build(cls: type[M], value: list[Any]) -> M:
    if value[1] != PROTOCOL_VERSION:
        raise ProtocolError(f"{cls.TYPE}: unsupported version {value[1]!r}")
    fields = value[2:]
    if len(fields) != len(cls._checkers):
        raise ProtocolError(f"{cls.TYPE}: expected {len(cls._checkers)} fields, got {len(fields)}")
    kwargs = {name: check(v) for (name, check), v in zip(cls._checkers, fields)}
    msg = cls(**kwargs)
    msg.check()
    return msg


def _no_ext(code: int, data: bytes) -> Any:
    raise ProtocolError("msgpack extension types are not allowed")


def _to_wire(value: Any) -> Any:
    if isinstance(value, Message):
        return value.to_wire()
    if isinstance(value, tuple):
        return [_to_wire(v) for v in value]
    return value


def _checker(hint: Any, where: str) -> Callable[[Any], Any]:
    """Build a function that validates (and normalises) one decoded field."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(hint) if a is not type(None)]
        inner = _checker(options[0], where)
        return lambda v: None if v is None else inner(v)
    if origin is tuple:
        item = _checker(typing.get_args(hint)[0], where)

        def check_tuple(v: Any) -> tuple[Any, ...]:
            if not isinstance(v, list):
                raise ProtocolError(f"{where}: expected an array")
            return tuple(item(x) for x in v)

        return check_tuple
    if isinstance(hint, type) and issubclass(hint, Message):
        return lambda v: hint.from_wire(v)
    if hint is bool:
        return lambda v: v if isinstance(v, bool) else _bad(where, "a boolean")
    if hint is int:
        return lambda v: v if type(v) is int and _INT_MIN <= v <= _INT_MAX else _bad(where, "an integer")
    if hint is float:
        return lambda v: float(v) if type(v) in (int, float) and math.isfinite(v) else _bad(where, "a finite number")
    if hint is str:
        return lambda v: v if isinstance(v, str) else _bad(where, "a string")
    if hint is bytes:
        return lambda v: v if isinstance(v, bytes) else _bad(where, "bytes")
    raise TypeError(f"{where}: unsupported field type {hint!r}")


def _bad(where: str, what: str) -> Any:
    raise ProtocolError(f"{where}: expected {what}")
