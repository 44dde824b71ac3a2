"""Per-event CPU of the two SSE hot paths, before and after the lean encoder and parser.

Run: python bench/sse.py [--events N] [--rounds N]

(a) The gateway writes each streamed delta to its client as one SSE event
(``ResponseShaper.sse_delta``); (b) a ``--backend openai`` host reads each
token of its upstream engine from one SSE event (``_Events.feed``). Each row
times the same N events through the code as it was before this change (frozen
below, the encoding and parsing before this change, kept for comparison) and
through the code as it is, alternated round by round in this one run so
machine drift falls on both alike (this machine is noisy: the ratio is the
figure). The time is the thread's CPU time, the minimum over rounds. Before
timing, both sides are checked to give the same bytes (a) and the same tokens (b).

The token mix is 23 English word pieces, cycled, among them a newline and a
quote (which need a JSON escape) and accented text, CJK and an emoji (which
the gateway's ASCII output escapes; engines send them raw). Upstream events
are written as each engine writes them: vLLM (pydantic, compact, raw UTF-8),
Ollama (Go, compact, a role in every delta), llama.cpp's server (nlohmann,
compact, choices first). The last row is the worst case of the new parser: a
stream whose every text needs an escape, so no template is ever learned and
every event takes the full parse, as before, plus the bounded learning tries.
Parsed tokens go to a list, not a trio channel: the channel's cost is the
same before and after.
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from collections.abc import Callable, Sequence

from gpunexus.node.backends.base import Token
from gpunexus.node.backends.openai_upstream import _Events, _token_logprobs
from gpunexus.node.gateway.openai_api import CompletionRequest, parse_request
from gpunexus.node.gateway.openai_shapes import CompletionLogprobs, ResponseShaper, chat_logprobs

WORDS = ("The", " quick", " brown", " fox", " jumps", " over", " the", " lazy", " dog", ".", "\n", " She", " said",
         ' "', "Hello", ",", " café", " 日本", "語", " 😀", " and", " left", ".")
"""The token mix, cycled; the newline and the quote need an escape in JSON."""


# --- the encoding before this change, kept for comparison (node/gateway/openai_shapes.py ResponseShaper) ---

class ShaperBefore:
    """``ResponseShaper``'s SSE delta path as it was: ``json.dumps`` of the text, a set and a dict per event."""

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
        self._prefix = json.dumps(head, separators=(",", ":"))[:-1]
        self._usage = ',"usage":null' if request.include_usage else ""
        self._frames: dict[int, tuple[bytes, bytes]] = {}
        self._plain = not request.logprobs
        self._completion_logprobs = [CompletionLogprobs(request.top_logprobs > 0) for _ in range(request.choices)] if request.logprobs and not self.chat else []

    def _frame(self, index: int) -> tuple[bytes, bytes]:
        frame = self._frames.get(index)
        if frame is None:
            if self.chat:
                frame = (f'data: {self._prefix},"choices":[{{"index":{index},"delta":{{"content":'.encode(),
                         ('},"logprobs":null,"finish_reason":null}]' + self._usage + "}\n\n").encode())
            else:
                frame = (f'data: {self._prefix},"choices":[{{"text":'.encode(),
                         (f',"index":{index},"logprobs":null,"finish_reason":null}}]' + self._usage + "}\n\n").encode())
            self._frames[index] = frame
        return frame

    def sse_delta(self, index: int, text: str, logprobs: Sequence[float] = (), details: Sequence = (),
                  tool_calls: Sequence[dict] = ()) -> bytes:
        if self._plain and index in self._sent_role and not tool_calls:  # the hot path: one string to encode
            head, tail = self._frames[index]
            return head + json.dumps(text).encode() + tail
        out = self._role(index)
        if tool_calls:
            delta: dict = {"content": text, "tool_calls": list(tool_calls)} if text else {"tool_calls": list(tool_calls)}
            lp = {"content": chat_logprobs(logprobs, details), "refusal": None} if logprobs else None
            return out + self._event({"choices": [{"index": index, "delta": delta, "logprobs": lp, "finish_reason": None}]})
        if self._plain:
            head, tail = self._frame(index)
            return out + head + json.dumps(text).encode() + tail
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

    def _event(self, body: dict, usage_null: bool = True) -> bytes:
        obj = dict(self._head, **body)
        if self.request.include_usage and usage_null:
            obj["usage"] = None
        return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


# --- the parsing before this change, kept for comparison (node/backends/openai_upstream.py _Events) ---

class EventsBefore:
    """``_Events`` as it was: ``json.loads`` and a dict walk for every event."""

    __slots__ = ("buffer", "chat", "completion_tokens", "finish_reason", "logprobs", "produced", "prompt_tokens", "tokens")

    def __init__(self, chat: bool, tokens, *, logprobs: bool = False) -> None:
        self.chat = chat
        self.tokens = tokens
        self.logprobs = logprobs
        self.buffer = b""
        self.produced = 0
        self.prompt_tokens = None
        self.completion_tokens = None
        self.finish_reason = "length"

    def feed(self, data: bytes) -> None:
        buffer = self.buffer + data if self.buffer else data
        *events, self.buffer = buffer.split(b"\n\n")
        for event in events:
            if not event.startswith(b"data:"):
                continue
            payload = event[5:].strip()
            if payload == b"[DONE]":
                continue
            obj = json.loads(payload)
            usage = obj.get("usage")
            if usage:
                self.prompt_tokens = usage.get("prompt_tokens")
                self.completion_tokens = usage.get("completion_tokens")
            for choice in obj.get("choices") or ():
                if self.chat:
                    delta = choice.get("delta") or {}
                    text, calls = delta.get("content"), delta.get("tool_calls")
                else:
                    text, calls = choice.get("text"), None
                if self.logprobs and not calls:
                    scored = _token_logprobs(choice.get("logprobs"), self.chat)
                    if scored:
                        self._send_scored(text or "", scored)
                    elif text:
                        raise ValueError("the upstream sent a token without the logprobs asked for")
                elif text or calls:
                    count = 1 if text or any((c.get("function") or {}).get("arguments") for c in calls or ()) else 0
                    self.produced += count
                    self.tokens.send_nowait(Token(text or "", None, None, count=count, tool_calls=tuple(calls) if calls else ()))
                reason = choice.get("finish_reason")
                if reason:
                    self.finish_reason = reason if reason in ("length", "tool_calls") else "stop"

    def _send_scored(self, text: str, scored) -> None:
        for i, (logprob, detail) in enumerate(scored):
            self.produced += 1
            self.tokens.send_nowait(Token(text if i == 0 else "", None, logprob, detail=detail))


# --- the workloads ---

def texts(n: int) -> list[str]:
    return [WORDS[i % len(WORDS)] for i in range(n)]


def request(kind: str) -> CompletionRequest:
    body = {"model": "meta-llama/Llama-3.1-8B-Instruct", "stream": True, "stream_options": {"include_usage": True}}
    body.update({"messages": [{"role": "user", "content": "hi"}]} if kind == "chat" else {"prompt": "hi"})
    return parse_request(body, kind)


def encode_run(shaper_type: type, kind: str, items: list[str]) -> Callable[[], list[bytes]]:
    """One response of ``len(items)`` plain deltas (the first one writes the opening event too)."""
    req = request(kind)

    def run() -> list[bytes]:
        shaper = shaper_type(req, "0123456789abcdef01234567")
        shaper.created = 1733200000
        delta = shaper.sse_delta
        return [delta(0, text) for text in items]
    return run


def vllm_chat(text: str, first: bool) -> dict:
    delta = {"role": "assistant", "content": ""} if first else {"content": text}
    return {"id": "chatcmpl-8f3c2a9e4b7d4e1f9a6c5b3d2e1f0a9b", "object": "chat.completion.chunk", "created": 1733200000,
            "model": "meta-llama/Llama-3.1-8B-Instruct", "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": None}]}


def vllm_completion(text: str, first: bool) -> dict:
    return {"id": "cmpl-8f3c2a9e4b7d4e1f9a6c5b3d2e1f0a9b", "object": "text_completion", "created": 1733200000,
            "model": "meta-llama/Llama-3.1-8B-Instruct", "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": None, "stop_reason": None}]}


def ollama_chat(text: str, first: bool) -> dict:
    return {"id": "chatcmpl-417", "object": "chat.completion.chunk", "created": 1733200000, "model": "llama3.2",
            "system_fingerprint": "fp_ollama", "choices": [{"index": 0, "delta": {"role": "assistant", "content": text}, "finish_reason": None}]}


def llamacpp_chat(text: str, first: bool) -> dict:
    delta = {"role": "assistant", "content": None} if first else {"content": text}
    return {"choices": [{"finish_reason": None, "index": 0, "delta": delta}], "created": 1733200000, "id": "chatcmpl-Xq3kM9vT2pL8wR4nB6yH1cJ5",
            "model": "gpt-3.5-turbo", "system_fingerprint": "b4412-a1b2c3d4", "object": "chat.completion.chunk"}


def upstream_stream(shape: Callable[[str, bool], dict], items: list[str], per_read: int) -> list[bytes]:
    """The engine's body as the reads that bring it: an opening event, the text events, ``per_read`` to a read."""
    events = [shape("", True)] + [shape(text, False) for text in items]
    raw = [b"data: " + json.dumps(e, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n" for e in events]
    return [b"".join(raw[i:i + per_read]) for i in range(0, len(raw), per_read)]


def parse_run(events_type: type, chat: bool, reads: list[bytes]) -> Callable[[], list[Token]]:

    def run() -> list[Token]:
        out: list[Token] = []
        sink = type("Sink", (), {"send_nowait": staticmethod(out.append)})()
        events = events_type(chat, sink)
        feed = events.feed
        for data in reads:
            feed(data)
        return out
    return run


def cpu_us_per_event(run: Callable[[], object], n: int) -> float:
    """Garbage collection off while timing, as timeit does: the N results are kept, a real stream's are not."""
    gc.collect()
    gc.disable()
    try:
        start = time.thread_time_ns()
        run()
        return (time.thread_time_ns() - start) / 1000 / n
    finally:
        gc.enable()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=20000, help="events per timed run")
    parser.add_argument("--rounds", type=int, default=9, help="alternated before/after runs per row; the minimum counts")
    args = parser.parse_args()
    n = args.events
    items = texts(n)
    escaped = [("\n", ' "', "\t\\")[i % 3] for i in range(n)]
    rows: list[tuple[str, Callable[[], object], Callable[[], object]]] = []
    for kind in ("chat", "completion"):
        rows.append((f"gateway: write {kind} delta", encode_run(ShaperBefore, kind, items), encode_run(ResponseShaper, kind, items)))
    for label, shape, chat, per_read, words in (
        ("host: read vLLM chat, 1 event/read", vllm_chat, True, 1, items),
        ("host: read vLLM chat, 16 events/read", vllm_chat, True, 16, items),
        ("host: read vLLM completions", vllm_completion, False, 1, items),
        ("host: read Ollama chat", ollama_chat, True, 1, items),
        ("host: read llama.cpp chat", llamacpp_chat, True, 1, items),
        ("host: read vLLM chat, every text escaped", vllm_chat, True, 1, escaped),
    ):
        reads = upstream_stream(shape, words, per_read)
        rows.append((label, parse_run(EventsBefore, chat, reads), parse_run(_Events, chat, reads)))

    for label, before, after in rows:
        if before() != after():
            raise SystemExit(f"{label}: before and after disagree")
    results = []
    for label, before, after in rows:
        best = [float("inf"), float("inf")]
        for _ in range(args.rounds):
            for side, run in enumerate((before, after)):
                best[side] = min(best[side], cpu_us_per_event(run, n))
        results.append((label, *best))

    print(f"{n} events per run, best of {args.rounds} alternated rounds, thread CPU time")
    print(f"{'path':40} {'before us/event':>16} {'after us/event':>15} {'ratio':>7}")
    for label, before_us, after_us in results:
        print(f"{label:40} {before_us:16.2f} {after_us:15.2f} {before_us / after_us:6.2f}x")


if __name__ == "__main__":
    main()
