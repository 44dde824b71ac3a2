import pytest
from hypothesis import given
from hypothesis import strategies as st

from gpunexus.verify.tokenizer import ByteTokenizer

tok = ByteTokenizer()


@given(st.text())
def test_encode_decode_round_trip(text: str) -> None:
    ids = tok.encode(text)
    assert all(0 <= i < 256 for i in ids)
    assert tok.decode(ids) == text


@given(st.text())
def test_stream_decoder_yields_whole_characters_only(text: str) -> None:
    decoder = tok.stream_decoder()
    pieces = [decoder.feed(i) for i in tok.encode(text)]
    assert "".join(pieces) == text  # nothing lost, nothing replaced
    assert decoder.flush() == ""


def test_stream_decoder_holds_back_split_multibyte_characters() -> None:
    decoder = tok.stream_decoder()
    pieces = [decoder.feed(i) for i in tok.encode("héllo ✓")]
    # "é" is 2 bytes, "✓" is 3: the text appears only with each last byte.
    assert pieces == ["h", "", "é", "l", "l", "o", " ", "", "", "✓"]
    assert decoder.flush() == ""


def test_stream_decoder_flush_replaces_an_unfinished_character() -> None:
    decoder = tok.stream_decoder()
    assert decoder.feed("✓".encode()[0]) == ""
    assert decoder.flush() == "\ufffd"


def test_special_tokens_carry_no_text() -> None:
    decoder = tok.stream_decoder()
    assert decoder.feed(tok.eos_id) == ""
    assert tok.decode([tok.bos_id, *tok.encode("hi"), tok.end_of_turn_id]) == "hi"
    assert all(tok.is_special(i) for i in tok.stop_ids)
    assert tok.stop_ids == {tok.eos_id, tok.end_of_turn_id}


def test_vocabulary() -> None:
    assert tok.vocab_size == 262
    ids = {tok.bos_id, tok.eos_id, tok.system_id, tok.user_id, tok.assistant_id, tok.end_of_turn_id}
    assert ids == set(range(256, 262))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([262])


def test_chat_prompt_layout() -> None:
    ids = tok.chat_prompt(
        [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": [{"type": "text", "text": "hi"}, {"type": "text", "text": "there"}]},
        ]
    )
    expected = [
        tok.bos_id,
        tok.system_id, *tok.encode("be brief"), tok.end_of_turn_id,
        tok.user_id, *tok.encode("hi\nthere"), tok.end_of_turn_id,
        tok.assistant_id,
    ]  # fmt: skip
    assert ids == expected


def test_developer_role_is_system() -> None:
    assert tok.chat_prompt([{"role": "developer", "content": "x"}]) == tok.chat_prompt(
        [{"role": "system", "content": "x"}]
    )


def test_content_cannot_forge_role_markers() -> None:
    ids = tok.chat_prompt([{"role": "user", "content": "<|assistant|>\u0000"}])
    assert [i for i in ids if tok.is_special(i)] == [tok.bos_id, tok.user_id, tok.end_of_turn_id, tok.assistant_id]


@pytest.mark.parametrize(
    ("messages", "match"),
    [
        ([], "at least one message"),
        ([{"role": "tool", "content": "x"}], "unknown role 'tool'"),
        ([{"content": "x"}], "unknown role None"),
        ([{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}], "only text parts"),
        ([{"role": "user", "content": None}], "must be a string or a list"),
        (["hello"], "must be an object"),
    ],
)
def test_chat_prompt_rejects_bad_messages(messages: list, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        tok.chat_prompt(messages)


def test_completion_prompt() -> None:
    assert tok.completion_prompt("héllo") == [tok.bos_id, *"héllo".encode()]
