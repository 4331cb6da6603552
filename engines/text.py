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
    """Holds back text that may become a stop string; cuts the output at the first one."""

    def __init__(self, stops: Sequence[str]):
        self._stops = [stop for stop in stops if stop]
        self._pending = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """Returns (text safe to release, whether a stop string was found)."""
        if not self._stops:
            return text, False
        self._pending += text
        found = [index for index in (self._pending.find(stop) for stop in self._stops) if index >= 0]
        if found:
            released, self._pending = self._pending[: min(found)], ""
            return released, True
        held = self._longest_stop_prefix_suffix()
        cut = len(self._pending) - held
        released, self._pending = self._pending[:cut], self._pending[cut:]
        return released, False

    def flush(self) -> str:
        released, self._pending = self._pending, ""
        return released

    def _longest_stop_prefix_suffix(self) -> int:
        """Length of the longest end of the pending text that begins some stop string."""
        best = 0
        for stop in self._stops:
            for length in range(min(len(stop) - 1, len(self._pending)), best, -1):
                if self._pending.endswith(stop[:length]):
                    best = length
                    break
        return best
