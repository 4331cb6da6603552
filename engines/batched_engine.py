"""An engine whose generation is a ModelRunner (engines.model_runner) under the continuous
batcher (engines.batching): the Transformers and llama.cpp engines."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from llmgrpc.engines.base import Chunk, Engine, EngineStats, GenerationRequest, Tokens
from llmgrpc.engines.batching import ContinuousBatcher
from llmgrpc.engines.model_runner import ModelRunner
from llmgrpc.engines.prefix_cache import KvEventLog


class BatchedEngine(Engine):
    """An engine whose generation is a ModelRunner under a ContinuousBatcher.

    Subclasses implement ``load`` and build themselves with ``cls(runner, ...)``.
    """

    # The batcher cuts every prompt at multiples of this many tokens (a step's part is one chunk
    # or several in a row; the first waiting prompt gets at least one in each step that feeds
    # parts, every step unless prefill_time_ratio holds them back): each engine's
    # measured choice.
    CHUNK_TOKENS = 32

    def __init__(
        self,
        runner: ModelRunner,
        max_batch_size: int,
        device: str,
        prefill_chunk_tokens: int | None = None,
        max_num_batched_tokens: int | None = None,
        idle_step_tokens: int | None = None,
        prefill_time_ratio: float | None = None,
    ):
        self.runner = runner
        self.device = device
        self.batcher = ContinuousBatcher(
            runner,
            max_batch_size,
            prefill_chunk_tokens,
            max_num_batched_tokens,
            idle_step_tokens,
            prefill_time_ratio,
        )

    @classmethod
    def step_budget(cls, options: dict) -> dict[str, Any]:
        """The batcher's chunk, step budgets and prefill pace for these engine options (keyword
        arguments)."""
        budget = int(options.get("max_num_batched_tokens") or ContinuousBatcher.DEFAULT_STEP_TOKENS)
        ratio = options.get("prefill_time_ratio")
        return {
            "prefill_chunk_tokens": min(cls.CHUNK_TOKENS, budget),
            "max_num_batched_tokens": budget,
            "idle_step_tokens": max(budget, ContinuousBatcher.IDLE_STEP_TOKENS),
            "prefill_time_ratio": ContinuousBatcher.PREFILL_TIME_RATIO if ratio is None else float(ratio),
        }

    def generate(self, request: GenerationRequest) -> AsyncIterator[Chunk]:
        return self.batcher.generate(request)

    async def tokenize(self, text: str, parse_special: bool = False) -> Tokens:
        return await self.batcher.tokenize(text, parse_special)

    async def detokenize(self, token_ids: list[int]) -> str:
        return await self.batcher.detokenize(token_ids)

    def stats(self) -> EngineStats:
        return EngineStats(
            context_length=self.runner.context_length,
            device=self.device,
            running_requests=self.batcher.running_requests,
            peak_batch_size=self.batcher.peak_batch_size,
            kv_cache_usage=self.batcher.kv_cache_usage,
            prefix_cache_queries=self.batcher.prefix_cache_queries,
            prefix_cache_hits=self.batcher.prefix_cache_hits,
            gpu_memory_bytes=self.gpu_memory_bytes(),
        )

    def kv_events(self) -> KvEventLog | None:
        return self.runner.kv_events

    def gpu_memory_bytes(self) -> int:
        return 0

    def close(self) -> None:
        self.batcher.close()
