"""The OpenAI wire format, requests: parse and validate them, and the error shape.

Pure functions, no I/O: the gateway's HTTP layer calls them, tests call them
directly. Responses are shaped in :mod:`.openai_shapes`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from gpunexus.protocol.limits import MAX_LOGIT_BIAS, MAX_MESSAGES, MAX_PROMPT_CHARS, MAX_STOP_SEQUENCES, MAX_TOKENS
from gpunexus.pricing.capabilities import PLAIN, Needs
from gpunexus.protocol.messages import MAX_CHOICES, MAX_TOP_LOGPROBS, ROLES, ChatMessage, upstream_bytes

DEFAULT_MAX_TOKENS = 256

class APIError(Exception):
    """An error answered in OpenAI's shape with an HTTP status."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None, code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


@dataclass(frozen=True, slots=True)
class CompletionRequest:
    kind: str  # "chat" | "completion"
    model: str
    messages: tuple[ChatMessage, ...]
    prompt: str
    stream: bool
    include_usage: bool
    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    stop: tuple[str, ...]
    seed: int | None
    user: str | None
    n: int = 1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    logprobs: bool = False
    top_logprobs: int = 0
    json_mode: bool = False
    needs: Needs = PLAIN
    """What a host must offer to serve this request (see ``pricing.capabilities``)."""
    upstream: bytes = b""
    """Tools, tool choice, a JSON schema and messages beyond text, for a
    pass-through host's engine (``Order.upstream``); empty for plain text."""
    batch: tuple[str, ...] = ()
    """Completions only: a prompt given as a list of several strings; each gets
    ``n`` choices, choice ``i * n + j`` being prompt ``i``'s ``j``-th (OpenAI's order)."""
    echo: bool = False
    """Completions only: each choice's text begins with its prompt."""
    prompt_ids: tuple[tuple[int, ...], ...] = ()
    """Completions only: the prompt(s) as token ids, as sent; the gateway turns them into
    text where it knows the hosts' tokenizer (``GatewayService.detokenize``)."""

    @property
    def choices(self) -> int:
        """How many choices the response holds: ``n`` per prompt."""
        return self.n * max(1, len(self.batch), len(self.prompt_ids))


# Every parameter of OpenAI's two completion APIs (and vLLM's ``top_k``): an
# argument outside these is refused as OpenAI refuses it, never ignored.
_COMMON = frozenset({
    "model", "stream", "stream_options", "max_tokens", "temperature", "top_p", "top_k", "n", "stop", "seed",
    "user", "presence_penalty", "frequency_penalty", "logit_bias", "logprobs",
})
_CHAT = _COMMON | {
    "messages", "max_completion_tokens", "top_logprobs", "response_format", "tools", "tool_choice",
    "parallel_tool_calls", "functions", "function_call", "store", "metadata", "service_tier", "modalities",
    "audio", "prediction", "reasoning_effort", "web_search_options",
}
_COMPLETION = _COMMON | {"prompt", "echo", "suffix", "best_of"}
_NOT_SUPPORTED = ("audio", "prediction", "reasoning_effort", "web_search_options", "metadata", "suffix")
"""Known parameters no gateway host can honour yet: a 400 naming them when set."""


def parse_request(body: object, kind: str) -> CompletionRequest:
    """Validate a /v1/chat/completions or /v1/completions body; APIError(400) if wrong.

    Parameters that only some hosts honour (logprobs, n, penalties, logit
    bias, JSON mode, tools, images) become the request's ``needs``; the
    gateway routes on them and names what no host offers.
    """
    if not isinstance(body, dict):
        raise bad("The request body must be a JSON object.")
    known = _CHAT if kind == "chat" else _COMPLETION
    for name in body:
        if name not in known:
            raise bad(f"Unrecognized request argument supplied: {name}", param=name, code="unsupported_parameter")
    for name in _NOT_SUPPORTED:
        if body.get(name) not in (None, False, [], {}, ""):
            raise bad(f"'{name}' is not supported by this gateway.", param=name, code="unsupported_parameter")
    if body.get("store") not in (None, False):
        raise bad("'store' is not supported by this gateway (responses are not stored).", param="store", code="unsupported_parameter")
    if body.get("service_tier") not in (None, "auto", "default"):
        raise bad("'service_tier' must be 'auto' or 'default' here.", param="service_tier", code="unsupported_parameter")
    if body.get("modalities") not in (None, ["text"]):
        raise bad("Only the 'text' modality is supported.", param="modalities", code="unsupported_parameter")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad("you must provide a model parameter", param="model")
    messages: tuple[ChatMessage, ...] = ()
    prompt = ""
    vision = tool_turns = False
    upstream: dict = {}
    batch: tuple[str, ...] = ()
    prompt_ids: tuple[tuple[int, ...], ...] = ()
    if kind == "chat":
        messages, verbatim, vision, tool_turns = _parse_messages(body.get("messages"))
        if verbatim is not None:
            upstream["messages"] = verbatim
        upstream.update(_parse_tools(body))
    else:
        prompt, batch, prompt_ids = _parse_prompt(body.get("prompt"))
    n = _integer(body, "n", 1, 1, MAX_CHOICES)
    echo = kind == "completion" and _boolean(body, "echo", False)
    if kind == "completion" and body.get("best_of") not in (None, n):
        raise bad("'best_of' is not supported by this gateway (only equal to n).", param="best_of", code="unsupported_parameter")
    stream = _boolean(body, "stream", False)
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise bad("'stream_options' must be an object.", param="stream_options")
    if options and not stream:
        raise bad("The 'stream_options' parameter is only allowed when 'stream' is enabled.", param="stream_options")
    include_usage = bool(options and _boolean(options, "include_usage", False))
    max_tokens = body.get("max_completion_tokens")
    param = "max_completion_tokens"
    if max_tokens is None:
        max_tokens, param = body.get("max_tokens"), "max_tokens"
    if max_tokens is None:
        max_tokens = DEFAULT_MAX_TOKENS
    if type(max_tokens) is not int or not 1 <= max_tokens <= MAX_TOKENS:
        raise bad(f"'{param}' must be an integer between 1 and {MAX_TOKENS}.", param=param)
    temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0)
    if top_p == 0.0:
        raise bad("'top_p' must be greater than 0.", param="top_p")
    top_k = body.get("top_k", 0)
    if type(top_k) is not int or top_k < 0:
        raise bad("'top_k' must be a non-negative integer.", param="top_k")
    stop = _parse_stop(body.get("stop"))
    seed = body.get("seed")
    if seed is not None and (type(seed) is not int or not -(2**63) <= seed < 2**63):
        raise bad("'seed' must be a 64-bit integer.", param="seed")
    user = body.get("user")
    if user is not None and not isinstance(user, str):
        raise bad("'user' must be a string.", param="user")
    presence = _number(body, "presence_penalty", 0.0, -2.0, 2.0)
    frequency = _number(body, "frequency_penalty", 0.0, -2.0, 2.0)
    logit_bias = _parse_logit_bias(body.get("logit_bias"))
    logprobs, top_logprobs = _parse_logprobs(body, kind)
    if echo and logprobs:
        raise bad("'echo' with 'logprobs' asks for the prompt's logprobs, which hosts do not report: ask for one or the other.",
                  param="echo", code="unsupported_parameter")
    if n * max(1, len(batch), len(prompt_ids)) > MAX_CHOICES:
        raise bad(f"'n' times the number of prompts may be at most {MAX_CHOICES}.", param="n")
    json_mode, json_schema = _parse_response_format(body.get("response_format"))
    if json_schema:
        upstream["response_format"] = body["response_format"]
    needs = Needs(
        tools=bool(upstream.get("tools")) or tool_turns, json_mode=json_mode, json_schema=json_schema, logprobs=logprobs, top_logprobs=top_logprobs, n=n,
        penalties=bool(presence or frequency), logit_bias=bool(logit_bias), vision=vision,
    )
    return CompletionRequest(kind, model, messages, prompt, stream, include_usage, max_tokens, temperature, top_p, top_k,
                             stop, seed, user, n, presence, frequency, logit_bias, logprobs, top_logprobs, json_mode, needs,
                             upstream_bytes(upstream), batch, echo, prompt_ids)


def _parse_logit_bias(value: object) -> tuple[tuple[int, float], ...]:
    if value is None:
        return ()
    if not isinstance(value, dict) or len(value) > MAX_LOGIT_BIAS:
        raise bad(f"'logit_bias' must be an object of at most {MAX_LOGIT_BIAS} token ids.", param="logit_bias")
    out = []
    for key, bias in value.items():
        if not (isinstance(key, str) and key.isdigit() and int(key) < 2**32):
            raise bad(f"'logit_bias' keys must be token ids, got {key[:20]!r}.", param="logit_bias")
        if type(bias) not in (int, float) or not -100 <= bias <= 100:
            raise bad("'logit_bias' values must be numbers between -100 and 100.", param="logit_bias")
        if bias:
            out.append((int(key), float(bias)))
    return tuple(sorted(out))


def _parse_logprobs(body: dict, kind: str) -> tuple[bool, int]:
    """(report logprobs?, alternatives per token): chat's bool + ``top_logprobs``, or completions' integer."""
    if kind == "completion":
        k = _integer(body, "logprobs", -1, 0, 5) if body.get("logprobs") is not None else -1
        return k >= 0, max(k, 0)
    wanted = _boolean(body, "logprobs", False)
    top = _integer(body, "top_logprobs", 0, 0, MAX_TOP_LOGPROBS)
    if top and not wanted:
        raise bad("'top_logprobs' requires 'logprobs' to be true.", param="top_logprobs")
    return wanted, top


def _parse_response_format(value: object) -> tuple[bool, bool]:
    """(JSON object mode, JSON schema mode)."""
    if value is None:
        return False, False
    kind = value.get("type") if isinstance(value, dict) else None
    if kind not in ("text", "json_object", "json_schema"):
        raise bad("'response_format.type' must be 'text', 'json_object' or 'json_schema'.", param="response_format.type")
    if kind == "json_schema":
        spec = value.get("json_schema")
        if not isinstance(spec, dict) or not _is_function_name(spec.get("name")):
            raise bad("'response_format.json_schema' must be an object with a 'name' (1-64 letters, digits, _ or -).",
                      param="response_format.json_schema")
        if not isinstance(spec.get("schema", {}), dict) or not isinstance(spec.get("strict", False), (bool, type(None))):
            raise bad("'response_format.json_schema.schema' must be a JSON Schema object (and 'strict' a boolean).",
                      param="response_format.json_schema.schema")
    return kind == "json_object", kind == "json_schema"


_FUNCTION_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
MAX_TOOLS = 128
"""OpenAI's own bound on ``tools``."""


def _is_function_name(value: object) -> bool:
    return isinstance(value, str) and _FUNCTION_NAME.fullmatch(value) is not None


def _parse_tools(body: dict) -> dict:
    """``tools``, ``tool_choice`` and ``parallel_tool_calls`` checked, as the engine behind a host gets them."""
    for name in ("functions", "function_call"):
        if body.get(name) is not None:
            raise bad(f"'{name}' is deprecated and not supported here: send 'tools' and 'tool_choice'.", param=name,
                      code="unsupported_parameter")
    out: dict = {}
    tools = body.get("tools")
    names = set()
    if tools is not None:
        if not isinstance(tools, list) or len(tools) > MAX_TOOLS:
            raise bad(f"'tools' must be an array of at most {MAX_TOOLS} tools.", param="tools")
        for i, tool in enumerate(tools):
            where = f"tools[{i}]"
            function = tool.get("function") if isinstance(tool, dict) else None
            if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(function, dict):
                raise bad(f"'{where}' must be {{\"type\": \"function\", \"function\": {{...}}}}.", param=where)
            if not _is_function_name(function.get("name")):
                raise bad(f"'{where}.function.name' must be 1-64 letters, digits, underscores or dashes.", param=f"{where}.function.name")
            if not isinstance(function.get("parameters", {}), dict):
                raise bad(f"'{where}.function.parameters' must be a JSON Schema object.", param=f"{where}.function.parameters")
            if not isinstance(function.get("description", ""), str):
                raise bad(f"'{where}.function.description' must be a string.", param=f"{where}.function.description")
            names.add(function["name"])
        if tools:
            out["tools"] = tools
    choice = body.get("tool_choice")
    if choice is not None:
        if not names:
            raise bad("'tool_choice' is only allowed when 'tools' are specified.", param="tool_choice")
        if isinstance(choice, dict):
            function = choice.get("function")
            name = function.get("name") if isinstance(function, dict) else None
            if choice.get("type") != "function" or not isinstance(name, str):
                raise bad("'tool_choice' must be 'none', 'auto', 'required' or {\"type\": \"function\", \"function\": {\"name\": ...}}.", param="tool_choice")
            if name not in names:
                raise bad(f"'tool_choice' names the function '{name[:64]}', which is not in 'tools'.", param="tool_choice")
        elif choice not in ("none", "auto", "required"):
            raise bad("'tool_choice' must be 'none', 'auto', 'required' or {\"type\": \"function\", \"function\": {\"name\": ...}}.", param="tool_choice")
        out["tool_choice"] = choice
    parallel = body.get("parallel_tool_calls")
    if parallel is not None:
        if not isinstance(parallel, bool):
            raise bad("'parallel_tool_calls' must be a boolean.", param="parallel_tool_calls")
        if names:
            out["parallel_tool_calls"] = parallel
    return out


_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")
"""A JSON escape of a UTF-16 surrogate: the only way a JSON body can smuggle one into a string."""


def check_unicode(raw: bytes, body: object) -> None:
    """APIError(400) naming the first string of ``body`` that holds a lone surrogate.

    ``json.loads`` accepts ``"\\ud800"`` and returns a str no UTF-8 encoder
    takes, so it would fail deep in the relay (a 500). Only a body whose raw
    bytes hold a surrogate escape is walked: the common case costs one scan.
    """
    if _SURROGATE_ESCAPE.search(raw) is None:
        return
    where = _lone_surrogate(body, "")
    if where is not None:
        raise bad(f"'{where or 'body'}' holds a lone UTF-16 surrogate, which is not valid Unicode.", param=where or None)


def _lone_surrogate(value: object, where: str) -> str | None:
    """The path of the first string (or key) in ``value`` that is not valid Unicode."""
    if isinstance(value, str):
        return None if _encodable(value) else where
    if isinstance(value, dict):
        for key, item in value.items():
            path = f"{where}.{key}" if where else key
            found = path if not _encodable(key) else _lone_surrogate(item, path)
            if found is not None:
                return found
    elif isinstance(value, list):
        for i, item in enumerate(value):
            found = _lone_surrogate(item, f"{where}[{i}]")
            if found is not None:
                return found
    return None


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


_MESSAGE_FIELDS = {"assistant": frozenset({"role", "content", "tool_calls"}), "tool": frozenset({"role", "content", "tool_call_id"})}
_TEXT_FIELDS = frozenset({"role", "content"})


def _parse_messages(value: object) -> tuple[tuple[ChatMessage, ...], list | None, bool, bool]:
    """The messages flattened to text; the messages as given where one is more than
    text (else None); whether any holds an image (a vision need); whether any is a
    tool call or a tool result (a tools need)."""
    if not isinstance(value, list) or not value:
        raise bad("'messages' must be a non-empty array.", param="messages")
    if len(value) > MAX_MESSAGES:
        raise bad(f"'messages' may hold at most {MAX_MESSAGES} messages.", param="messages")
    out = []
    total = 0
    vision = tool_turns = False
    for i, m in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise bad(f"'{where}' must be an object.", param=where)
        role = m.get("role")
        if role == "function":
            raise bad(f"'{where}.role' is 'function', which is deprecated: send tool results with role 'tool'.",
                      param=f"{where}.role", code="unsupported_parameter")
        if role not in ROLES:
            raise bad(f"'{where}.role' must be one of {', '.join(ROLES)}.", param=f"{where}.role")
        for name in m:
            if name not in _MESSAGE_FIELDS.get(role, _TEXT_FIELDS):
                raise bad(f"'{where}.{name}' is not supported on a '{role}' message.", param=f"{where}.{name}", code="unsupported_parameter")
        calls = _tool_calls_text(m.get("tool_calls"), f"{where}.tool_calls") if role == "assistant" else ""
        if role == "tool":
            call_id = m.get("tool_call_id")
            if not isinstance(call_id, str) or not call_id:
                raise bad(f"'{where}.tool_call_id' is required: the id of the tool call this message answers.", param=f"{where}.tool_call_id")
        tool_turns = tool_turns or role == "tool" or bool(calls)
        if m.get("content") is None and not calls:
            raise bad(f"'{where}.content' is required.", param=f"{where}.content")
        text, images = _content_text(m.get("content") or "", f"{where}.content", images_allowed=role in ("user", "system", "developer"))
        vision = vision or images
        text += calls
        total += len(text)
        if total > MAX_PROMPT_CHARS:
            raise bad("The messages are too long.", param="messages", code="context_length_exceeded")
        out.append(ChatMessage(role=role, content=text))
    return tuple(out), (value if vision or tool_turns else None), vision, tool_turns


def _tool_calls_text(value: object, where: str) -> str:
    """An assistant message's ``tool_calls`` checked; their JSON, which the flattened message carries as text."""
    if value is None:
        return ""
    if not isinstance(value, list) or not value or len(value) > MAX_TOOLS:
        raise bad(f"'{where}' must be a non-empty array of at most {MAX_TOOLS} tool calls.", param=where)
    for i, call in enumerate(value):
        function = call.get("function") if isinstance(call, dict) else None
        if (not isinstance(call, dict) or call.get("type") != "function" or not isinstance(call.get("id"), str)
                or not isinstance(function, dict) or not _is_function_name(function.get("name"))
                or not isinstance(function.get("arguments"), str)):
            raise bad(f"'{where}[{i}]' must be {{\"id\", \"type\": \"function\", \"function\": {{\"name\", \"arguments\": string}}}}.",
                      param=f"{where}[{i}]")
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def _content_text(content: object, where: str, *, images_allowed: bool = True) -> tuple[str, bool]:
    """The text of a message's content, and whether it holds image parts."""
    if isinstance(content, str):
        return content, False
    if isinstance(content, list):
        parts = []
        images = False
        for i, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str):
                parts.append(part["text"])
            elif kind == "image_url" and images_allowed:
                image = part.get("image_url")
                if not isinstance(image, dict) or not isinstance(image.get("url"), str) or image.get("detail", "auto") not in ("auto", "low", "high"):
                    raise bad(f"'{where}[{i}].image_url' must be {{\"url\": string, \"detail\"?: auto|low|high}}.", param=f"{where}[{i}].image_url")
                images = True
            else:
                allowed = "a text or image_url part" if images_allowed else "a text part"
                raise bad(f"'{where}[{i}]' must be {allowed}.", param=f"{where}[{i}]")
        return "".join(parts), images
    raise bad(f"'{where}' must be a string or an array of content parts.", param=where)


def _parse_prompt(value: object) -> tuple[str, tuple[str, ...], tuple[tuple[int, ...], ...]]:
    """The prompt; all of them when a list of several strings batches prompts; or the prompts as token ids."""
    if isinstance(value, list) and value and all(isinstance(p, str) for p in value):
        if len(value) > MAX_CHOICES:
            raise bad(f"'prompt' may batch at most {MAX_CHOICES} prompts.", param="prompt")
        if sum(len(p) for p in value) > MAX_PROMPT_CHARS:
            raise bad("The prompts are too long.", param="prompt", code="context_length_exceeded")
        return value[0], (tuple(value) if len(value) > 1 else ()), ()
    if isinstance(value, list) and value and all(type(t) is int for t in value):
        value = [value]
    if isinstance(value, list) and value and all(isinstance(p, list) and p and all(type(t) is int and 0 <= t < 2**32 for t in p) for p in value):
        if len(value) > MAX_CHOICES or sum(len(p) for p in value) > MAX_PROMPT_CHARS:
            raise bad("The token-id prompts are too long.", param="prompt", code="context_length_exceeded")
        return "", (), tuple(tuple(p) for p in value)
    if not isinstance(value, str):
        raise bad("'prompt' must be a string, an array of strings, an array of token ids or an array of such arrays.", param="prompt")
    if len(value) > MAX_PROMPT_CHARS:
        raise bad("The prompt is too long.", param="prompt", code="context_length_exceeded")
    return value, (), ()


def _parse_stop(value: object) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or len(value) > MAX_STOP_SEQUENCES or not all(isinstance(s, str) and 0 < len(s) <= 256 for s in value):
        raise bad(f"'stop' must be a string or up to {MAX_STOP_SEQUENCES} non-empty strings.", param="stop")
    return tuple(value)


def _boolean(body: dict, name: str, default: bool) -> bool:
    value = body.get(name, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise bad(f"'{name}' must be a boolean.", param=name)
    return value


def _integer(body: dict, name: str, default: int, low: int, high: int) -> int:
    value = body.get(name)
    if value is None:
        return default
    if type(value) is not int or not low <= value <= high:
        raise bad(f"'{name}' must be an integer between {low} and {high}.", param=name)
    return value


def _number(body: dict, name: str, default: float, low: float, high: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if type(value) not in (int, float) or not low <= value <= high:
        raise bad(f"'{name}' must be a number between {low:g} and {high:g}.", param=name)
    return float(value)


MAX_EMBEDDING_INPUTS = 2048
"""OpenAI's own bound on inputs per embeddings request."""


@dataclass(frozen=True, slots=True)
class EmbeddingRequest:
    model: str
    inputs: tuple[str, ...]
    base64: bool
    """``encoding_format: "base64"`` (the openai SDK's default): float32 bytes, base64-encoded."""
    user: str | None


def parse_embedding_request(body: object) -> EmbeddingRequest:
    """Validate a /v1/embeddings body; APIError(400) naming the field if wrong."""
    if not isinstance(body, dict):
        raise bad("The request body must be a JSON object.")
    for name in body:
        if name not in ("model", "input", "encoding_format", "dimensions", "user"):
            raise bad(f"Unrecognized request argument supplied: {name}", param=name, code="unsupported_parameter")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad("you must provide a model parameter", param="model")
    value = body.get("input")
    inputs = [value] if isinstance(value, str) else value
    if not isinstance(inputs, list) or not inputs or len(inputs) > MAX_EMBEDDING_INPUTS:
        raise bad(f"'input' must be a string or an array of 1..{MAX_EMBEDDING_INPUTS} strings.", param="input")
    for i, text in enumerate(inputs):
        if not isinstance(text, str):
            raise bad("'input' as token ids is not supported by this gateway: send text.", param="input", code="unsupported_parameter")
        if not text:
            raise bad(f"'input[{i}]' is empty.", param="input")
        if len(text) > MAX_PROMPT_CHARS:
            raise bad(f"'input[{i}]' is too long.", param="input", code="context_length_exceeded")
    encoding = body.get("encoding_format", "float")
    if encoding not in ("float", "base64"):
        raise bad("'encoding_format' must be 'float' or 'base64'.", param="encoding_format")
    if body.get("dimensions") is not None:
        raise bad("'dimensions' is not supported: the model's own size is returned.", param="dimensions", code="unsupported_parameter")
    user = body.get("user")
    if user is not None and not isinstance(user, str):
        raise bad("'user' must be a string.", param="user")
    return EmbeddingRequest(model, tuple(inputs), encoding == "base64", user)
