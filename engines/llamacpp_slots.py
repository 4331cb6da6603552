"""llama.cpp's sequence slots as a prefix cache: which slot a new prompt takes, what each holds.

A finished sequence leaves its KV in its slot, and the slot remembers the tokens it holds.
A new prompt takes the free slot whose tokens share the longest prefix with it, provided
that prefix is at least ``similarity`` of what the slot holds (llama.cpp server's rule:
a short match does not wreck a long cached conversation); otherwise it takes the least
recently used free slot (an empty one first). It keeps the shared prefix and is prefilled
from there on. Pure bookkeeping: the runner removes the KV cells past the kept prefix.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from llmgrpc.clients.errors import ResourceExhausted
from llmgrpc.engines.prefix_cache import KvEventLog, common_prefix_length

_NO_TOKENS = np.zeros(0, dtype=np.int64)


@dataclass(eq=False)
class Slot:
    """One llama.cpp sequence: the tokens whose KV it holds, under which adapter."""

    index: int
    tokens: np.ndarray = field(default_factory=lambda: _NO_TOKENS)
    adapter: str = ""
    last_used: int = 0
    busy: bool = False
    block_hashes: list[int] = field(default_factory=list)


class SlotTable:
    """The slots of one context: taken by a new sequence, given back when it ends."""

    def __init__(self, count: int, events: KvEventLog, *, enabled: bool = True, similarity: float = 0.5):
        self.slots = [Slot(index) for index in range(count)]
        self.events = events
        self.enabled = enabled
        self.similarity = similarity
        self._clock = 0

    @property
    def cached_tokens(self) -> int:
        """Tokens held by free slots, ready for a prompt that starts with them."""
        return sum(len(slot.tokens) for slot in self.slots if not slot.busy)

    def take(self, prompt_ids: Sequence[int], adapter: str = "", reuse: bool = True) -> tuple[int, int]:
        """A free slot for prompt_ids, and how many of its leading tokens the slot already holds
        (at most all but the last: the last token's logits must be computed)."""
        free = [slot for slot in self.slots if not slot.busy]
        if not free:
            raise ResourceExhausted(f"all {len(self.slots)} llama.cpp slots are in use")
        reuse = reuse and self.enabled
        chosen, kept = None, 0
        if reuse:
            for slot in free:
                if slot.adapter != adapter:
                    continue
                length = common_prefix_length(slot.tokens, prompt_ids)
                if length > kept and length >= self.similarity * len(slot.tokens):
                    chosen, kept = slot, length
        if chosen is None:
            chosen = min(free, key=lambda slot: slot.last_used)
            same_kind = reuse and chosen.adapter == adapter
            kept = common_prefix_length(chosen.tokens, prompt_ids) if same_kind else 0
        kept = max(0, min(kept, len(prompt_ids) - 1))
        chosen.busy = True
        self._touch(chosen)
        self._hold(chosen, prompt_ids[:kept], adapter)
        return chosen.index, kept

    def give_back(self, index: int, held_ids: Sequence[int], adapter: str = "") -> None:
        """A sequence ended; its slot holds the KV of held_ids (empty: nothing to keep)."""
        slot = self.slots[index]
        self._hold(slot, held_ids if self.enabled else (), adapter)
        slot.busy = False
        self._touch(slot)

    def _touch(self, slot: Slot) -> None:
        self._clock += 1
        slot.last_used = self._clock

    def _hold(self, slot: Slot, tokens: Sequence[int], adapter: str) -> None:
        # Stored before removed: blocks the old and new runs share are never announced as gone.
        hashes = self.events.stored(tokens, adapter) if len(tokens) else []
        self.events.removed(slot.block_hashes)
        slot.block_hashes = hashes
        slot.tokens = np.asarray(tokens, dtype=np.int64) if len(tokens) else _NO_TOKENS
        slot.adapter = adapter if len(tokens) else ""
