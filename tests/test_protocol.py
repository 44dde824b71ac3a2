"""protocol/: round trips, canonical signatures, and garbage that must never crash a peer."""

from __future__ import annotations

import dataclasses
import struct
import time

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gpunexus.protocol.codec import _REGISTRY, decode, decode_as
from gpunexus.protocol.errors import ProtocolError
from gpunexus.protocol.framing import FrameDecoder, encode_frame
from gpunexus.protocol.ids import b58decode, b58encode, peer_id_from_public_key, public_key_from_peer_id
from gpunexus.protocol.limits import MAX_FRAME_BYTES, PROTOCOL_VERSION
from gpunexus.protocol.messages import Capabilities, Chunk, Error, Offer, Order, OutputHasher, Receipt, Sampling, ChatMessage, Withdraw
from gpunexus.protocol.money import cost_micro, micro_to_usd, usd_to_micro
from gpunexus.protocol.signing import Signer

HOST = Signer(b"\x01" * 32)
GATEWAY = Signer(b"\x02" * 32)


def offer(**changes) -> Offer:
    now = time.time()
    base = Offer(peer_id=HOST.peer_id, model="tiny", model_hash="h", price_micro_per_mtok=200_000, tokens_per_s=50.0, free_slots=2, max_slots=4, max_context=2048, region="eu", license="Apache-2.0", follows_market=False, addrs=("/ip4/127.0.0.1/tcp/4001",), seq=1, issued_at=now, expires_at=now + 10)
    return dataclasses.replace(base, **changes).signed(HOST)


def order(**changes) -> Order:
    base = Order(request_id="ab" * 16, gateway_id=GATEWAY.peer_id, host_id=HOST.peer_id, model="tiny", price_micro_per_mtok=200_000, max_tokens=16, kind="chat", messages=(ChatMessage("user", "hi"),), prompt="", continuation="", sampling=Sampling(0.7, 1.0, 0, ("\n",), 42), allowance=b"", issued_at=time.time())
    return dataclasses.replace(base, **changes).signed(GATEWAY)


def test_libp2p_peer_ids_match():
    from libp2p.crypto.ed25519 import create_new_key_pair
    from libp2p.peer.id import ID

    assert ID.from_pubkey(create_new_key_pair(HOST.seed).public_key).to_base58() == HOST.peer_id
    assert public_key_from_peer_id(HOST.peer_id) == HOST.public_key
    assert peer_id_from_public_key(HOST.public_key) == HOST.peer_id


@given(st.binary(max_size=64))
def test_base58_round_trip(data):
    assert b58decode(b58encode(data)) == data


def test_signed_messages_round_trip_and_verify():
    for msg in (offer(), order(), Withdraw(peer_id=HOST.peer_id, seq=5, issued_at=1.0).signed(HOST)):
        back = decode(msg.encode())
        assert back == msg
        back.verify()


def test_int_in_a_float_field_signs_like_the_float_it_decodes_to():
    o = offer(issued_at=1000, expires_at=1010)
    assert type(o.issued_at) is float
    decode(o.encode()).verify()


def test_tampering_breaks_signatures():
    o = offer()
    for field, value in (("price_micro_per_mtok", 1), ("model", "big"), ("addrs", ("/ip4/6.6.6.6/tcp/1",))):
        with pytest.raises(ProtocolError, match="bad signature"):
            dataclasses.replace(o, **{field: value}).verify()
    with pytest.raises(ValueError, match="not the signer"):
        dataclasses.replace(o, peer_id=GATEWAY.peer_id).signed(HOST)
    forged = dataclasses.replace(o, peer_id=GATEWAY.peer_id)  # HOST's signature, GATEWAY's id
    with pytest.raises(ProtocolError):
        forged.verify()


def test_capabilities_travel_signed_in_the_offer():
    caps = Capabilities(json_mode=True, logprobs=True, top_logprobs=20, max_n=8, embeddings=True)
    o = offer(capabilities=caps)
    back = decode(o.encode())
    assert back.capabilities == caps
    back.verify()
    with pytest.raises(ProtocolError, match="bad signature"):
        dataclasses.replace(o, capabilities=dataclasses.replace(caps, tools=True)).verify()
    assert offer().capabilities == Capabilities()  # plain text unless the backend says more
    for wrong in (dict(top_logprobs=21, logprobs=True), dict(max_n=0), dict(top_logprobs=2)):
        with pytest.raises(ProtocolError):
            decode(dataclasses.replace(o, capabilities=Capabilities(**wrong)).encode())


def test_receipt_countersignature_covers_host_signature():
    r = Receipt(request_id="cd" * 16, host_id=HOST.peer_id, gateway_id=GATEWAY.peer_id, model="tiny", model_hash="h", price_micro_per_mtok=200_000, tokens_in=10, tokens_out=5, cost_micro=cost_micro(15, 200_000), output_hash=b"\0" * 32, prompt_hash=b"\1" * 32, seed=1, finish_reason="stop", commitment=b"", issued_at=1.0)
    both = r.signed(HOST, "host_sig").signed(GATEWAY, "gateway_sig")
    both.verify()
    decode(both.encode()).verify()
    with pytest.raises(ProtocolError, match="missing host_sig"):
        r.verify()
    swapped = dataclasses.replace(both, host_sig=r.signed(HOST, "host_sig").host_sig[:-1] + b"\0")
    with pytest.raises(ProtocolError):
        swapped.verify()
    with pytest.raises(ProtocolError):
        dataclasses.replace(both, tokens_out=6).verify("gateway_sig")


@given(
    text=st.text(max_size=200),
    ids=st.lists(st.integers(0, 2**31 - 1), min_size=1, max_size=50),
)
def test_chunk_round_trip(text, ids):
    chunk = Chunk(text=text, n_tokens=len(ids), token_ids=tuple(ids), logprobs=tuple(-0.5 for _ in ids))
    frames = FrameDecoder().feed(encode_frame(chunk))
    assert decode_as(Chunk, frames[0]) == chunk


@settings(max_examples=300)
@given(st.binary(max_size=512))
def test_garbage_is_a_protocol_error_never_a_crash(data):
    try:
        decode(data)
    except ProtocolError:
        pass


@settings(max_examples=200)
@given(st.lists(st.one_of(st.none(), st.integers(-(2**63), 2**64 - 1), st.text(max_size=10), st.binary(max_size=10), st.floats(), st.lists(st.integers(0, 2**32), max_size=3)), max_size=20))
def test_well_formed_msgpack_with_wrong_shapes_is_rejected(values):
    for kind in ("offer", "order", "chunk", "receipt", "error"):
        try:
            decode(msgpack.packb([kind, 1, *values]))
        except ProtocolError:
            pass


_WIRE_VALUES = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-(2**63), 2**64 - 1), st.floats(), st.text(max_size=40),
              st.binary(max_size=40)),
    lambda inner: st.lists(inner, max_size=6),
    max_leaves=30,
)


@settings(max_examples=400)
@given(kind=st.sampled_from(sorted(_REGISTRY)), data=st.data())
def test_every_message_type_decodes_or_refuses_and_round_trips(kind, data):
    """Any msgpack shaped like a message of any type: a validated message or a ProtocolError, nothing else."""
    cls = _REGISTRY[kind]
    fields = data.draw(st.lists(_WIRE_VALUES, min_size=len(cls._checkers), max_size=len(cls._checkers)))
    try:
        msg = decode(msgpack.packb([kind, PROTOCOL_VERSION, *fields], use_bin_type=True))
    except ProtocolError:
        return
    assert type(msg) is cls and decode(msg.encode()) == msg


def test_specific_malformed_messages():
    good = order().to_wire()
    cases = {
        "unknown type": ["nope", 1],
        "wrong version": [good[0], 99, *good[2:]],
        "missing field": good[:-1],
        "wrong type": [*good[:6], "sixteen", *good[7:]],
        "bool for int": [*good[:6], True, *good[7:]],
    }
    for value in cases.values():
        with pytest.raises(ProtocolError):
            decode(msgpack.packb(value, use_bin_type=True))
    with pytest.raises(ProtocolError, match="extension"):
        decode(msgpack.packb(msgpack.ExtType(1, b"x")))
    with pytest.raises(ProtocolError, match="temperature"):
        decode(dataclasses.replace(order(), sampling=Sampling(5.0, 1.0, 0, (), 1)).encode())
    with pytest.raises(ProtocolError, match="token"):
        decode(Chunk("x", 2, (1,), ()).encode())


def test_frame_decoder_refuses_oversize_before_buffering():
    decoder = FrameDecoder()
    with pytest.raises(ProtocolError, match="exceeds"):
        decoder.feed(struct.pack(">I", MAX_FRAME_BYTES + 1))
    decoder = FrameDecoder()
    frame = encode_frame(Error(code="busy", message="full", retryable=True))
    assert decoder.feed(frame[:3]) == [] and decoder.feed(frame[3:] + frame) == [frame[4:], frame[4:]]


def test_output_hasher_binds_ids_and_text():
    a, b, c = OutputHasher(), OutputHasher(), OutputHasher()
    a.update(Chunk("ab", 2, (97, 98), ()))
    b.update(Chunk("a", 1, (97,), ()))
    b.update(Chunk("b", 1, (98,), ()))
    c.update(Chunk("ab", 2, (97, 99), ()))
    assert a.digest() == b.digest() and a.tokens == b.tokens == 2
    assert a.digest() != c.digest()


def test_money_is_exact():
    assert usd_to_micro("0.20") == 200_000 and usd_to_micro("5") == 5_000_000
    assert micro_to_usd(1_500_001) == "1.500001" and micro_to_usd(-5) == "-0.000005"
    for bad in ("-1", "abc", "0.0000001", "nan", "inf"):
        with pytest.raises(ValueError):
            usd_to_micro(bad)
    assert cost_micro(1, 200_000) == 1  # rounded up: never free
    assert cost_micro(1_000_000, 200_000) == 200_000
    assert cost_micro(0, 200_000) == 0
