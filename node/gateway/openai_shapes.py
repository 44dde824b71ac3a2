"""The OpenAI wire format, responses: JSON bodies and SSE events, field for field.

Pure functions and small builders, no I/O. Responses follow what
api.openai.com sends, so the official SDK (and anything built on it) parses
them unchanged: chat and completions, streamed and not, ``n`` choices,
``logprobs`` in each API's own shape, tool calls (streamed as deltas, or
joined in the message), embeddings as floats or base64.
"""

from __future__ import annotations

import base64
import json
import struct
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from json.encoder import encode_basestring_ascii as _json_string

from gpunexus.protocol.messages import TokenDetail

from .openai_api import APIError, CompletionRequest, EmbeddingRequest


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int

    def as_dict(self) -> dict:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
        }

    def __add__(self, other: Usage) -> Usage:
        return Usage(self.prompt_tokens + other.prompt_tokens, self.completion_tokens + other.completion_tokens)


def token_text(raw: bytes) -> str:
    """A token's bytes as text; a piece of a character shows as U+FFFD (``bytes`` keeps the truth)."""
    return raw.decode("utf-8", errors="replace")


def chat_logprobs(logprobs: Sequence[float], details: Sequence[TokenDetail]) -> list[dict]:
    """Chat's ``logprobs.content`` items: token, logprob, bytes and the top alternatives."""
    return [
        {
            "token": token_text(d.token),
            "logprob": lp,
            "bytes": list(d.token),
            "top_logprobs": [{"token": token_text(t), "logprob": tlp, "bytes": list(t)} for t, tlp in zip(d.top_tokens, d.top_logprobs)],
        }
        for lp, d in zip(logprobs, details)
    ]


@dataclass
class CompletionLogprobs:
    """The legacy completions ``logprobs`` object (parallel lists), with text offsets running on."""

    top: bool
    offset: int = 0
    tokens: list[str] = field(default_factory=list)
    token_logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[dict[str, float]] = field(default_factory=list)
    text_offset: list[int] = field(default_factory=list)

    def add(self, logprobs: Sequence[float], details: Sequence[TokenDetail]) -> dict:
        """Append one delta's tokens; returns the object for just those (a streamed event's)."""
        part = CompletionLogprobs(self.top, self.offset)
        for lp, d in zip(logprobs, details):
            text = token_text(d.token)
            for target in (self, part):
                target.tokens.append(text)
                target.token_logprobs.append(lp)
                target.top_logprobs.append({token_text(t): tlp for t, tlp in zip(d.top_tokens, d.top_logprobs)})
                target.text_offset.append(target.offset)
                target.offset += len(text)
        return part.as_dict()

    def as_dict(self) -> dict:
        return {"tokens": self.tokens, "token_logprobs": self.token_logprobs,
                "top_logprobs": self.top_logprobs if self.top else None, "text_offset": self.text_offset}


class Choice:
    """What one choice of a non-streamed response has received so far."""

    def __init__(self, request: CompletionRequest) -> None:
        self.parts: list[str] = []
        self.tool_calls: dict[int, dict] = {}
        """Tool calls by their stream index, their streamed pieces joined."""
        self.chat_logprobs: list[dict] | None = [] if request.logprobs and request.kind == "chat" else None
        self.completion_logprobs = CompletionLogprobs(request.top_logprobs > 0) if request.logprobs and request.kind == "completion" else None

    def add(self, text: str, logprobs: Sequence[float], details: Sequence[TokenDetail], tool_calls: Sequence[dict] = ()) -> None:
        self.parts.append(text)
        for delta in tool_calls:
            call = self.tool_calls.setdefault(delta["index"], {"id": "", "type": "function", "function": {"name": "", "arguments": ""}})
            if delta.get("id"):
                call["id"] = delta["id"]
            function = delta.get("function") or {}
            for name in ("name", "arguments"):
                if isinstance(function.get(name), str):
                    call["function"][name] += function[name]
        if self.chat_logprobs is not None:
            self.chat_logprobs.extend(chat_logprobs(logprobs, details))
        elif self.completion_logprobs is not None:
            self.completion_logprobs.add(logprobs, details)

    def message(self) -> dict:
        """The chat ``message``: content null when the answer is tool calls only, as OpenAI sends it."""
        text = "".join(self.parts)
        if not self.tool_calls:
            return {"role": "assistant", "content": text, "refusal": None}
        return {"role": "assistant", "content": text or None, "refusal": None,
                "tool_calls": [self.tool_calls[i] for i in sorted(self.tool_calls)]}

    def logprobs(self) -> dict | None:
        if self.chat_logprobs is not None:
            return {"content": self.chat_logprobs, "refusal": None}
        return self.completion_logprobs.as_dict() if self.completion_logprobs is not None else None


class ResponseShaper:
    """Builds one response's JSON objects and SSE events; ids and timestamps fixed per response."""

    def __init__(self, request: CompletionRequest, response_id: str, fingerprint: str | None = None) -> None:
        self.request = request
        self.chat = request.kind == "chat"
        self.id = ("chatcmpl-" if self.chat else "cmpl-") + response_id
        self.created = int(time.time())
        self.fingerprint = fingerprint
        self._sent_role: set[int] = set()
        head = {"id": self.id, "object": "chat.completion.chunk" if self.chat else "text_completion", "created": self.created, "model": request.model}
        if self.chat:
            head["system_fingerprint"] = fingerprint
        self._head = head
        # Pre-encode everything but the text: one string to escape per plain delta.
        self._prefix = json.dumps(head, separators=(",", ":"))[:-1]
        self._usage = ',"usage":null' if request.include_usage else ""
        self._hot: dict[int, tuple[bytes, bytes]] = {}
        """A choice's frame once its opening event went out, where no logprobs are asked: the hot path's one lookup."""
        self._plain = not request.logprobs
        self._completion_logprobs = [CompletionLogprobs(request.top_logprobs > 0) for _ in range(request.choices)] if request.logprobs and not self.chat else []

    def _frame(self, index: int) -> tuple[bytes, bytes]:
        """A plain text event of choice ``index`` as the bytes before and after its JSON-escaped text."""
        if self.chat:
            return (f'data: {self._prefix},"choices":[{{"index":{index},"delta":{{"content":'.encode(),
                    ('},"logprobs":null,"finish_reason":null}]' + self._usage + "}\n\n").encode())
        return (f'data: {self._prefix},"choices":[{{"text":'.encode(),
                (f',"index":{index},"logprobs":null,"finish_reason":null}}]' + self._usage + "}\n\n").encode())

    def sse_delta(self, index: int, text: str, logprobs: Sequence[float] = (), details: Sequence[TokenDetail] = (),
                  tool_calls: Sequence[dict] = ()) -> bytes:
        hot = self._hot.get(index)
        if hot is not None and not tool_calls:
            # The hot path: the text JSON-escaped by the C encoder json.dumps calls for a str
            # (byte for byte its output, without its two Python frames), between constant bytes.
            return hot[0] + _json_string(text).encode() + hot[1]
        out = self._role(index)
        if tool_calls:  # chat only: the engine's deltas as it streamed them, with any text beside them
            delta: dict = {"content": text, "tool_calls": list(tool_calls)} if text else {"tool_calls": list(tool_calls)}
            lp = {"content": chat_logprobs(logprobs, details), "refusal": None} if logprobs else None
            return out + self._event({"choices": [{"index": index, "delta": delta, "logprobs": lp, "finish_reason": None}]})
        if self._plain:
            head, tail = self._hot[index] = self._frame(index)
            return out + head + _json_string(text).encode() + tail
        if self.chat:
            choice = {"index": index, "delta": {"content": text}, "logprobs": {"content": chat_logprobs(logprobs, details), "refusal": None}, "finish_reason": None}
        else:
            choice = {"text": text, "index": index, "logprobs": self._completion_logprobs[index].add(logprobs, details), "finish_reason": None}
        return out + self._event({"choices": [choice]})

    def _role(self, index: int) -> bytes:
        if index in self._sent_role:
            return b""
        self._sent_role.add(index)
        if not self.chat:
            return b""
        return self._event({"choices": [{"index": index, "delta": {"role": "assistant", "content": "", "refusal": None}, "logprobs": None, "finish_reason": None}]})

    def sse_finish(self, finish_reasons: Sequence[str], usage: Usage) -> bytes:
        out = b""
        for index, reason in enumerate(finish_reasons):
            out += self._role(index)
            if self.chat:
                out += self._event({"choices": [{"index": index, "delta": {}, "logprobs": None, "finish_reason": reason}]})
            else:
                out += self._event({"choices": [{"text": "", "index": index, "logprobs": None, "finish_reason": reason}]})
        if self.request.include_usage:
            out += self._event({"choices": [], "usage": usage.as_dict()}, usage_null=False)
        return out + b"data: [DONE]\n\n"

    def _event(self, body: dict, usage_null: bool = True) -> bytes:
        obj = dict(self._head, **body)
        if self.request.include_usage and usage_null:
            obj["usage"] = None
        return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"

    def full(self, choices: Sequence[Choice], finish_reasons: Sequence[str], usage: Usage) -> dict:
        if self.chat:
            return {
                "id": self.id,
                "object": "chat.completion",
                "created": self.created,
                "model": self.request.model,
                "system_fingerprint": self.fingerprint,
                "choices": [
                    {"index": i, "message": c.message(), "logprobs": c.logprobs(), "finish_reason": reason}
                    for i, (c, reason) in enumerate(zip(choices, finish_reasons))
                ],
                "usage": usage.as_dict(),
            }
        return {
            "id": self.id,
            "object": "text_completion",
            "created": self.created,
            "model": self.request.model,
            "choices": [
                {"text": "".join(c.parts), "index": i, "logprobs": c.logprobs(), "finish_reason": reason}
                for i, (c, reason) in enumerate(zip(choices, finish_reasons))
            ],
            "usage": usage.as_dict(),
        }


def embeddings_response(request: EmbeddingRequest, vectors: Sequence[bytes], prompt_tokens: int) -> dict:
    """``/v1/embeddings``'s body: float lists, or base64 of the float32 bytes as the SDK asks by default."""
    data = []
    for index, raw in enumerate(vectors):
        value = base64.b64encode(raw).decode() if request.base64 else list(struct.unpack(f"<{len(raw) // 4}f", raw))
        data.append({"object": "embedding", "index": index, "embedding": value})
    return {"object": "list", "data": data, "model": request.model,
            "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens}}


def sse_error(error: APIError) -> bytes:
    return b"data: " + json.dumps(error.body(), separators=(",", ":")).encode() + b"\n\ndata: [DONE]\n\n"
