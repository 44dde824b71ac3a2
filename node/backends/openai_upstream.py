"""Forward to an OpenAI-compatible server the host already runs.

Ollama, vLLM, llama.cpp's server and TGI all speak ``/v1/chat/completions``
with SSE streaming. Each content event counts as one token as it arrives;
where the upstream's final usage reports more completion tokens than it
streamed events (servers that coalesce), the difference follows as one
text-less chunk, so what is billed is the upstream's own count and the
gateway still checks it chunk by chunk. The upstream's prompt-token count is
used for ``tokens_in``.

Beyond text, what the host declares its engine supports (``--upstream-supports``)
is announced and passed through: tools and tool choice (tool-call deltas
stream back as the engine sent them, finish reason ``tool_calls``), JSON mode
and JSON schemas, image parts, penalties and logit bias. The messages of a
tool conversation or with images go to the engine as the client sent them
(``Order.upstream``).

What cannot be verified here: upstream servers expose no token ids and no
hidden states, and do not sample with our seeded sampler, so receipts from
this backend carry no activation commitment and cannot be seed-replayed.
What can: as a peer verifier (``prefill``) this backend asks its own upstream
for the logprobs of a delivered completion given its prompt
(``/v1/completions`` with ``echo: true`` and ``logprobs: 5``, the OpenAI
legacy scoring call that vLLM answers; TGI has prompt logprobs only in its
native ``/generate``, and llama.cpp's server and Ollama do not echo prompt
logprobs through the OpenAI API), and the hub judges those
numbers statistically (``verify.peer``). Chat audits are refused on this
path: the chat template lives in the upstream, so the verifier cannot
rebuild the exact prompt text.
"""

from __future__ import annotations

import hashlib
import json
import re

import httpx
import trio

from . import lean_http
from gpunexus.protocol.messages import MAX_TOP_LOGPROBS, PLAIN_TEXT, AuditJob, Capabilities, TokenDetail
from gpunexus.verify.peer import RANK_UNKNOWN, PrefillReport

from .base import BackendError, GenerationRequest, GenerationResult, ModelInfo, Token

CONNECT_TIMEOUT = 5.0
READ_TIMEOUT = 120.0
ECHO_TOP_K = 5
"""Alternatives per token asked of the upstream when scoring: OpenAI's legacy API allowed at most 5."""


PASSED_THROUGH = ("tools", "json_mode", "json_schema", "vision", "penalties", "logit_bias", "logprobs")
"""What an engine behind ``--backend openai`` may be declared to support (``--upstream-supports``)."""


def parse_supports(text: str) -> Capabilities:
    """``tools,json_schema,vision`` as the capabilities an upstream host announces; ValueError naming an unknown one."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in PASSED_THROUGH]
    if unknown:
        raise ValueError(f"unknown capability {unknown[0]!r}: choose from {', '.join(PASSED_THROUGH)}")
    caps = dict.fromkeys(names, True)
    if caps.get("logprobs"):
        caps["top_logprobs"] = MAX_TOP_LOGPROBS  # OpenAI's bound, which vLLM and llama.cpp's server accept
    return Capabilities(**caps)


class OpenAIUpstreamBackend:
    default_slots = 64
    """Upstream servers batch many requests on one GPU; they queue the rest themselves."""

    def __init__(self, base_url: str, model: str, *, upstream_model: str | None = None, api_key: str | None = None, max_context: int = 8192, license: str = "",
                 supports: Capabilities = PLAIN_TEXT) -> None:
        self.base_url = base_url.rstrip("/")
        self.upstream_model = upstream_model or model
        digest = hashlib.sha256(f"openai-upstream\n{self.upstream_model}".encode()).hexdigest()
        if supports.embeddings or supports.max_n > 1:
            # The gateway fans n out into one order per choice, and embeddings need an embedding engine.
            raise ValueError(f"an upstream host passes through {', '.join(PASSED_THROUGH)}")
        self.info = ModelInfo(name=model, model_hash=f"upstream-{digest[:16]}", max_context=max_context, license=license, capabilities=supports)
        headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
        self._client = httpx.AsyncClient(
            headers=headers,
            timeout=httpx.Timeout(READ_TIMEOUT, connect=CONNECT_TIMEOUT),
            limits=httpx.Limits(max_connections=256, max_keepalive_connections=64),
        )
        # Plain-HTTP upstreams (the usual local server) are read with a lean client: see lean_http.
        self._lean = lean_http.LeanClient(self.base_url, headers, connect_timeout=CONNECT_TIMEOUT, read_timeout=READ_TIMEOUT) if lean_http.usable(self.base_url) else None

    def _body(self, request: GenerationRequest) -> tuple[str, dict]:
        s = request.sampling
        body: dict = {
            "model": self.upstream_model,
            "stream": True,
            "stream_options": {"include_usage": True},
            "max_tokens": request.max_tokens,
            "temperature": s.temperature,
            "top_p": s.top_p,
            "seed": s.seed,
        }
        if s.stop:
            body["stop"] = list(s.stop)
        if s.top_k:
            body["top_k"] = s.top_k
        if s.presence_penalty:
            body["presence_penalty"] = s.presence_penalty
        if s.frequency_penalty:
            body["frequency_penalty"] = s.frequency_penalty
        if s.logit_bias:
            body["logit_bias"] = {str(b.token): b.bias for b in s.logit_bias}
        if s.json_mode:
            body["response_format"] = {"type": "json_object"}
        if request.logprobs:
            if request.kind == "chat":
                body["logprobs"] = True
                body["top_logprobs"] = request.top_logprobs
            else:
                body["logprobs"] = request.top_logprobs
        upstream = dict(request.upstream or {})
        if request.kind == "chat":
            messages = upstream.pop("messages", None) or [{"role": m.role, "content": m.content} for m in request.messages]
            body.update(upstream)  # tools, tool_choice, parallel_tool_calls, a JSON schema: as the client sent them
            if request.continuation:
                # vLLM and llama.cpp continue a trailing assistant message with these flags.
                messages.append({"role": "assistant", "content": request.continuation})
                body["continue_final_message"] = True
                body["add_generation_prompt"] = False
            body["messages"] = messages
            return f"{self.base_url}/chat/completions", body
        body["prompt"] = request.prompt + request.continuation
        return f"{self.base_url}/completions", body

    async def generate(self, request: GenerationRequest, tokens: trio.MemorySendChannel[Token]) -> GenerationResult:
        url, body = self._body(request)
        events = _Events(request.kind == "chat", tokens, logprobs=request.logprobs)
        try:
            if self._lean is not None:
                await self._stream_lean(url[len(self.base_url):], body, events)
            else:
                async with self._client.stream("POST", url, json=body) as response:
                    if response.status_code != 200:
                        detail = (await response.aread())[:300].decode(errors="replace")
                        raise BackendError(f"upstream answered {response.status_code}: {detail}", retryable=response.status_code >= 500 or response.status_code == 429)
                    async for data in response.aiter_bytes():
                        events.feed(data)
        except (httpx.HTTPError, lean_http.UpstreamHTTPError) as exc:
            if events.produced:
                raise BackendError(f"upstream broke mid-stream: {exc}", retryable=True) from None
            raise BackendError(f"upstream unreachable: {type(exc).__name__}: {exc}", retryable=True) from None
        except (ValueError, AttributeError) as exc:
            raise BackendError(f"upstream sent something that is not an OpenAI stream: {exc}", retryable=True) from None
        produced, prompt_tokens, completion_tokens, finish_reason = events.produced, events.prompt_tokens, events.completion_tokens, events.finish_reason
        if completion_tokens is not None and completion_tokens > produced:
            # The upstream streamed several tokens per event: the rest of the count travels
            # as one text-less token, so the gateway counts what the upstream reports.
            tokens.send_nowait(Token("", None, None, count=completion_tokens - produced))
            produced = completion_tokens
        if prompt_tokens is None:
            prompt_tokens = _estimate_prompt_tokens(request)
        return GenerationResult(prompt_tokens=int(prompt_tokens), completion_tokens=produced, finish_reason=finish_reason)

    async def prefill(self, job: AuditJob) -> PrefillReport:
        """As a peer verifier: the upstream's logprobs of the delivered completion (one scoring call, echo)."""
        o = job.opening
        if o.kind != "completion":
            raise BackendError("the logprob path scores completions only: the chat template is the upstream's",
                               code="bad_request", retryable=False)
        prompt = o.prompt + o.continuation
        body = {"model": self.upstream_model, "prompt": prompt + o.output_text, "echo": True, "logprobs": ECHO_TOP_K,
                "max_tokens": 1, "temperature": 0.0}
        try:
            response = await self._client.post(f"{self.base_url}/completions", json=body)
        except httpx.HTTPError as exc:
            raise BackendError(f"upstream unreachable: {type(exc).__name__}: {exc}") from None
        if response.status_code != 200:
            raise BackendError(f"upstream answered {response.status_code} to a scoring call: {response.text[:300]}")
        try:
            return _scored(response.json()["choices"][0]["logprobs"], len(prompt), len(prompt) + len(o.output_text))
        except (ValueError, KeyError, IndexError, TypeError) as exc:
            raise BackendError(f"upstream's echo logprobs are not in the OpenAI shape: {exc}") from None

    async def _stream_lean(self, path: str, body: dict, events: _Events) -> None:
        assert self._lean is not None
        response = await self._lean.post(path, json.dumps(body).encode())
        try:
            if response.status != 200:
                detail = (await response.read_all(300))[:300].decode(errors="replace")
                raise BackendError(f"upstream answered {response.status}: {detail}", retryable=response.status >= 500 or response.status == 429)
            # One cancel scope for the whole body; its deadline moves with each read.
            with trio.CancelScope() as waiting:
                while True:
                    waiting.deadline = trio.current_time() + READ_TIMEOUT
                    data = await response.read()
                    if not data:
                        break
                    events.feed(data)
            if waiting.cancelled_caught:
                raise lean_http.UpstreamHTTPError(f"no data for {READ_TIMEOUT:.0f} s")
        finally:
            await response.aclose()

    async def aclose(self) -> None:
        await self._client.aclose()
        if self._lean is not None:
            await self._lean.aclose()


_NOT_LITERAL = re.compile(rb'["\\\x00-\x1f]').search
"""A byte that ends a JSON string, begins an escape, or may not stand raw in one (json.loads refuses it)."""
_scanstring = json.decoder.scanstring
"""The C scanner json.loads reads each string with: (its value, the index after its closing quote)."""

LEARNS = 16
"""How many plain text events of one stream may be tried as its template (see :class:`_Events`): an engine whose
events never share a shape pays at most this many extra parses."""


class _Events:
    """Server-sent events of an OpenAI stream, fed as bytes arrive; tokens go out as they are parsed.

    Nearly every event of a stream is the same bytes but for its text:
    ``data: {"id":...,"choices":[{"index":0,"delta":{"content":"`` text ``"},...}]}``.
    A plain text event (one choice whose text needs no escape, and nothing
    else that counts: no tool calls, usage or finish reason, no logprobs asked)
    is parsed in full, and its bytes before and after the text become the
    stream's template once a second parse, with other text in the slot, gives
    the same object but for that text. From then on an event that begins and
    ends with the template's bytes is read by slicing out the text and decoding
    it, without json.loads or a dict walk; text with escapes (a newline, a
    quote) goes through json's own C string scanner, which must end exactly at
    the template's closing quote. Either way it is the token the full parse
    gives: the JSON string ends at the template's quote, so the rest of the
    event parses as the template did. Anything else (tool calls, logprobs,
    usage, a finish, a shape that changed, text json.loads would refuse) takes
    the full parse, which relearns the template from the next plain event.
    """

    __slots__ = ("_head", "_learns", "_tail", "buffer", "chat", "completion_tokens", "finish_reason", "logprobs", "produced",
                 "prompt_tokens", "tokens")

    def __init__(self, chat: bool, tokens: trio.MemorySendChannel[Token], *, logprobs: bool = False) -> None:
        self.chat = chat
        self.tokens = tokens
        self.logprobs = logprobs
        self.buffer = b""
        self.produced = 0
        self.prompt_tokens = None
        self.completion_tokens = None
        self.finish_reason = "length"
        self._head: bytes | None = None
        self._tail = b""
        self._learns = 0 if logprobs else LEARNS

    def feed(self, data: bytes) -> None:
        events = (self.buffer + data if self.buffer else data).split(b"\n\n")
        self.buffer = events.pop()
        for event in events:
            head = self._head
            if head is not None and event.startswith(head) and event.endswith(self._tail):
                raw = event[len(head):len(event) - len(self._tail)]
                try:
                    text = raw.decode()
                    if _NOT_LITERAL(raw) is not None:
                        # Escapes: JSON's own string scanner, which must end at the template's quote.
                        quoted = text + '"'
                        text, end = _scanstring(quoted, 0)
                        if end != len(quoted):
                            text = ""
                except ValueError:  # not UTF-8 (json.loads lets encoded surrogates through), a bad escape, a raw control byte
                    text = ""
                if text:
                    self.produced += 1
                    self.tokens.send_nowait(Token(text, None, None))
                    continue
                self._parse(event)  # the full parse decides; the shape is the template's, nothing to learn
                continue
            obj = self._parse(event)
            if obj is not None and self._learns:
                self._learn(event, obj)

    def _parse(self, event: bytes) -> dict | None:
        """The full parse of one event: its tokens sent, usage and finish noted; the object, if it was one."""
        if not event.startswith(b"data:"):
            return None
        payload = event[5:].strip()
        if payload == b"[DONE]":
            return None
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
                # An event counts as a token when it carries text: content, or a piece of a
                # tool call's arguments. The opening delta of a call (its id and name) is none.
                count = 1 if text or any((c.get("function") or {}).get("arguments") for c in calls or ()) else 0
                self.produced += count
                self.tokens.send_nowait(Token(text or "", None, None, count=count, tool_calls=tuple(calls) if calls else ()))
            reason = choice.get("finish_reason")
            if reason:
                self.finish_reason = reason if reason in ("length", "tool_calls") else "stop"
        return obj

    def _learn(self, event: bytes, obj: dict) -> None:
        """Make ``event``'s bytes around its text the template, if it is a plain text event and the slot checks out."""
        slot = _plain_text_slot(obj, self.chat)
        if slot is None:
            return
        self._learns -= 1
        text = slot[0][slot[1]]
        literal = text.encode()
        if _NOT_LITERAL(literal) is not None:
            return
        quoted = b'"' + literal + b'"'
        at = event.rfind(quoted)
        if at < 0:
            return  # the engine escapes some of it: another event may do
        head, tail = event[: at + 1], event[at + len(quoted) - 1 :]
        try:
            probe = json.loads((head + literal + b"~" + tail)[5:].strip())
        except ValueError:
            return  # the quotes were two strings' ends, not one string
        found = _plain_text_slot(probe, self.chat)
        if found is None:
            return
        found[0][found[1]] = text  # equal now only if the slot was the text's: else another string holds "~"
        if probe == obj:
            self._head, self._tail = head, tail

    def _send_scored(self, text: str, scored: list[tuple[float, TokenDetail]]) -> None:
        """One token per logprob entry (an event may carry several); the event's text rides on the first."""
        for i, (logprob, detail) in enumerate(scored):
            self.produced += 1
            self.tokens.send_nowait(Token(text if i == 0 else "", None, logprob, detail=detail))


def _plain_text_slot(obj: dict, chat: bool) -> tuple[dict, str] | None:
    """(the dict, its key) holding the text of an event that carries one choice's text and nothing else that counts."""
    choices = obj.get("choices")
    if obj.get("usage") or not isinstance(choices, list) or len(choices) != 1 or not isinstance(choices[0], dict):
        return None
    choice = choices[0]
    if choice.get("finish_reason"):
        return None
    holder, key = (choice.get("delta"), "content") if chat else (choice, "text")
    if not isinstance(holder, dict) or not isinstance(holder.get(key), str) or not holder[key] or (chat and holder.get("tool_calls")):
        return None
    return holder, key


def _token_logprobs(logprobs: object, chat: bool) -> list[tuple[float, TokenDetail]]:
    """Each token's logprob and detail from an event's ``logprobs``, in chat's or the legacy completions' shape."""
    if not isinstance(logprobs, dict):
        return []
    out = []
    if chat:
        for entry in logprobs.get("content") or ():
            tops = entry.get("top_logprobs") or ()
            out.append((float(entry["logprob"]), TokenDetail(
                _token_bytes(entry), tuple(_token_bytes(t) for t in tops), tuple(float(t["logprob"]) for t in tops))))
        return out
    for token, logprob, tops in zip(logprobs.get("tokens") or (), logprobs.get("token_logprobs") or (),
                                    logprobs.get("top_logprobs") or [None] * len(logprobs.get("tokens") or ())):
        tops = tops or {}
        out.append((float(logprob), TokenDetail(token.encode(), tuple(t.encode() for t in tops), tuple(float(v) for v in tops.values()))))
    return out


def _token_bytes(entry: dict) -> bytes:
    """A chat logprob entry's token as bytes: its ``bytes`` where given (a piece of a character), else its text."""
    raw = entry.get("bytes")
    return bytes(raw) if isinstance(raw, list) else str(entry.get("token", "")).encode()


def _scored(logprobs: dict, prompt_end: int, output_end: int) -> PrefillReport:
    """The report from an echo answer: tokens before ``prompt_end`` are the prompt, those up to
    ``output_end`` the delivered output (what the upstream generated after it is ignored)."""
    prompt_tokens, lps, ranks = 0, [], []
    for token, lp, top, offset in zip(logprobs["tokens"], logprobs["token_logprobs"], logprobs["top_logprobs"],
                                      logprobs["text_offset"], strict=True):
        if offset < prompt_end:
            prompt_tokens += 1
        elif offset < output_end:
            lps.append(float(lp))
            alternatives = top or {}
            ranks.append(sum(v > lp for v in alternatives.values()) if token in alternatives else RANK_UNKNOWN)
    return PrefillReport("openai", prompt_tokens, b"", tuple(lps), tuple(ranks), ECHO_TOP_K, False)


def _estimate_prompt_tokens(request: GenerationRequest) -> int:
    """About four characters a token, for upstreams that report no usage."""
    chars = sum(len(m.content) for m in request.messages) + len(request.prompt) + len(request.continuation)
    return max(1, chars // 4)
