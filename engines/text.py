"""Turning a growing list of token ids into settled text, and stopping on stop strings.

Byte-level tokens can split a UTF-8 character, and a token decodes differently alone
than in context, so text is released only once it is settled: the offsets method of
Hugging Face text-generation-inference, which decodes a short window of recent tokens.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

Decode = Callable[[Sequence[int]], str]

_REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    """Feed token ids one at a time; get back the text each one settles."""

    def __init__(self, decode: Decode):
        self._decode = decode
        self._ids: list[int] = []
        self._prefix_offset = 0  # start of the window decoded for context
        self._read_offset = 0  # tokens before this are already released as text

    def push(self, token_id: int) -> str:
        self._ids.append(token_id)
        return self._release(final=False)

    def flush(self) -> str:
        """Whatever text is still held back (e.g. a trailing incomplete character)."""
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        released = self._decode(self._ids[self._prefix_offset : self._read_offset])
        window = self._decode(self._ids[self._prefix_offset :])
        if len(window) > len(released) and (final or not window.endswith(_REPLACEMENT)):
            self._prefix_offset = self._read_offset
            self._read_offset = len(self._ids)
            return window[len(released) :]
        return ""


class StopStringMatcher:
    """Holds back text that may become a stop string; cuts the output at the first one.

    Each feed looks only at the text a stop string could still end in (the held-back
    text and the new text), and for held-back suffixes only at positions whose character
    begins some stop string: its cost follows the new text, not the number of stop strings.
    """

    def __init__(self, stops: Sequence[str]):
        self._stops = [stop for stop in stops if stop]
        self._by_first: dict[str, list[str]] = {}
        for stop in self._stops:
            self._by_first.setdefault(stop[0], []).append(stop)
        self._longest = max((len(stop) for stop in self._stops), default=0)
        self._pending = ""
        self.matched: str | None = None  # the stop string found, once feed() has found one

    def feed(self, text: str) -> tuple[str, bool]:
        """Returns (text safe to release, whether a stop string was found)."""
        if not self._stops:
            return text, False
        self._pending += text
        found, self.matched = self._first_stop()
        if found >= 0:
            released, self._pending = self._pending[:found], ""
            return released, True
        cut = self._held_from()
        released, self._pending = self._pending[:cut], self._pending[cut:]
        return released, False

    def flush(self) -> str:
        released, self._pending = self._pending, ""
        return released

    def _first_stop(self) -> tuple[int, str | None]:
        """Where the first stop string in the pending text starts, and which it is; or (-1, None)."""
        pending, by_first = self._pending, self._by_first
        for start, character in enumerate(pending):
            for stop in by_first.get(character, ()):
                if pending.startswith(stop, start):
                    return start, stop
        return -1, None

    def _held_from(self) -> int:
        """Start of the longest end of the pending text that begins some stop string."""
        pending, by_first = self._pending, self._by_first
        for start in range(max(0, len(pending) - self._longest + 1), len(pending)):
            tail = pending[start:]
            if any(stop.startswith(tail) for stop in by_first.get(pending[start], ())):
                return start
        return len(pending)
