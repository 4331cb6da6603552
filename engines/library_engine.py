"""What the adapters of engines that batch by themselves (vLLM, SGLang) share.

Such a library schedules its own requests; its adapter only maps the contract onto the
library's API, streams the library's outputs as chunks, counts the requests it holds
for GetModel, and aborts a request in the library when its caller goes away.
"""

from __future__ import annotations

import abc
import contextlib
from collections.abc import AsyncIterator, Iterator
from typing import Any

from llmgrpc.clients.errors import InvalidArgument
from llmgrpc.engines.base import Chunk, Engine, EngineStats, FinishReason

# The libraries' finish reasons, in the contract's terms.
FINISH_REASONS = {"stop": FinishReason.STOP, "length": FinishReason.LENGTH, "abort": FinishReason.CANCELLED}


def whole_numbers_as_ints(options: dict[str, Any], keep_float: frozenset[str]) -> dict[str, Any]:
    """engine_options as a library takes them: JSON numbers are floats, ints where whole
    (but for the options that are fractions by nature)."""
    return {
        name: int(value)
        if isinstance(value, float) and value.is_integer() and name not in keep_float
        else value
        for name, value in options.items()
    }


class LibraryEngine(Engine):
    """One model held by a library that batches its own requests, in this worker process."""

    def __init__(self, engine: Any, context_length: int, device: str):
        self.engine = engine
        self.context_length = context_length
        self.device = device
        self.running = 0
        self.peak = 0

    @contextlib.contextmanager
    def counted(self) -> Iterator[None]:
        """Count a request as running (and the most ever running) while it streams."""
        self.running += 1
        self.peak = max(self.peak, self.running)
        try:
            yield
        finally:
            self.running -= 1

    # The library's name, for messages.
    library = ""

    @abc.abstractmethod
    async def abort_in_library(self, request_id: str) -> None:
        """Free a request's slot and KV cache in the library now."""

    async def guarded(self, request_id: str, chunks: AsyncIterator[Chunk]) -> AsyncIterator[Chunk]:
        """Stream one request's chunks, counted as running. A ValueError (the library's word for
        a request it cannot take: prompt too long, ...) becomes INVALID_ARGUMENT; a request whose
        caller leaves before its last chunk is aborted in the library."""
        finished = False
        with self.counted():
            try:
                async with contextlib.aclosing(chunks):
                    async for chunk in chunks:
                        finished = chunk.finish_reason is not None
                        yield chunk
            except ValueError as error:
                finished = True
                raise InvalidArgument(f"{self.library} refused the request: {error}") from None
            finally:
                if not finished:
                    with contextlib.suppress(Exception):
                        await self.abort_in_library(request_id)

    def stats(self) -> EngineStats:
        return EngineStats(
            context_length=self.context_length,
            device=self.device,
            running_requests=self.running,
            peak_batch_size=self.peak,
        )

    def close(self) -> None:
        self.engine.shutdown()
