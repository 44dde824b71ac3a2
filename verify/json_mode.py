"""JSON mode for a byte-level vocabulary: which next bytes keep the output a JSON object.

``response_format: {"type": "json_object"}`` is honoured by constrained
decoding: before every draw, the bytes that cannot continue a valid JSON
object are masked out, so the output always parses, whatever the model
would have said. Two things make that a guarantee rather than a tendency:

* **The length limit.** :meth:`JsonState.close_len` is the fewest bytes that
  finish the document from here (close the open string, number or literal,
  supply a missing value, close every bracket). A byte is allowed only if the
  document can still be finished in the tokens left after it, so an output
  cut by ``max_tokens`` still closes: near the end only bytes that make
  progress toward closing remain.
* **Valid text.** Strings hold only valid UTF-8 (no lone continuation
  bytes, overlongs or surrogates) and escapes other than ``\\u`` (a ``\\u``
  escape may spell a lone surrogate, which parses in Python and then cannot
  be encoded); control bytes never appear unescaped.

The grammar is compact JSON (RFC 8259) with one optional space after ``:``
and ``,``, and nothing after the top-level object but a stop token. Allowed
sets depend only on the lexer state and the innermost bracket, so they are
computed once per state and cached; per token the cost is one dict lookup
and one vector add, except in the last few tokens before the limit.
"""

from __future__ import annotations

import numpy as np

__all__ = ["JsonMask", "JsonState"]

# Lexer modes.
START, VALUE, ARR_FIRST, OBJ_FIRST, OBJ_KEY, AFTER_KEY, AFTER_VALUE, STR, STR_ESC, STR_UTF8, NUM, LIT, DONE = range(13)
# Number sub-states (aux of NUM): the ones marked * may end the number.
N_MINUS, N_ZERO, N_INT, N_DOT, N_FRAC, N_EXP, N_EXP_SIGN, N_EXP_DIGITS = range(8)
_NUM_ENDS = frozenset((N_ZERO, N_INT, N_FRAC, N_EXP_DIGITS))  # *
_NUM_OPEN = frozenset((N_MINUS, N_DOT, N_EXP, N_EXP_SIGN))  # need one more digit

_DIGITS = frozenset(b"0123456789")
_ESCAPES = frozenset(b'"\\/bfnrt')
_LITERALS = {ord("t"): b"rue", ord("f"): b"alse", ord("n"): b"ull"}
_SPACE = ord(" ")

MAX_GROWTH = 4
"""The most one byte can add to ``close_len`` (``,`` in an object opens a key that needs ``"":0``)."""


class JsonState:
    """The position inside a JSON document being written, one byte at a time.

    ``mode`` and ``aux`` are the lexer state, ``stack`` the open brackets
    (``"o"``/``"a"``). ``step`` returns False (and leaves the state broken)
    for a byte the grammar does not allow there.
    """

    __slots__ = ("aux", "mode", "stack")

    def __init__(self) -> None:
        self.mode = START
        self.aux: object = 0
        self.stack: list[str] = []

    def copy(self) -> JsonState:
        other = JsonState.__new__(JsonState)
        other.mode, other.aux, other.stack = self.mode, self.aux, list(self.stack)
        return other

    def key(self) -> tuple:
        """What the set of allowed bytes depends on."""
        return (self.mode, self.aux, self.stack[-1] if self.stack else None)

    @property
    def done(self) -> bool:
        return self.mode == DONE

    def close_len(self) -> int:
        """The fewest bytes that turn what was written into a complete document."""
        mode, aux, open_ = self.mode, self.aux, len(self.stack)
        if mode == START:
            return 2  # {}
        if mode in (VALUE,):
            return 1 + open_  # 0
        if mode == OBJ_KEY:
            return 4 + open_  # "":0
        if mode == AFTER_KEY:
            return 2 + open_  # :0
        if mode in (STR, STR_ESC, STR_UTF8):
            is_key = aux[0]  # type: ignore[index]
            pending = 1 if mode == STR_ESC else (aux[1] if mode == STR_UTF8 else 0)  # type: ignore[index]
            return pending + (3 if is_key else 1) + open_
        if mode == NUM:
            return (1 if aux in _NUM_OPEN else 0) + open_
        if mode == LIT:
            return len(aux) + open_  # type: ignore[arg-type]
        return open_  # ARR_FIRST, OBJ_FIRST, AFTER_VALUE, DONE

    def step(self, b: int) -> bool:
        mode, aux = self.mode, self.aux
        if mode == STR:
            if b == 0x22:
                self._end_string(aux[0])  # type: ignore[index]
            elif b == 0x5C:
                self.mode = STR_ESC
            elif 0x20 <= b < 0x80:
                pass
            else:
                return self._utf8_lead(b, aux[0])  # type: ignore[index]
            return True
        if mode == STR_UTF8:
            is_key, remaining, lo, hi = aux  # type: ignore[misc]
            if not lo <= b <= hi:
                return self._broken()
            self.mode, self.aux = (STR, (is_key,)) if remaining == 1 else (STR_UTF8, (is_key, remaining - 1, 0x80, 0xBF))
            return True
        if mode == STR_ESC:
            if b not in _ESCAPES:
                return self._broken()
            self.mode = STR
            return True
        if mode == NUM:
            return self._number(b, aux)  # type: ignore[arg-type]
        if mode == LIT:
            rest: bytes = aux  # type: ignore[assignment]
            if b != rest[0]:
                return self._broken()
            if len(rest) == 1:
                self.mode, self.aux = AFTER_VALUE, 0
            else:
                self.aux = rest[1:]
            return True
        if mode == START:
            return self._open(b) if b == ord("{") else self._broken()
        if mode in (VALUE, ARR_FIRST):
            if b == _SPACE and mode == VALUE and aux:
                self.aux = 0
                return True
            if b == ord("]") and mode == ARR_FIRST:
                return self._close(b)
            return self._value(b)
        if mode in (OBJ_FIRST, OBJ_KEY):
            if b == 0x22:
                self.mode, self.aux = STR, (True,)
                return True
            if b == ord("}") and mode == OBJ_FIRST:
                return self._close(b)
            if b == _SPACE and mode == OBJ_KEY and aux:
                self.aux = 0
                return True
            return self._broken()
        if mode == AFTER_KEY:
            if b != ord(":"):
                return self._broken()
            self.mode, self.aux = VALUE, 1
            return True
        if mode == AFTER_VALUE:
            return self._after_value(b)
        return self._broken()  # DONE: nothing but a stop token

    # --- pieces of step ----------------------------------------------------
    def _broken(self) -> bool:
        self.mode, self.aux = DONE, "broken"
        return False

    def _value(self, b: int) -> bool:
        if b in (ord("{"), ord("[")):
            return self._open(b)
        if b == 0x22:
            self.mode, self.aux = STR, (False,)
        elif b == ord("-"):
            self.mode, self.aux = NUM, N_MINUS
        elif b == ord("0"):
            self.mode, self.aux = NUM, N_ZERO
        elif b in _DIGITS:
            self.mode, self.aux = NUM, N_INT
        elif b in _LITERALS:
            self.mode, self.aux = LIT, _LITERALS[b]
        else:
            return self._broken()
        return True

    def _open(self, b: int) -> bool:
        self.stack.append("o" if b == ord("{") else "a")
        self.mode, self.aux = (OBJ_FIRST, 0) if b == ord("{") else (ARR_FIRST, 0)
        return True

    def _close(self, b: int) -> bool:
        if not self.stack or self.stack[-1] != ("o" if b == ord("}") else "a"):
            return self._broken()
        self.stack.pop()
        self.mode, self.aux = (AFTER_VALUE, 0) if self.stack else (DONE, 0)
        return True

    def _after_value(self, b: int) -> bool:
        if b == ord(","):
            self.mode, self.aux = (OBJ_KEY, 1) if self.stack[-1] == "o" else (VALUE, 1)
            return True
        if b in (ord("}"), ord("]")):
            return self._close(b)
        return self._broken()

    def _end_string(self, is_key: bool) -> None:
        self.mode, self.aux = (AFTER_KEY, 0) if is_key else (AFTER_VALUE, 0)

    def _utf8_lead(self, b: int, is_key: bool) -> bool:
        if 0xC2 <= b <= 0xDF:
            need, lo, hi = 1, 0x80, 0xBF
        elif 0xE0 <= b <= 0xEF:
            need, lo, hi = 2, (0xA0 if b == 0xE0 else 0x80), (0x9F if b == 0xED else 0xBF)
        elif 0xF0 <= b <= 0xF4:
            need, lo, hi = 3, (0x90 if b == 0xF0 else 0x80), (0x8F if b == 0xF4 else 0xBF)
        else:
            return self._broken()  # control byte, lone continuation, overlong or out-of-range lead
        self.mode, self.aux = STR_UTF8, (is_key, need, lo, hi)
        return True

    def _number(self, b: int, sub: int) -> bool:
        digit = b in _DIGITS
        if sub == N_MINUS:
            nxt = (N_ZERO if b == ord("0") else N_INT) if digit else None
        elif sub in (N_ZERO, N_INT):
            nxt = N_INT if digit and sub == N_INT else N_DOT if b == ord(".") else N_EXP if b in b"eE" else None
        elif sub == N_DOT:
            nxt = N_FRAC if digit else None
        elif sub == N_FRAC:
            nxt = N_FRAC if digit else N_EXP if b in b"eE" else None
        elif sub == N_EXP:
            nxt = N_EXP_DIGITS if digit else N_EXP_SIGN if b in b"+-" else None
        else:  # N_EXP_SIGN, N_EXP_DIGITS
            nxt = N_EXP_DIGITS if digit else None
        if nxt is not None:
            self.aux = nxt
            return True
        if sub not in _NUM_ENDS:
            return self._broken()
        self.mode, self.aux = AFTER_VALUE, 0
        return self._after_value(b)


class JsonMask:
    """Additive logit masks (0 allowed, -inf not) for a :class:`JsonState` and a token budget.

    Byte tokens are ids 0-255; ``stop_ids`` end a generation and are allowed
    only once the document is complete; every other special token never is.
    """

    def __init__(self, vocab_size: int, stop_ids: frozenset[int]) -> None:
        self.vocab_size = vocab_size
        self.stop_ids = stop_ids
        self._cache: dict[tuple, tuple[np.ndarray, tuple[int, ...]]] = {}
        done = np.full(vocab_size, -np.inf)
        done[list(stop_ids)] = 0.0
        self._done = done

    def mask(self, state: JsonState, remaining: int) -> np.ndarray:
        """The mask for the next token, ``remaining`` tokens (this one included) left in the budget.

        When the document cannot be finished in the budget whatever comes
        next (a budget under 2 tokens), the grammar alone applies: the
        output is then cut, and its finish reason says so.
        """
        if state.done:
            return self._done
        mask, allowed = self._allowed(state)
        if state.close_len() + MAX_GROWTH <= remaining - 1:
            return mask
        fits = [b for b in allowed if _after(state, b).close_len() <= remaining - 1]
        if not fits:
            return mask
        tight = np.full(self.vocab_size, -np.inf)
        tight[fits] = 0.0
        return tight

    def _allowed(self, state: JsonState) -> tuple[np.ndarray, tuple[int, ...]]:
        key = state.key()
        hit = self._cache.get(key)
        if hit is None:
            allowed = tuple(b for b in range(256) if _after(state, b) is not None)
            mask = np.full(self.vocab_size, -np.inf)
            mask[list(allowed)] = 0.0
            hit = self._cache[key] = (mask, allowed)
        return hit


def _after(state: JsonState, b: int) -> JsonState | None:
    other = state.copy()
    return other if other.step(b) else None
