"""Which hosts can serve a request at all: its needs against an offer's capabilities.

A request needs what its parameters ask for (tools, JSON mode, logprobs with
some number of alternatives, ``n`` choices, penalties, ...); a host's signed
offer says what its backend does (``protocol.messages.Capabilities``).
Matching (`matching.MatchPolicy`) drops every offer that lacks a need before
it ranks, and the gateway names what no host has, so a client learns why
("no host offers tools for model M") instead of getting a response that
silently ignored the parameter.

Pure code: no I/O, no clock.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, fields
from typing import Protocol

from gpunexus.protocol.messages import PLAIN_TEXT


class CapabilitiesLike(Protocol):
    """What needs are checked against (``protocol.messages.Capabilities`` fits)."""

    tools: bool
    json_mode: bool
    json_schema: bool
    logprobs: bool
    top_logprobs: int
    max_n: int
    penalties: bool
    logit_bias: bool
    vision: bool
    embeddings: bool


@dataclass(frozen=True)
class Needs:
    """What one request asks of its host; the defaults ask for plain text only."""

    tools: bool = False
    json_mode: bool = False
    json_schema: bool = False
    logprobs: bool = False
    top_logprobs: int = 0
    n: int = 1
    penalties: bool = False
    logit_bias: bool = False
    vision: bool = False
    embeddings: bool = False

    @property
    def plain(self) -> bool:
        return self == PLAIN


PLAIN = Needs()


def lacking(caps: CapabilitiesLike, needs: Needs) -> tuple[str, ...]:
    """The needs ``caps`` does not meet, each named as a client would ask for it."""
    out = []
    for f in fields(Needs):
        name, wanted = f.name, getattr(needs, f.name)
        if name == "n":
            if wanted > caps.max_n:
                out.append(f"n={wanted}")
        elif name == "top_logprobs":
            if wanted > caps.top_logprobs:
                out.append(f"top_logprobs={wanted}")
        elif wanted and not getattr(caps, name):
            out.append(name)
    return tuple(out)


def unmet(capabilities: Iterable[CapabilitiesLike], needs: Needs) -> tuple[str, ...]:
    """Empty when some host meets every need; else what to name in the refusal.

    The needs no host meets at all; or, when each is met by some host but
    none meets them all, every need (the combination is what is missing).
    """
    per_host = [lacking(c, needs) for c in capabilities]
    if not per_host or any(not missing for missing in per_host):
        return () if per_host else lacking(PLAIN_TEXT, needs)
    nobody = [name for name in per_host[0] if all(name in missing for missing in per_host)]
    return tuple(nobody) if nobody else lacking(PLAIN_TEXT, needs)
