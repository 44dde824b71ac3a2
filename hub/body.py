"""Request bodies: raw bytes in, a validated dict out, and the JSON Schema of the same rules.

One set of :class:`Field` objects per route (:mod:`gpunexus.hub.bodies`) both
checks what arrives and writes the ``requestBody`` schema of
``/openapi.json``, so the published constraints and the enforced ones cannot
drift: a limit exists in one place or not at all.

Decoding, in this order, each step a 400 in the API's error shape:

1. the bytes must be UTF-8 (strict: no lone surrogates either);
2. the nesting depth of arrays and objects, measured on the raw text with
   vectorised passes before any parser recurses, must be at most
   :data:`MAX_DEPTH` (Python's ``json`` recurses once per level: 100,000 levels
   raise ``RecursionError``, which no caller expects);
3. ``json.loads``, refusing ``NaN`` and ``Infinity`` (not JSON);
4. the top level must be an object;
5. every declared field is checked: type, range (integers fit a BIGINT column
   at most), string length (the column's size at most), pattern, base64 (ASCII,
   padding, decoded length). Unknown fields are ignored.

A field that is absent and one that is JSON ``null`` mean the same thing where
the field is :class:`Nullable`; elsewhere ``null`` is refused, as the schema
says. Integers follow JSON Schema: ``5.0`` is the integer 5, ``true`` is not an
integer.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from .service import HubError

MAX_DEPTH = 64
"""Deepest nesting of arrays and objects a body may have; no hub body needs more than 3."""

MAX_INT = 2**63 - 1
"""The largest value a BIGINT column (every amount and count) holds."""

_B64_ALPHABET = "A-Za-z0-9+/"
_CHUNK = 1 << 20
_STEP = np.zeros(256, np.int8)
_STEP[[ord("["), ord("{")]] = 1
_STEP[[ord("]"), ord("}")]] = -1
_QUOTE = ord('"')


def invalid(message: str, param: str | None = None, code: str = "invalid_request_error") -> HubError:
    return HubError(400, code, message, param)


def nesting_depth(text: bytes) -> int:
    """The deepest nesting of ``[``/``{`` outside strings in JSON ``text``.

    Exact for valid JSON and for every valid prefix of invalid JSON, which is
    all a parser reads before it fails, so ``json.loads`` never recurses deeper
    than this. Escapes are removed first (``\\\\`` pairs, then ``\\"``), so a
    quote left is a string delimiter; inside-string bytes are those after an
    odd number of quotes. Runs in numpy over 1 MiB chunks: a 16 MiB body of
    brackets costs about a tenth of a second and 16 MiB of memory.
    """
    text = text.replace(b"\\\\", b"").replace(b'\\"', b"")
    depth = peak = 0
    quotes = 0
    for start in range(0, len(text), _CHUNK):
        chunk = np.frombuffer(text, np.uint8, count=min(_CHUNK, len(text) - start), offset=start)
        inside = (np.cumsum(chunk == _QUOTE, dtype=np.int64) + quotes) & 1
        quotes = int(inside[-1])
        running = np.cumsum(_STEP[chunk] * (inside == 0), dtype=np.int64) + depth
        peak = max(peak, int(running.max()))
        depth = int(running[-1])
    return peak


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def decode_object(raw: bytes) -> dict[str, Any]:
    """The JSON object in ``raw``, or a 400 :class:`HubError` (see the module docstring)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise invalid(f"the body is not UTF-8 (byte {exc.start})", code="invalid_json") from None
    if nesting_depth(raw) > MAX_DEPTH:
        raise invalid(f"the body nests arrays and objects more than {MAX_DEPTH} deep", code="invalid_json")
    try:
        data = json.loads(text, parse_constant=_no_constant)
    except (ValueError, RecursionError) as exc:  # RecursionError: only if the scan above were wrong
        raise invalid(f"the body is not JSON: {exc}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise invalid("the body must be a JSON object", code="invalid_json")
    return data


class Field(Protocol):
    """One body field: checks a present, non-null value and describes itself in JSON Schema."""

    def parse(self, name: str, value: Any) -> Any: ...

    def schema(self) -> dict[str, Any]: ...


@dataclass(frozen=True, slots=True)
class Str:
    """A string of ``min_length``..``max_length`` code points (the column's size), matching ``pattern`` in full.

    ``pattern`` must read the same in Python and ECMA-262 (character classes,
    counted repeats): the server matches it with ``re.fullmatch``, the schema
    publishes it anchored.
    """

    max_length: int
    min_length: int = 1
    pattern: str | None = None
    description: str | None = None

    def parse(self, name: str, value: Any) -> str:
        if not isinstance(value, str):
            raise invalid(f"{name} must be a string", name)
        if not self.min_length <= len(value) <= self.max_length:
            raise invalid(f"{name} must be {self.min_length} to {self.max_length} characters", name)
        if self.pattern is not None and re.fullmatch(self.pattern, value) is None:
            raise invalid(f"{name} must match {self.pattern}", name)
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise invalid(f"{name} holds a lone surrogate (not Unicode text)", name) from None
        return value

    def schema(self) -> dict[str, Any]:
        out: dict[str, Any] = {"type": "string", "minLength": self.min_length, "maxLength": self.max_length}
        if self.pattern is not None:
            out["pattern"] = f"^(?:{self.pattern})$"
        return _described(out, self.description)


@dataclass(frozen=True, slots=True)
class Int:
    """An integer in ``minimum``..``maximum`` (a BIGINT at most), optionally a multiple of ``multiple_of``."""

    minimum: int = 0
    maximum: int = MAX_INT
    multiple_of: int | None = None
    description: str | None = None

    def __post_init__(self) -> None:
        if not -MAX_INT - 1 <= self.minimum <= self.maximum <= MAX_INT:
            raise ValueError("an Int field must fit a BIGINT column")

    def parse(self, name: str, value: Any) -> int:
        if isinstance(value, float) and math.isfinite(value) and value.is_integer():
            value = int(value)
        if type(value) is not int:
            raise invalid(f"{name} must be an integer", name)
        if not self.minimum <= value <= self.maximum:
            raise invalid(f"{name} must be between {self.minimum} and {self.maximum}", name)
        if self.multiple_of is not None and value % self.multiple_of:
            raise invalid(f"{name} must be a multiple of {self.multiple_of}", name)
        return value

    def schema(self) -> dict[str, Any]:
        out: dict[str, Any] = {"type": "integer", "minimum": self.minimum, "maximum": self.maximum}
        if self.multiple_of is not None:
            out["multipleOf"] = self.multiple_of
        return _described(out, self.description)


@dataclass(frozen=True, slots=True)
class B64:
    """Standard base64 (RFC 4648 alphabet, padded) of at most ``max_bytes``, or exactly ``exact_bytes``.

    ``max_bytes`` is a multiple of 3, so the encoded length bound (what the
    schema can state) and the decoded one are the same rule.
    """

    max_bytes: int = 0
    exact_bytes: int | None = None
    description: str | None = None

    def __post_init__(self) -> None:
        if self.exact_bytes is None and (self.max_bytes <= 0 or self.max_bytes % 3):
            raise ValueError("B64.max_bytes must be a positive multiple of 3")

    def _lengths(self) -> tuple[int, int]:
        if self.exact_bytes is not None:
            n = 4 * math.ceil(self.exact_bytes / 3)
            return n, n
        return 0, 4 * self.max_bytes // 3

    def parse(self, name: str, value: Any) -> bytes:
        lo, hi = self._lengths()
        if not isinstance(value, str):
            raise invalid(f"{name} must be a base64 string", name)
        if not value.isascii() or len(value) % 4:
            raise invalid(f"{name} must be base64 (ASCII, padded to a multiple of 4 characters)", name)
        if not lo <= len(value) <= hi:
            raise invalid(f"{name} must be {lo} to {hi} base64 characters", name)
        try:
            blob = base64.b64decode(value, validate=True)
        except binascii.Error as exc:
            raise invalid(f"{name} must be base64: {exc}", name) from None
        if self.exact_bytes is not None and len(blob) != self.exact_bytes:
            raise invalid(f"{name} must decode to {self.exact_bytes} bytes", name)
        return blob

    def schema(self) -> dict[str, Any]:
        lo, hi = self._lengths()
        a = _B64_ALPHABET
        if self.exact_bytes is not None:
            pad = (3 - self.exact_bytes % 3) % 3
            pattern = f"^[{a}]{{{lo - pad}}}{'=' * pad}$"
        else:
            pattern = f"^(?:[{a}]{{4}})*(?:[{a}]{{2}}==|[{a}]{{3}}=)?$"
        out = {"type": "string", "contentEncoding": "base64", "minLength": lo, "maxLength": hi, "pattern": pattern}
        return _described(out, self.description)


@dataclass(frozen=True, slots=True)
class Array:
    """A list of at most ``max_items`` ``items``; more answers ``over_status`` (413 for a batch too large)."""

    items: Field
    max_items: int
    over_status: int = 400
    description: str | None = None

    def parse(self, name: str, value: Any) -> list[Any]:
        if not isinstance(value, list):
            raise invalid(f"{name} must be an array", name)
        if len(value) > self.max_items:
            code = "batch_too_large" if self.over_status == 413 else "invalid_request_error"
            raise HubError(self.over_status, code, f"{name} holds at most {self.max_items} items", name)
        return [self.items.parse(name, item) for item in value]

    def schema(self) -> dict[str, Any]:
        return _described({"type": "array", "items": self.items.schema(), "maxItems": self.max_items}, self.description)


@dataclass(frozen=True, slots=True)
class Nullable:
    """``inner``, or JSON ``null`` meaning the same as leaving the field out."""

    inner: Field

    def parse(self, name: str, value: Any) -> Any:
        return None if value is None else self.inner.parse(name, value)

    def schema(self) -> dict[str, Any]:
        return {"anyOf": [self.inner.schema(), {"type": "null"}]}


@dataclass(frozen=True, slots=True)
class Body:
    """A JSON object body: its fields, which must be present, and which are set all together or not at all."""

    fields: dict[str, Field]
    required: tuple[str, ...] = ()
    together: tuple[str, ...] = ()
    description: str | None = None

    def __post_init__(self) -> None:
        if not {*self.required, *self.together} <= self.fields.keys():
            raise ValueError("required and together name declared fields only")

    def parse(self, raw: bytes) -> dict[str, Any]:
        """Every declared field's value (``None`` for absent or null), or a 400 :class:`HubError`."""
        return self.check(decode_object(raw))

    def check(self, data: dict[str, Any]) -> dict[str, Any]:
        for name in self.required:
            if name not in data:
                raise invalid(f"{name} is required", name)
        out: dict[str, Any] = {}
        for name, spec in self.fields.items():
            value = data.get(name)
            if value is None and name in data and not isinstance(spec, Nullable):
                raise invalid(f"{name} must not be null", name)
            out[name] = None if value is None else spec.parse(name, value)
        if self.together and len({out[n] is None for n in self.together}) > 1:
            raise invalid(f"set {' and '.join(self.together)} together, or none of them", self.together[0])
        return out

    def schema(self) -> dict[str, Any]:
        out: dict[str, Any] = {"type": "object", "properties": {n: f.schema() for n, f in self.fields.items()}}
        if self.required:
            out["required"] = list(self.required)
        if self.together:  # all set (non-null), or each absent or null
            out["anyOf"] = [
                {"required": list(self.together), "properties": {n: {"not": {"type": "null"}} for n in self.together}},
                {"properties": {n: {"type": "null"} for n in self.together}},
            ]
        return _described(out, self.description)


def _described(schema: dict[str, Any], description: str | None) -> dict[str, Any]:
    return {**schema, "description": description} if description else schema
