"""The model runner: what an engine gives the continuous batcher (engines.batching), forward
passes over its own KV state, one sequence per int id."""

from __future__ import annotations

import abc
from typing import Any

import numpy as np

from llmgrpc.clients.errors import FailedPrecondition
from llmgrpc.engines.base import GenerationRequest
from llmgrpc.engines.chat import Chat
from llmgrpc.engines.prefix_cache import KvEventLog


class ModelRunner(abc.ABC):
    """Forward passes of one model for the batcher, each sequence keyed by an int id.

    Called from the batcher's thread only, except ``tokenize``: it runs on other threads,
    beside the other methods, so it must only read the tokenizer. Logits come back as
    float32 numpy rows.
    """

    context_length: int
    vocab_size: int
    eos_token_ids: frozenset[int]
    caches_prefixes = False  # whether admit may find a prompt's prefix already held
    kv_events: KvEventLog | None = None  # what a prefix cache stores and evicts
    # Tokens of prefix that a prompt token attends to at the cost of its other work (the linear
    # layers): the batcher's step budget then counts a part fed after a long prefix as more
    # than its tokens. 0: attending is not counted.
    prefix_tokens_per_token: float = 0.0

    @abc.abstractmethod
    def tokenize(self, text: str, parse_special: bool = False) -> list[int]:
        """Token ids of a prompt, with the model's beginning-of-text token. Special-token
        spellings in text ("<|eot_id|>") are ordinary text unless parse_special."""

    @abc.abstractmethod
    def detokenize(self, token_ids: list[int]) -> str:
        """Text of generated token ids, special tokens left out."""

    def chat_prompt_ids(self, chat: Chat) -> list[int]:
        """Token ids of a conversation rendered by the model's own chat template, control tokens
        only where the template writes them (engines.chat.chat_prompt_ids)."""
        raise FailedPrecondition("this engine cannot render chat messages: send prompt instead")

    def token_text(self, token_id: int) -> str:
        """One token's text decoded alone, special tokens as written (for logprobs, Tokenize)."""
        return self.detokenize([token_id])

    def grammar_tokenizer(self) -> Any:
        """llguidance's view of the tokenizer (engines.constraints), for structured output.
        Called once, on the first request that asks for a format, from another thread."""
        raise FailedPrecondition(f"{type(self).__name__} does not support structured_output")

    def admit(self, sequence_id: int, prompt_ids: list[int], request: GenerationRequest) -> int:
        """Start a sequence, once, before its first prefill part; from then on the runner knows
        it, and ``release`` forgets it.

        Returns how many leading tokens of prompt_ids the runner already holds KV for (a
        prefix-cache hit, fewer than all so that the last token's logits are computed): the
        batcher feeds only the rest. The default holds none."""
        return 0

    def can_admit(self, request: GenerationRequest) -> bool:
        """Whether a sequence of request can start now; one that cannot waits, first in the queue,
        while the others go ahead (e.g. its LoRA adapter needs a slot that running sequences hold)."""
        return True

    @abc.abstractmethod
    def prefill(self, sequences: list[tuple[int, list[int]]]) -> np.ndarray:
        """Feed each sequence the next part of its prompt; logits of each part's last token.

        A sequence's first part starts it; a long prompt comes in several calls, in order.
        A sequence is decoded only once its whole prompt is in (its first ``decode``).
        """

    @abc.abstractmethod
    def decode(self, last_tokens: dict[int, int]) -> np.ndarray:
        """One step for every live sequence: feed each its last token, rows in key order.

        The rows may be a view of the runner's own buffer: valid until its next call."""

    @abc.abstractmethod
    def release(self, sequence_id: int) -> None:
        """Forget an admitted sequence, decoding, being prefilled or not yet fed at all, and
        free its KV state (or keep it for a later prompt that shares its prefix)."""
