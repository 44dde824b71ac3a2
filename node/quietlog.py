"""Log a condition once, not every time a loop meets it again.

A host keeps refusing the same order from an out-of-credit gateway every half
minute, and a gateway whose hub is down fails its allowance renewal every few
seconds: each line is true, and a screen of them hides everything else. A
:class:`QuietLog` writes the first line of a condition, then at most one line
per ``window_s`` saying how many times it happened since, and one line when it
is over. There is no maintained library for this in the logging or trio
ecosystem (logging's filters see records, not conditions), and it is a few
lines.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

WINDOW_S = 300.0


@dataclass
class _Seen:
    last_logged: float
    repeats: int = 0


class QuietLog:
    """``logger`` with each condition (a key) logged once per window.

    The key names the condition ("allowance renewal", "refused: busy"); the
    text may differ between repeats (a queue length, an error's wording) and
    the line written at the end of a window carries the latest.
    """

    def __init__(self, logger: logging.Logger, *, window_s: float = WINDOW_S, clock: Callable[[], float] = time.monotonic) -> None:
        self.logger = logger
        self.window_s = window_s
        self._clock = clock
        self._seen: dict[str, _Seen] = {}

    def log(self, level: int, key: str, msg: str, *args: object) -> None:
        """Log ``msg % args`` unless ``key`` was logged within the window."""
        now = self._clock()
        seen = self._seen.get(key)
        if seen is not None and now - seen.last_logged < self.window_s:
            seen.repeats += 1
            return
        text = msg % args if args else msg
        if seen is not None and seen.repeats:
            text += f" (and {seen.repeats} more like this in the last {now - seen.last_logged:.0f} s)"
        self._seen[key] = _Seen(now)
        self.logger.log(level, "%s", text)

    def info(self, key: str, msg: str, *args: object) -> None:
        self.log(logging.INFO, key, msg, *args)

    def warning(self, key: str, msg: str, *args: object) -> None:
        self.log(logging.WARNING, key, msg, *args)

    def resolved(self, key: str, msg: str, *args: object) -> None:
        """The condition of ``key`` is over: say so at INFO, if it was logged."""
        seen = self._seen.pop(key, None)
        if seen is not None:
            text = msg % args if args else msg
            self.logger.info("%s", text + (f" (after {seen.repeats} more like it)" if seen.repeats else ""))
