"""The two SSE hot paths give what their general paths give.

The gateway writes a plain text delta by splicing the escaped text between
pre-encoded bytes: those must be the bytes ``json.dumps`` writes for the
whole chunk. The host reads most upstream events by slicing the text out of a
learned template: the tokens, counts, usage, finish and errors must be those
of parsing every event in full.
"""

from __future__ import annotations

import json
import random

import pytest
from gpunexus.node.backends.base import Token
from gpunexus.node.backends.openai_upstream import _Events
from gpunexus.node.gateway.openai_api import parse_request
from gpunexus.node.gateway.openai_shapes import ResponseShaper
from hypothesis import given, settings
from hypothesis import strategies as st

TRICKY = ("plain", 'say "hi"', "line\nbreak\ttab\\", "back\\slash\\", "café", "日本語", "😀", "a😀b\u200d🎉", "\ud83d\ude00",
          "\x00\x1f\x7f", "</script>&<", "\u2028\u2029", "\ufffd", " ", "{}", '","x":"', "")
"""Text needing every kind of escape: quotes, control characters, non-ASCII, astral emoji, a surrogate pair spelt as such."""


def shaper(kind: str, *, usage: bool = False, n: int = 1) -> ResponseShaper:
    body = {"model": "org/model \"q\" é", "stream": True, "n": n}
    if usage:
        body["stream_options"] = {"include_usage": True}
    body.update({"messages": [{"role": "user", "content": "hi"}]} if kind == "chat" else {"prompt": "hi"})
    return ResponseShaper(parse_request(body, kind), "abc123")


def general(s: ResponseShaper, index: int, text: str) -> bytes:
    """The chunk of one plain delta as OpenAI shapes it, encoded whole by json.dumps."""
    if s.chat:
        obj = {"id": s.id, "object": "chat.completion.chunk", "created": s.created, "model": s.request.model, "system_fingerprint": None,
               "choices": [{"index": index, "delta": {"content": text}, "logprobs": None, "finish_reason": None}]}
    else:
        obj = {"id": s.id, "object": "text_completion", "created": s.created, "model": s.request.model,
               "choices": [{"text": text, "index": index, "logprobs": None, "finish_reason": None}]}
    if s.request.include_usage:
        obj["usage"] = None
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


@pytest.mark.parametrize("kind", ["chat", "completion"])
@pytest.mark.parametrize("usage", [False, True])
def test_pre_encoded_deltas_are_the_bytes_of_the_general_encoding(kind, usage):
    s = shaper(kind, usage=usage, n=2)
    for index in (1, 0):
        opening = s.sse_delta(index, TRICKY[0])
        assert opening.endswith(general(s, index, TRICKY[0]))
        for text in TRICKY:
            event = s.sse_delta(index, text)
            assert event == general(s, index, text)
            assert json.loads(event[len(b"data: "):]) == json.loads(general(s, index, text)[len(b"data: "):])


def test_a_tool_call_delta_after_plain_text_keeps_its_own_shape():
    s = shaper("chat")
    s.sse_delta(0, "a")
    call = {"index": 0, "id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{\"x\""}}
    chunk = json.loads(s.sse_delta(0, "b", tool_calls=[call])[len(b"data: "):])
    assert chunk["choices"] == [{"index": 0, "delta": {"content": "b", "tool_calls": [call]}, "logprobs": None, "finish_reason": None}]
    assert s.sse_delta(0, "c") == general(s, 0, "c")


class _Sink:
    def __init__(self) -> None:
        self.tokens: list[Token] = []

    def send_nowait(self, token: Token) -> None:
        self.tokens.append(token)


def run(reads: list[bytes], *, chat: bool = True, learn: bool = True, logprobs: bool = False):
    """What an ``_Events`` makes of ``reads``: its tokens and counts, or the exception it raised; and whether it learned."""
    sink = _Sink()
    events = _Events(chat, sink, logprobs=logprobs)
    if not learn:
        events._learns = 0
    try:
        for data in reads:
            events.feed(data)
    except ValueError as exc:
        return ("raised", type(exc).__name__, len(sink.tokens)), events._head is not None
    return (sink.tokens, events.produced, events.prompt_tokens, events.completion_tokens, events.finish_reason), events._head is not None


def same_as_full_parse(reads: list[bytes], **kw) -> bool:
    """Assert the template path gives what parsing every event in full gives; whether it learned a template."""
    fast, learned = run(reads, **kw)
    full, _ = run(reads, learn=False, **kw)
    assert fast == full
    return learned


def cut(stream: bytes, rng: random.Random) -> list[bytes]:
    """The stream as reads of random sizes, cutting events anywhere."""
    reads, at = [], 0
    while at < len(stream):
        step = rng.randint(1, 80)
        reads.append(stream[at:at + step])
        at += step
    return reads


def vllm(text, finish=None, **extra) -> dict:
    return {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "m",
            "choices": [{"index": 0, "delta": {"content": text, **extra}, "logprobs": None, "finish_reason": finish}]}


def llamacpp(text, finish=None) -> dict:
    return {"choices": [{"finish_reason": finish, "index": 0, "delta": {"content": text}}], "created": 1, "id": "chatcmpl-2",
            "model": "tok", "object": "chat.completion.chunk"}


def ollama(text, finish=None) -> dict:
    return {"id": "chatcmpl-3", "object": "chat.completion.chunk", "created": 1, "model": "llama3", "system_fingerprint": "fp_ollama",
            "choices": [{"index": 0, "delta": {"role": "assistant", "content": text}, "finish_reason": finish}]}


def completion(text, finish=None) -> dict:
    return {"id": "cmpl-4", "object": "text_completion", "created": 1, "model": "m",
            "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": finish}]}


def sse(objs, *, compact: bool = True, ascii: bool = False) -> bytes:
    seps = (",", ":") if compact else (", ", ": ")
    return b"".join(b"data: " + json.dumps(o, separators=seps, ensure_ascii=ascii).encode() + b"\n\n" for o in objs) + b"data: [DONE]\n\n"


TEXTS = ["tok", " the", "tok", "\n", ' "q"', " café", "😀", "日本", "\\", "tok", "\t", " end"]


@pytest.mark.parametrize("shape", [vllm, llamacpp, ollama, completion])
@pytest.mark.parametrize("compact,ascii", [(True, False), (False, True)])
def test_the_template_path_reads_each_engines_stream_as_the_full_parse(shape, compact, ascii):
    rng = random.Random(7)
    objs = [shape(t) for t in TEXTS] + [shape("last", "stop"), {"id": "x", "choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 14}}]
    stream = sse(objs, compact=compact, ascii=ascii)
    chat = shape is not completion
    for reads in ([stream], cut(stream, rng), cut(stream, rng), [bytes([b]) for b in stream]):
        assert same_as_full_parse(reads, chat=chat)


def test_tool_calls_role_deltas_and_a_changed_shape_take_the_full_parse():
    call = [{"index": 0, "id": "call_1", "type": "function", "function": {"name": "f", "arguments": ""}}]
    args = [{"index": 0, "function": {"arguments": '{"x": 1}'}}]
    objs = [vllm("", role="assistant"), vllm("a"), vllm("b"), vllm("c", tool_calls=call), vllm(None, tool_calls=args),
            llamacpp("d"), llamacpp("e"), vllm("f"), vllm("g", "length"), vllm("h")]
    assert same_as_full_parse([sse(objs)])
    fast, _ = run([sse(objs)])
    tokens, produced, _, _, finish = fast
    assert [t.text for t in tokens] == ["a", "b", "c", "", "d", "e", "f", "g", "h"]
    assert tokens[3].tool_calls == tuple(args) and produced == 9 and finish == "length"


def test_a_template_is_learned_only_from_an_event_that_carries_nothing_but_its_text():
    args = [{"index": 0, "function": {"arguments": "1"}}]
    u1, u2 = {"prompt_tokens": 3, "completion_tokens": 1}, {"prompt_tokens": 3, "completion_tokens": 2}
    streams = {
        "tool calls": [vllm("a", tool_calls=args), vllm("b", tool_calls=args)],
        # The middle event's text needs escapes: nothing to learn from it, the first event's shape stands.
        "usage": [{**vllm("a"), "usage": u1}, {**vllm("\n"), "usage": u2}, {**vllm("c"), "usage": u1}],
        "finish": [vllm("a", "stop"), vllm("\n", "length"), vllm("c", "stop")],
        # The text is also the model's name, after it: the slot found is the model's, which the second parse refuses.
        "text elsewhere": [llamacpp("tok"), {**llamacpp("tok"), "model": "other"}],
    }
    for objs in streams.values():
        same_as_full_parse([sse(objs)])


def test_odd_text_in_the_template_reads_or_fails_as_the_full_parse():
    good = sse([vllm("a"), vllm("b")]).removesuffix(b"data: [DONE]\n\n")
    for text in (b"raw\x01control", b"ends in a backslash\\", b"bad \\x escape", b"\xff\xfe not utf-8", b"lone \\ud800 escape", b"\xed\xa0\x80",
                 b'one","content":"two'):
        event = b'data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"m","choices":[{"index":0,"delta":{"content":"' \
            + text + b'"},"logprobs":null,"finish_reason":null}]}\n\n'
        assert same_as_full_parse([good, event, good])


def test_logprobs_streams_never_take_the_template_path():
    lp = {"content": [{"token": "x", "logprob": -0.5, "bytes": [120], "top_logprobs": []}]}
    objs = [{**vllm("a"), "choices": [{"index": 0, "delta": {"content": "a"}, "logprobs": lp, "finish_reason": None}]}] * 3
    assert not same_as_full_parse([sse(objs)], logprobs=True)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.text(min_size=0, max_size=12), min_size=1, max_size=12), st.booleans(), st.randoms(use_true_random=False))
def test_any_text_reads_as_the_full_parse(texts, ascii, rng):
    stream = sse([vllm("warm")] + [vllm(t) for t in texts], ascii=ascii)
    assert same_as_full_parse(cut(stream, rng))
