"""The prefix cache's shared bookkeeping: matching a prompt against cached token runs, and
the KV events a gateway's cache-aware routing follows.

Both batched engines keep the KV of finished sequences and start a new prompt from the
cached run that shares the longest prefix with it (llama.cpp: a free slot; Transformers:
a stored entry). What is cached is described to the outside as vLLM describes its
blocks: runs of ``BLOCK_TOKENS`` tokens, each named by a hash chained to its parent's,
so that a gateway can tell which prompts a worker would serve from cache.
"""

from __future__ import annotations

import hashlib
import itertools
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

# Tokens per block in KV events (vLLM's default block size).
BLOCK_TOKENS = 16
# Events kept for subscribers that reconnect with a cursor (SubscribeKvEvents).
EVENT_HISTORY = 4096


def common_prefix_length(cached: np.ndarray, prompt: Sequence[int]) -> int:
    """How many leading tokens cached (an int array) and prompt share."""
    length = min(len(cached), len(prompt))
    if length == 0:
        return 0
    differ = np.flatnonzero(cached[:length] != np.asarray(prompt[:length]))
    return int(differ[0]) if differ.size else length


@dataclass
class KvEvent:
    """Blocks stored in the cache (with their tokens), or removed from it."""

    stored: bool
    block_hashes: list[int]
    parent_hash: int | None = None  # stored: the block before the first one, if any
    token_ids: list[list[int]] = field(default_factory=list)  # stored: each block's tokens
    adapter: str = ""


@dataclass
class KvEventBatch:
    """The events of one change to the cache, numbered from 1 in the order they happened."""

    sequence_number: int
    timestamp: float
    events: list[KvEvent]


def block_hashes(tokens: Sequence[int], adapter: str = "") -> list[int]:
    """The chained hashes of tokens' full blocks: each covers its parent's hash, its own tokens
    and the adapter the KV was computed under (a signed 64-bit int, as the contract has it)."""
    hashes: list[int] = []
    parent = adapter.encode()
    for start in range(0, len(tokens) - BLOCK_TOKENS + 1, BLOCK_TOKENS):
        block = np.asarray(tokens[start : start + BLOCK_TOKENS], dtype=np.int64).tobytes()
        digest = hashlib.blake2b(parent + block, digest_size=8).digest()
        hashes.append(int.from_bytes(digest, "little", signed=True))
        parent = digest
    return hashes


class KvEventLog:
    """Which blocks the cache holds, counted per holder, and the events of their coming and going.

    A block several cached runs share (a common system prompt) is stored once and removed
    when the last run holding it goes. Called from the batcher's thread; read from others.
    """

    def __init__(self, history: int = EVENT_HISTORY):
        self._holders: dict[int, int] = {}
        self._lock = threading.Condition()
        self._batches: deque[KvEventBatch] = deque(maxlen=history)
        self._numbers = itertools.count(1)

    def stored(self, tokens: Sequence[int], adapter: str = "") -> list[int]:
        """Record that a run of tokens is cached; returns its block hashes (give them to removed)."""
        hashes = block_hashes(tokens, adapter)
        new = [index for index, block in enumerate(hashes) if self._holders.get(block, 0) == 0]
        for block in hashes:
            self._holders[block] = self._holders.get(block, 0) + 1
        if new:
            first = new[0]
            self._publish(
                KvEvent(
                    stored=True,
                    block_hashes=[hashes[index] for index in new],
                    parent_hash=hashes[first - 1] if first else None,
                    token_ids=[
                        list(tokens[index * BLOCK_TOKENS : (index + 1) * BLOCK_TOKENS]) for index in new
                    ],
                    adapter=adapter,
                )
            )
        return hashes

    def removed(self, hashes: list[int]) -> None:
        """Record that a run stored with these hashes left the cache."""
        gone = []
        for block in hashes:
            holders = self._holders.get(block, 0) - 1
            if holders <= 0:
                self._holders.pop(block, None)
                gone.append(block)
            else:
                self._holders[block] = holders
        if gone:
            self._publish(KvEvent(stored=False, block_hashes=gone))

    def _publish(self, event: KvEvent) -> None:
        with self._lock:
            self._batches.append(KvEventBatch(next(self._numbers), time.time(), [event]))
            self._lock.notify_all()

    def since(self, sequence_number: int, timeout: float) -> list[KvEventBatch]:
        """The batches after sequence_number (the oldest kept, if it is older), waiting up to
        timeout seconds for one when there is none yet."""
        with self._lock:
            if not self._newer(sequence_number):
                self._lock.wait(timeout)
            return [batch for batch in self._batches if batch.sequence_number > sequence_number]

    def _newer(self, sequence_number: int) -> bool:
        return bool(self._batches) and self._batches[-1].sequence_number > sequence_number


@dataclass(eq=False)  # runs are told apart by identity, never by their arrays
class CachedRun:
    """A finished sequence's KV (opaque to the store), and the tokens it is the KV of."""

    tokens: np.ndarray
    kv: object
    adapter: str
    block_hashes: list[int]


class PrefixStore:
    """Finished sequences' KV, least recently used first out, at most capacity_tokens in all.

    A run whose tokens begin another's is dropped for it (the next turn of a conversation
    replaces the last), and a run another already covers, but for fewer than MIN_NEW_TOKENS at
    its end, is not stored: its KV would be copied whole for a few tokens more (a 12,000-token
    prompt sent again and answered in 4 tokens, on the tiny model: 6 ms of copying and 2 ms of
    hashing on the batcher's thread, in every stream's step).
    """

    MIN_NEW_TOKENS = BLOCK_TOKENS

    def __init__(self, capacity_tokens: int, events: KvEventLog):
        self.capacity_tokens = capacity_tokens
        self.events = events
        self._runs: list[CachedRun] = []  # least recently used first
        self.tokens = 0

    def longest_prefix(self, prompt_ids: Sequence[int], adapter: str = "") -> tuple[CachedRun | None, int]:
        """The run sharing the longest prefix with prompt_ids (now the most recently used), and
        the length shared, at most all but the prompt's last token."""
        best, length = None, 0
        for run in self._runs:
            if run.adapter == adapter:
                shared = common_prefix_length(run.tokens, prompt_ids)
                if shared > length:
                    best, length = run, shared
        if best is None:
            return None, 0
        self._runs.remove(best)
        self._runs.append(best)
        return best, min(length, len(prompt_ids) - 1)

    def covers(self, tokens: Sequence[int], adapter: str = "") -> bool:
        """Whether a run already holds all of tokens but fewer than MIN_NEW_TOKENS at their end
        (it is then the most recently used): storing them would copy their KV for next to nothing."""
        for run in self._runs:
            if run.adapter != adapter:
                continue
            shared = common_prefix_length(run.tokens, tokens)
            if shared and len(tokens) - shared < self.MIN_NEW_TOKENS:
                self._runs.remove(run)
                self._runs.append(run)
                return True
        return False

    def store(self, tokens: Sequence[int], kv: Callable[[], object], adapter: str = "") -> None:
        """Keep the KV of tokens, evicting the least recently used runs to make room. kv makes it
        (a copy out of the runner's buffers), called only when the store keeps it: not for tokens
        a run already covers."""
        if not 0 < len(tokens) <= self.capacity_tokens:
            return
        tokens = np.asarray(tokens, dtype=np.int64)  # once, not once per run compared
        if self.covers(tokens, adapter):
            return
        extended = []
        for run in self._runs:
            if run.adapter != adapter:
                continue
            if common_prefix_length(run.tokens, tokens) == len(run.tokens):  # the new run extends it
                extended.append(run)
        # Stored before the extended runs go: their shared blocks are never announced as removed.
        hashes = self.events.stored(tokens, adapter)
        for run in extended:
            self._drop(run)
        self._runs.append(CachedRun(tokens, kv(), adapter, hashes))
        self.tokens += len(tokens)
        while self.tokens > self.capacity_tokens:
            self._drop(self._runs[0])

    def _drop(self, run: CachedRun) -> None:
        self._runs.remove(run)
        self.tokens -= len(run.tokens)
        self.events.removed(run.block_hashes)
