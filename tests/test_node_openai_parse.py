"""The gateway's request parsing: what it accepts, and a 400 naming the field for what it does not."""

from __future__ import annotations

import json

import pytest
from gpunexus.node.openai_api import APIError, check_unicode, parse_request


def chat(**extra) -> dict:
    return {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], **extra}


def refused(body: dict, kind: str = "chat") -> APIError:
    with pytest.raises(APIError) as info:
        parse_request(body, kind)
    assert info.value.status == 400
    return info.value


def test_a_message_without_content_is_refused():
    for message in ({"role": "user"}, {"role": "assistant", "content": None}):
        error = refused({"model": "tiny", "messages": [message]})
        assert error.param == "messages[0].content"


def test_empty_content_and_text_parts_are_accepted():
    req = parse_request({"model": "tiny", "messages": [{"role": "user", "content": ""}, {"role": "user", "content": [{"type": "text", "text": "a"}]}]}, "chat")
    assert [m.content for m in req.messages] == ["", "a"]


@pytest.mark.parametrize("message,param", [
    ({"role": "tool", "content": "42", "tool_call_id": "c1"}, "messages[1].role"),
    ({"role": "function", "content": "42", "name": "f"}, "messages[1].role"),
    ({"role": "assistant", "content": None, "tool_calls": [{"id": "c1"}]}, "messages[1].tool_calls"),
])
def test_tool_messages_are_refused_naming_them(message, param):
    error = refused({"model": "tiny", "messages": [{"role": "user", "content": "hi"}, message]})
    assert error.param == param and "tool" in error.message


def test_unknown_message_fields_are_refused_not_dropped():
    error = refused({"model": "tiny", "messages": [{"role": "user", "content": "hi", "name": "bob"}]})
    assert error.param == "messages[0].name"


@pytest.mark.parametrize("raw,param", [
    (b'{"model": "tiny", "messages": [{"role": "user", "content": "a\\ud800b"}]}', "messages[0].content"),
    (b'{"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "stop": ["\\udfff"]}', "stop[0]"),
    (b'{"model": "t\\udbff", "messages": []}', "model"),
])
def test_a_lone_surrogate_is_a_400_naming_where(raw, param):
    with pytest.raises(APIError) as info:
        check_unicode(raw, json.loads(raw))
    assert info.value.status == 400 and info.value.param == param


def test_a_surrogate_pair_is_fine():
    raw = b'{"model": "tiny", "messages": [{"role": "user", "content": "\\ud83d\\ude00"}]}'
    body = json.loads(raw)
    check_unicode(raw, body)
    assert parse_request(body, "chat").messages[0].content == "\U0001F600"
