"""The firehose: a benchmark-only engine that streams tokens as fast as it can make them.

It does no model work at all, so whatever limits its tokens per second is the service:
the worker's gRPC stream, the server's relay, metrics, and the client's own reading. It
joins a server as an engine plugin (``--engine-plugins firehose:ENGINE_INFO`` with this
folder importable) and is launched from the ``firehose`` family that ``models.py`` writes.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from llmgrpc.engines.base import (
    Chunk,
    Engine,
    EngineStats,
    FinishReason,
    GenerationRequest,
    LoadPlan,
    ProgressReport,
    Usage,
)
from llmgrpc.engines.catalogue import EngineInfo

ENGINE_INFO = EngineInfo(
    name="firehose", key="firehose", module="firehose", extra="", required_modules=(), formats=("pytorch",)
)


class FirehoseEngine(Engine):
    """One token per message, max_tokens of them, as fast as the consumer takes them."""

    def __init__(self) -> None:
        self.running = 0

    @classmethod
    def load(cls, plan: LoadPlan, weights: str, report: ProgressReport) -> FirehoseEngine:
        return cls()

    async def generate(self, request: GenerationRequest) -> AsyncIterator[Chunk]:
        count = request.sampling.max_tokens
        prompt_tokens = len(request.prompt_token_ids or request.prompt or "")
        self.running += 1
        try:
            for index in range(count - 1):
                yield Chunk(token_ids=[index % 256], text="x")
            yield Chunk([0], "x", FinishReason.LENGTH, Usage(prompt_tokens, count))
        finally:
            self.running -= 1

    def stats(self) -> EngineStats:
        return EngineStats(context_length=1_000_000, device="cpu", running_requests=self.running)

    def close(self) -> None:
        pass


ENGINE = FirehoseEngine
