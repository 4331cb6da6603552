"""A test double of an engine whose timing the test controls (never used by the product).

Loaded as a plugin, like ``plugin_engine``. Its load waits until the file named by the
``load_gate`` option exists (creating ``<load_gate>.waiting`` when it starts waiting), so
a test holds a launch in LOADING (and its worker slow to stop) exactly as long as it needs.
It streams ``max_tokens`` tokens ("a", "b", ...), ``token_delay_s`` apart, so a test holds
streams in flight as long as it needs too.
"""

from __future__ import annotations

import asyncio
import string
import time
from pathlib import Path

from plugin_engine import plugin_family

from llmgrpc.engines.base import Chunk, Engine, EngineStats, FinishReason, Usage
from llmgrpc.engines.catalogue import EngineInfo, EngineOption

ENGINE_INFO = EngineInfo(
    name="Gated",
    key="gated",
    module="gated_engine",
    extra="gated",
    required_modules=(),
    formats=("pytorch",),
    options=(
        EngineOption("load_gate", str, "a file whose existence lets the load finish"),
        EngineOption("token_delay_s", float, "seconds between streamed tokens", minimum=0, maximum=10),
    ),
)

# A gate that never opens is a test that has lost track of it: give up after this long.
GATE_LIMIT_S = 120.0

FAMILY = plugin_family("gated-model", "gated")


class GatedEngine(Engine):
    def __init__(self, token_delay_s: float):
        self.token_delay_s = token_delay_s
        self.running = 0

    @classmethod
    def load(cls, plan, weights, report):
        gate = plan.engine_options.get("load_gate")
        if gate:
            Path(gate + ".waiting").touch()  # tells the test the load has begun
            give_up = time.monotonic() + GATE_LIMIT_S
            while not Path(gate).exists() and time.monotonic() < give_up:
                time.sleep(0.02)
        return cls(float(plan.engine_options.get("token_delay_s", 0.0)))

    async def generate(self, request):
        limit = request.sampling.max_tokens
        self.running += 1
        try:
            for index in range(limit):
                await asyncio.sleep(self.token_delay_s)
                letter = string.ascii_lowercase[index % 26]
                chunk = Chunk([index % 26], letter)
                if index == limit - 1:
                    chunk.finish_reason = FinishReason.LENGTH
                    chunk.usage = Usage(1, limit)
                yield chunk
        finally:
            self.running -= 1

    def stats(self):
        return EngineStats(context_length=1024, device="cpu", running_requests=self.running)

    def close(self):
        pass


ENGINE = GatedEngine
