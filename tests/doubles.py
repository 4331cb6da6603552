"""Test doubles (never used by the product)."""

from __future__ import annotations

import threading

import numpy as np

from llmgrpc.engines.model_runner import ModelRunner


class CountingRunner(ModelRunner):
    """A runner whose next token is always (last token + 1) % vocab; counts every step.

    Text is one character per token ("a" + token id), so stop strings are easy to aim at.
    Each decode step can be slowed with step_delay_s, and decoded_ids records which
    sequences each step decoded.
    """

    def __init__(
        self,
        vocab_size: int = 26,
        context_length: int = 64,
        eos_token_id: int = 25,
        step_delay_s: float = 0.0,
    ):
        self.vocab_size = vocab_size
        self.context_length = context_length
        self.eos_token_ids = frozenset({eos_token_id})
        self.step_delay_s = step_delay_s
        self.decoded_ids: list[list[int]] = []
        self.live: set[int] = set()
        self.prefilled: list[int] = []
        self.first_prefill = threading.Event()
        self.step_started = threading.Event()

    def tokenize(self, text: str, parse_special: bool = False) -> list[int]:
        return [ord(c) - ord("a") for c in text if "a" <= c <= "z"]

    def detokenize(self, token_ids: list[int]) -> str:
        return "".join(chr(ord("a") + t) for t in token_ids if t not in self.eos_token_ids)

    def _logits_after(self, token: int) -> np.ndarray:
        row = np.zeros(self.vocab_size, dtype=np.float32)
        row[(token + 1) % self.vocab_size] = 10.0
        return row

    def prefill(self, sequences):
        for sequence_id, _ in sequences:
            self.live.add(sequence_id)
            self.prefilled.append(sequence_id)
        self.first_prefill.set()
        return np.stack([self._logits_after(prompt[-1]) for _, prompt in sequences])

    def decode(self, last_tokens):
        self.step_started.set()
        self.decoded_ids.append(list(last_tokens))
        if self.step_delay_s:
            threading.Event().wait(self.step_delay_s)
        return np.stack([self._logits_after(token) for token in last_tokens.values()])

    def release(self, sequence_id: int) -> None:
        self.live.discard(sequence_id)
