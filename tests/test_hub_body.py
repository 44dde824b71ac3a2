"""The hub's body decoder and field specs: every malformed body is a 400 naming its param, nothing else."""

from __future__ import annotations

import base64
import json

import pytest
from gpunexus.hub import bodies, db
from gpunexus.hub.body import MAX_DEPTH, MAX_INT, B64, Body, Int, Nullable, Str, decode_object, nesting_depth
from gpunexus.hub.service import HubError
from hypothesis import given, settings
from hypothesis import strategies as st

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=30,
)


def _depth(value) -> int:
    if isinstance(value, list):
        return 1 + max(map(_depth, value), default=0)
    if isinstance(value, dict):
        return 1 + max(map(_depth, value.values()), default=0)
    return 0


def _outcome(raw: bytes):
    """The decoded object, or the HubError; any other exception fails the test."""
    try:
        return decode_object(raw)
    except HubError as exc:
        assert exc.status == 400 and exc.code == "invalid_json", exc.message
        return exc


@given(JSON)
def test_depth_scan_is_exact_on_json(value):
    for text in (json.dumps(value), json.dumps(value, ensure_ascii=False, indent=1)):
        assert nesting_depth(text.encode()) == _depth(value)


@given(st.dictionaries(st.text(max_size=8), JSON, max_size=4))
def test_valid_objects_decode_to_what_json_reads(obj):
    raw = json.dumps(obj, ensure_ascii=False).encode()
    result = _outcome(raw)
    if _depth(obj) <= MAX_DEPTH:
        assert result == json.loads(raw)


@given(st.binary(max_size=300))
def test_random_bytes_are_a_dict_or_a_400(raw):
    _outcome(raw)


@settings(max_examples=60)
@given(st.integers(0, 100_000), st.sampled_from("[{\"\\ ,:1a"), st.sampled_from("]}\" "), st.binary(max_size=20))
def test_any_nesting_is_a_dict_or_a_400(depth, opener, closer, noise):
    for raw in (b'{"a":' + opener.encode() * depth + noise + closer.encode() * depth + b"}",
                opener.encode() * depth + noise, b'{"a":"' + b"\\" * depth + b'"}'):
        _outcome(raw)


@given(JSON, st.data())
def test_mutated_json_is_a_dict_or_a_400(value, data):
    raw = bytearray(json.dumps({"k": value}, ensure_ascii=False).encode())
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(0, len(raw)))
        raw[at:at] = data.draw(st.binary(min_size=1, max_size=3))
    _outcome(bytes(raw))


@given(st.text(), st.sampled_from(["utf-8", "utf-16", "latin-1", "cp1252"]))
def test_text_in_any_encoding_is_a_dict_or_a_400(text, encoding):
    _outcome(json.dumps({"t": text}, ensure_ascii=False).encode(encoding, "replace"))


@pytest.mark.parametrize("raw, needle", [
    (b'{"a": "\xff"}', "UTF-8"),
    (b'{"a": "\xed\xa0\x80"}', "UTF-8"),  # an encoded surrogate
    (b"[" * 100_000 + b"]" * 100_000, "64 deep"),
    (b'{"a":' + b"[" * 65 + b"]" * 65 + b"}", "64 deep"),
    (b'{"a": NaN}', "not JSON"),
    (b'{"a": Infinity}', "not JSON"),
    (b'{"a": 1' + b"0" * 5000 + b"}", "not JSON"),
    (b"[1]", "JSON object"),
    (b"", "not JSON"),
])
def test_malformed_bodies(raw, needle):
    with pytest.raises(HubError) as exc:
        decode_object(raw)
    assert exc.value.status == 400 and needle in exc.value.message


def test_depth_limit_is_inclusive():
    assert decode_object(b'{"a":' + b"[" * (MAX_DEPTH - 1) + b"]" * (MAX_DEPTH - 1) + b"}")
    assert nesting_depth(b'{"a": "[[[[", "b": "\\"[["}') == 1


def _refused(body: Body, raw: bytes) -> HubError:
    with pytest.raises(HubError) as exc:
        body.parse(raw)
    assert exc.value.status in (400, 413)
    return exc.value


@pytest.mark.parametrize("value", [MAX_INT + 1, -1, 2**64, 1.5, True, "1", [], 1e300])
def test_integers_out_of_range_or_type(value):
    err = _refused(bodies.PAYOUT_SETTINGS, json.dumps({"threshold_micro": value}).encode())
    assert err.param == "threshold_micro"


def test_integers_follow_json_schema():
    assert bodies.PAYOUT_SETTINGS.parse(b'{"threshold_micro": 5.0}')["threshold_micro"] == 5
    assert bodies.PAYOUT_SETTINGS.parse(b'{"threshold_micro": %d}' % MAX_INT)["threshold_micro"] == MAX_INT
    assert Int(0, 100, 10).parse("x", 30) == 30
    with pytest.raises(HubError):
        Int(0, 100, 10).parse("x", 35)


@pytest.mark.parametrize("value", ["é" * 8, "AAA", "AA=A", "A===", "====", "AAAA\n", " AAA", "AA==AA==", 5, None])
def test_base64_errors_name_the_param(value):
    for spec, name in ((bodies.OFFER, "offer"), (bodies.ROOT, "root"), (bodies.receipts(10), "receipts")):
        payload = {name: [value] if name == "receipts" else value}
        assert _refused(spec, json.dumps(payload).encode()).param == name


def test_base64_lengths():
    proof = B64(exact_bytes=64)
    assert proof.parse("proof", base64.b64encode(bytes(64)).decode()) == bytes(64)
    for n in (63, 65, 0):
        with pytest.raises(HubError, match="proof"):
            proof.parse("proof", base64.b64encode(bytes(n)).decode())
    small = B64(3)
    assert small.parse("b", "AAAA") == bytes(3)
    with pytest.raises(HubError):
        small.parse("b", "AAAAAA==")
    with pytest.raises(ValueError):
        B64(4)


def test_strings_length_pattern_and_unicode():
    payout = bodies.PAYOUT_SETTINGS
    assert payout.parse(b'{"connect_account_id": "acct_123"}')["connect_account_id"] == "acct_123"
    for value in ["acct_" + "a" * 100_000, "acct_", "acct_12\n", "bank_123", "acct_\u00e9", 7]:
        assert _refused(payout, json.dumps({"connect_account_id": value}).encode()).param == "connect_account_id"
    assert _refused(bodies.OPENING, b'{"request_id": "' + b"a" * 32 + b'", "opening": null, "reason": "\\ud800"}').param == "reason"
    assert _refused(bodies.OPENING, b'{"request_id": "' + b"a" * 32 + b'", "opening": null, "reason": "a\\u0000"}').param == "reason"


def test_required_null_and_together():
    opening = bodies.OPENING
    assert _refused(opening, b'{"request_id": "' + b"a" * 32 + b'"}').param == "opening"  # required, even if null
    assert opening.parse(b'{"request_id": "' + b"a" * 32 + b'", "opening": null}')["opening"] is None
    assert _refused(bodies.ALLOWANCE, b'{"gateway_id": null}').param == "gateway_id"
    pair = Body({"a": Nullable(Int()), "b": Nullable(Int())}, together=("a", "b"))
    assert pair.parse(b'{"a": 1, "b": 2}') == {"a": 1, "b": 2}
    assert pair.parse(b'{"a": null}') == {"a": None, "b": None}
    assert _refused(pair, b'{"a": 1}').param == "a"


def test_batch_over_the_limit_is_413():
    err = _refused(bodies.receipts(2), json.dumps({"receipts": ["AAAA"] * 3}).encode())
    assert (err.status, err.code, err.param) == (413, "batch_too_large", "receipts")


def test_string_limits_fit_their_columns():
    columns = {bodies.ALLOWANCE.fields["gateway_id"]: db.allowances.c.gateway_id,
               bodies.HOST_REGISTER.fields["peer_id"]: db.hosts.c.peer_id,
               bodies.OPENING.fields["request_id"]: db.audits.c.request_id,
               bodies.PAYOUT_SETTINGS.fields["connect_account_id"].inner: db.users.c.connect_account_id}
    for spec, column in columns.items():
        assert isinstance(spec, Str) and spec.max_length <= column.type.length, column
