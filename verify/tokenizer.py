"""Byte-level tokenizer and chat template for the reference model.

Every byte is its own token, so any text encodes without an unknown token and
the tokenizer needs no vocabulary file: hosts and verifiers agree on it by
construction. A few special tokens sit above the bytes. ``encode`` never
produces them, whatever the text says: a user who types ``<|user|>`` gets those
bytes, not a role marker, so message content cannot forge turns of the chat
template.
"""

from __future__ import annotations

import codecs
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

__all__ = ["ByteTokenizer", "StreamDecoder"]

_BYTE_TOKENS = 256
# Order fixes the ids: 256 onwards. Changing it changes every model id.
_SPECIALS = ("bos", "eos", "system", "user", "assistant", "end_of_turn")
BOS_ID, EOS_ID, SYSTEM_ID, USER_ID, ASSISTANT_ID, END_OF_TURN_ID = range(_BYTE_TOKENS, _BYTE_TOKENS + len(_SPECIALS))
_STOP_IDS = frozenset((EOS_ID, END_OF_TURN_ID))
_ROLE_IDS = {"system": SYSTEM_ID, "developer": SYSTEM_ID, "user": USER_ID, "assistant": ASSISTANT_ID}


class ByteTokenizer:
    """Bytes 0-255 as tokens 0-255, then BOS, EOS and the chat-template markers.

    The chat template is ``BOS (ROLE content END_OF_TURN)* ASSISTANT``; the model
    answers until it draws END_OF_TURN or EOS, the ids in ``stop_ids``.
    """

    bos_id = BOS_ID
    eos_id = EOS_ID
    system_id = SYSTEM_ID
    user_id = USER_ID
    assistant_id = ASSISTANT_ID
    end_of_turn_id = END_OF_TURN_ID

    @property
    def vocab_size(self) -> int:
        return _BYTE_TOKENS + len(_SPECIALS)

    @property
    def stop_ids(self) -> frozenset[int]:
        """Token ids that end a generation with finish_reason "stop"."""
        return _STOP_IDS

    @property
    def description(self) -> str:
        """A canonical string naming this tokenizer and its chat template.

        It is hashed into the model id: the same weights behind a different
        template would answer the same messages differently.
        """
        return "bytes256+" + ",".join(_SPECIALS) + ";chat=role-content-eot;v1"

    def is_special(self, token_id: int) -> bool:
        return token_id >= _BYTE_TOKENS

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Iterable[int]) -> str:
        """Text of the byte tokens in ``ids``; special tokens carry no text.

        Invalid UTF-8 (a model may emit any byte) becomes U+FFFD rather than an
        error, as every text-serving API does.
        """
        return self._bytes(ids).decode("utf-8", errors="replace")

    def stream_decoder(self) -> StreamDecoder:
        return StreamDecoder(self)

    def completion_prompt(self, text: str) -> list[int]:
        return [self.bos_id, *self.encode(text)]

    def chat_prompt(self, messages: Sequence[Mapping[str, Any]]) -> list[int]:
        """Encode OpenAI-style messages and open the assistant's turn.

        ``developer`` is OpenAI's newer name for ``system`` and is treated as
        one. Content is a string or a list of ``{"type": "text"}`` parts,
        joined with newlines as vLLM does; any other role or part type is a
        ValueError, never silently dropped.
        """
        if not messages:
            raise ValueError("messages must contain at least one message")
        ids = [self.bos_id]
        for position, message in enumerate(messages):
            if not isinstance(message, Mapping):
                raise ValueError(f"messages[{position}] must be an object with role and content")
            role = message.get("role")
            if role not in _ROLE_IDS:
                known = ", ".join(sorted(_ROLE_IDS))
                raise ValueError(f"messages[{position}]: unknown role {role!r} (expected one of {known})")
            ids.append(_ROLE_IDS[role])
            ids.extend(self.encode(_content_text(message.get("content"), position)))
            ids.append(self.end_of_turn_id)
        ids.append(self.assistant_id)
        return ids

    def _bytes(self, ids: Iterable[int]) -> bytes:
        out = bytearray()
        for token_id in ids:
            if not 0 <= token_id < self.vocab_size:
                raise ValueError(f"token id {token_id} is outside the vocabulary (0..{self.vocab_size - 1})")
            if token_id < _BYTE_TOKENS:
                out.append(token_id)
        return bytes(out)


class StreamDecoder:
    """Turns tokens into text as they arrive, emitting only whole characters.

    A multi-byte character split across tokens is held back until its last
    byte arrives, so a stream never shows U+FFFD for a character that was
    merely cut in two; ``flush`` releases what is left at the end (bytes that
    never formed a character then do become U+FFFD).
    """

    def __init__(self, tokenizer: ByteTokenizer) -> None:
        self._tokenizer = tokenizer
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, token_id: int) -> str:
        return self._decoder.decode(self._tokenizer._bytes((token_id,)))

    def flush(self) -> str:
        return self._decoder.decode(b"", final=True)


def _content_text(content: Any, position: int) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, Mapping) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ValueError(f"messages[{position}].content: only text parts are supported, got {part!r}")
            texts.append(part["text"])
        return "\n".join(texts)
    kind = type(content).__name__
    raise ValueError(f"messages[{position}].content must be a string or a list of text parts, got {kind}")
