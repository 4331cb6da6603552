"""Choosing the next token from a row of logits, per sequence, with its own seed.

Shared by every engine that hands the batcher raw logits, so the same parameters mean
the same thing on each. Order of operations, as in Hugging Face transformers and vLLM:
penalties, logit bias, the structured-output mask and banned tokens, then greedy argmax
or temperature, top-k, softmax, min-p, top-p and a draw from the sequence's own generator.

Log-probabilities (``token_logprobs``) come from the model's raw logits, before any of
that: vLLM's default, and the same on every engine.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

import numpy as np

from llmgrpc.engines.base import SamplingParams

# Below this temperature, sampling is greedy (vLLM's threshold): dividing logits by a
# temperature near 0 tells nothing more than argmax, and overflows float32.
GREEDY_BELOW_TEMPERATURE = 1e-5
FLOAT32_MAX = float(np.finfo(np.float32).max)


class Sampler:
    """Samples the tokens of one sequence; deterministic for a given seed and logits."""

    def __init__(self, params: SamplingParams, prompt_token_ids: Iterable[int]):
        self.params = params
        # The contract's seed is any int64; numpy takes only non-negative seeds: use its 64 bits.
        self.rng = np.random.default_rng(None if params.seed is None else params.seed % 2**64)
        self._seen = set(prompt_token_ids)  # prompt and output, for the repetition penalty
        self._output_counts: Counter[int] = Counter()
        self._bias_ids = np.fromiter(params.logit_bias.keys(), dtype=np.int64)
        self._bias = np.fromiter(params.logit_bias.values(), dtype=np.float32)
        # Greedy with nothing that changes logits: the argmax of the row as it is, no copy.
        self._plain_greedy = (
            (params.greedy or params.temperature < GREEDY_BELOW_TEMPERATURE)
            and params.repetition_penalty == 1.0
            and not params.presence_penalty
            and not params.frequency_penalty
            and not params.logit_bias
        )

    def sample(
        self, logits: np.ndarray, banned: Iterable[int] = (), allowed: np.ndarray | None = None
    ) -> int:
        """The next token for a 1-D row of logits (left unchanged). Tokens in banned are never
        chosen; where allowed (a boolean row, the structured-output mask) is given, only its
        tokens are, and it wins over banned if they leave nothing."""
        params = self.params
        if self._plain_greedy and allowed is None and not banned:
            return int(np.argmax(logits))  # penalties are off: nothing seen needs counting
        logits = np.array(logits, dtype=np.float32)
        self._apply_penalties(logits)
        if self._bias_ids.size:
            keep = self._bias_ids < logits.shape[0]
            logits[self._bias_ids[keep]] += self._bias[keep]
        banned = [token for token in banned if 0 <= token < logits.shape[0]]
        if allowed is not None:
            if banned and allowed[banned].any():
                allowed = allowed.copy()
                allowed[banned] = False
                if not allowed.any():  # min_tokens bans end-of-text where the format must end
                    allowed[banned] = True
            logits[~allowed] = -np.inf
        elif banned:
            logits[banned] = -np.inf
        if params.greedy or params.temperature < GREEDY_BELOW_TEMPERATURE:
            token = int(np.argmax(logits))
        else:
            token = self._draw(logits)
        self._seen.add(token)
        self._output_counts[token] += 1
        return token

    def _apply_penalties(self, logits: np.ndarray) -> None:
        params = self.params
        if params.repetition_penalty != 1.0 and self._seen:
            seen = np.fromiter(self._seen, dtype=np.int64)
            seen = seen[seen < logits.shape[0]]
            values = logits[seen]
            with np.errstate(over="ignore", divide="ignore"):  # clipped below
                penalized = np.where(
                    values > 0, values / params.repetition_penalty, values * params.repetition_penalty
                )
            # A tiny penalty (1e-45) divides logits to inf, and inf - inf in softmax is NaN.
            logits[seen] = np.minimum(penalized, FLOAT32_MAX)
        if (params.presence_penalty or params.frequency_penalty) and self._output_counts:
            tokens = np.fromiter(self._output_counts.keys(), dtype=np.int64)
            counts = np.fromiter(self._output_counts.values(), dtype=np.float32)
            keep = tokens < logits.shape[0]
            logits[tokens[keep]] -= params.presence_penalty + params.frequency_penalty * counts[keep]

    def _draw(self, logits: np.ndarray) -> int:
        params = self.params
        # Shifted to a largest logit of 0 before dividing: large logits over a small temperature
        # would overflow to inf otherwise.
        with np.errstate(over="ignore"):  # to -inf, whose probability is 0
            logits = (logits - np.max(logits)) / params.temperature
        vocab = logits.shape[0]
        if 0 < params.top_k < vocab:
            kth_largest = np.partition(logits, vocab - params.top_k)[vocab - params.top_k]
            logits[logits < kth_largest] = -np.inf
        probs = np.exp(logits)  # the largest is exp(0) = 1
        if params.min_p > 0.0:
            probs[probs < params.min_p * probs.max()] = 0.0
        if params.top_p < 1.0:
            order = np.argsort(-probs, kind="stable")
            sorted_probs = probs[order]
            cumulative = np.cumsum(sorted_probs)
            # Keep a token while the mass before it is below top_p: at least the top one.
            outside = (cumulative - sorted_probs) >= params.top_p * cumulative[-1]
            probs[order[outside]] = 0.0
        cumulative = np.cumsum(probs, dtype=np.float64)
        point = self.rng.random() * cumulative[-1]
        return int(min(np.searchsorted(cumulative, point, side="right"), vocab - 1))


def token_logprobs(
    logits: np.ndarray, token: int, alternatives: int
) -> tuple[float, list[tuple[int, float]]]:
    """The log-probability of token under a raw row of logits, and the alternatives most
    likely (token, log-probability) pairs, most likely first."""
    row = np.asarray(logits, dtype=np.float64)
    shifted = row - np.max(row)
    logprobs = shifted - np.log(np.sum(np.exp(shifted)))
    top: list[tuple[int, float]] = []
    if alternatives > 0:
        count = min(alternatives, row.shape[0])
        candidates = np.argpartition(-logprobs, count - 1)[:count]
        # Most likely first; equal ones by token id, so every engine orders them alike.
        ordered = sorted(candidates.tolist(), key=lambda t: (-logprobs[t], t))
        top = [(int(t), float(logprobs[t])) for t in ordered]
    return float(logprobs[token]), top
