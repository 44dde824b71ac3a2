"""The gateway's request parsing: what it accepts, and a 400 naming the field for what it does not."""

from __future__ import annotations

import json

import pytest
from gpunexus.node.gateway.openai_api import APIError, check_unicode, parse_request


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
    ({"role": "tool", "content": "42"}, "messages[1].tool_call_id"),
    ({"role": "function", "content": "42", "name": "f"}, "messages[1].role"),
    ({"role": "assistant", "content": None, "tool_calls": [{"id": "c1"}]}, "messages[1].tool_calls[0]"),
    ({"role": "assistant", "content": None, "tool_calls": []}, "messages[1].tool_calls"),
    ({"role": "user", "content": "hi", "tool_call_id": "c1"}, "messages[1].tool_call_id"),
    ({"role": "assistant", "content": [{"type": "image_url", "image_url": {"url": "data:,"}}]}, "messages[1].content[0]"),
])
def test_malformed_tool_turns_are_refused_naming_them(message, param):
    error = refused({"model": "tiny", "messages": [{"role": "user", "content": "hi"}, message]})
    assert error.param == param


CALL = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather now",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}


def test_a_tool_conversation_travels_verbatim_for_the_engine():
    turns = [{"role": "user", "content": "Weather in Oslo?"}, {"role": "assistant", "content": None, "tool_calls": [CALL]},
             {"role": "tool", "tool_call_id": "call_1", "content": "12 C, rain"}]
    req = parse_request({"model": "m", "messages": turns, "tools": [WEATHER], "tool_choice": "auto", "parallel_tool_calls": False}, "chat")
    assert req.needs.tools and not req.needs.vision
    assert json.loads(req.upstream) == {"messages": turns, "tools": [WEATHER], "tool_choice": "auto", "parallel_tool_calls": False}
    assert [m.role for m in req.messages] == ["user", "assistant", "tool"]
    assert "get_weather" in req.messages[1].content and req.messages[2].content == "12 C, rain"


def test_plain_text_carries_no_upstream_fields():
    assert parse_request(chat(), "chat").upstream == b""
    assert parse_request(chat(response_format={"type": "json_object"}), "chat").upstream == b""


def test_a_json_schema_and_images_go_to_the_engine():
    fmt = {"type": "json_schema", "json_schema": {"name": "answer", "schema": {"type": "object"}, "strict": True}}
    image = [{"type": "text", "text": "what is it"}, {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]
    req = parse_request({"model": "m", "messages": [{"role": "user", "content": image}], "response_format": fmt}, "chat")
    assert req.needs.json_schema and req.needs.vision
    assert json.loads(req.upstream) == {"messages": [{"role": "user", "content": image}], "response_format": fmt}
    assert req.messages[0].content == "what is it"


@pytest.mark.parametrize("extra,param", [
    ({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "tools[0].function.name"),
    ({"tools": [{"type": "retrieval"}]}, "tools[0]"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "other"}}}, "tool_choice"),
    ({"tools": [WEATHER], "tool_choice": "sometimes"}, "tool_choice"),
    ({"tool_choice": "auto"}, "tool_choice"),
    ({"tools": [WEATHER], "parallel_tool_calls": "yes"}, "parallel_tool_calls"),
    ({"functions": [{"name": "f"}]}, "functions"),
    ({"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": []}}}, "response_format.json_schema.schema"),
])
def test_malformed_tool_parameters_are_refused_naming_them(extra, param):
    assert refused(chat(**extra)).param == param


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


def test_an_unknown_parameter_is_refused_as_openai_refuses_it():
    error = refused(chat(frobnicate=1))
    assert error.param == "frobnicate" and "Unrecognized request argument" in error.message
    assert refused({"model": "tiny", "prompt": "x", "messages": []}, "completion").param == "messages"


@pytest.mark.parametrize("extra,param", [
    ({"echo": True, "logprobs": 1}, "echo"), ({"suffix": "end"}, "suffix"), ({"best_of": 3}, "best_of"),
    ({"prompt": [[1, 2], []]}, "prompt"), ({"prompt": [1, "a"]}, "prompt"), ({"prompt": ["a"] * 65, "n": 2}, "n"),
    ({"prompt": []}, "prompt"), ({"prompt": [-1]}, "prompt"),
])
def test_completion_parameters_the_gateway_cannot_honour_are_refused(extra, param):
    assert refused({"model": "tiny", "prompt": "x", **extra}, "completion").param == param


def test_parameters_some_hosts_honour_become_needs():
    req = parse_request(chat(logprobs=True, top_logprobs=3, n=2, presence_penalty=0.5, logit_bias={"65": 5},
                             response_format={"type": "json_object"}), "chat")
    assert (req.logprobs, req.top_logprobs, req.n, req.presence_penalty, req.logit_bias, req.json_mode) == (True, 3, 2, 0.5, ((65, 5.0),), True)
    assert req.needs.logprobs and req.needs.top_logprobs == 3 and req.needs.n == 2
    assert req.needs.penalties and req.needs.logit_bias and req.needs.json_mode and not req.needs.tools
    assert parse_request(chat(tools=[{"type": "function", "function": {"name": "f"}}]), "chat").needs.tools
    image = [{"type": "text", "text": "what is it"}, {"type": "image_url", "image_url": {"url": "data:,"}}]
    assert parse_request({"model": "tiny", "messages": [{"role": "user", "content": image}]}, "chat").needs.vision
    completion = parse_request({"model": "tiny", "prompt": "x", "logprobs": 2}, "completion")
    assert completion.logprobs and completion.top_logprobs == 2
    assert parse_request(chat(logprobs=False, presence_penalty=0, response_format={"type": "text"}), "chat").needs.plain


def test_top_logprobs_needs_logprobs():
    assert refused(chat(top_logprobs=2)).param == "top_logprobs"


def test_completions_batch_prompts_and_echo():
    req = parse_request({"model": "tiny", "prompt": ["a", "b", "c"], "n": 2, "echo": True}, "completion")
    assert req.batch == ("a", "b", "c") and req.prompt == "a" and req.choices == 6 and req.echo
    one = parse_request({"model": "tiny", "prompt": ["only"]}, "completion")
    assert one.batch == () and one.prompt == "only" and one.choices == 1 and not one.echo


def test_token_id_prompts_are_kept_for_the_gateway_to_resolve():
    one = parse_request({"model": "tiny", "prompt": [72, 105]}, "completion")
    assert one.prompt_ids == ((72, 105),) and one.prompt == "" and one.choices == 1
    two = parse_request({"model": "tiny", "prompt": [[72], [66, 121, 101]], "n": 2}, "completion")
    assert two.prompt_ids == ((72,), (66, 121, 101)) and two.choices == 4

