"""A test double of an engine defined outside llmgrpc, loaded as a plugin (never used by the product).

It echoes the prompt back, one character per token, and finishes with LENGTH at max_tokens
or STOP at the end of the prompt. The prompt is framed by ECHO_OPEN and ECHO_CLOSE from the
worker's environment: the CPU defaults it declares, or what the server's environment sets.
"""

from __future__ import annotations

import os

from llmgrpc.engines.base import Chunk, Engine, EngineStats, FinishReason, Usage
from llmgrpc.engines.catalogue import EngineInfo, EngineOption

ENGINE_INFO = EngineInfo(
    name="Echo",
    key="echo",
    module="plugin_engine",
    extra="echo",
    required_modules=(),
    formats=("pytorch",),
    options=(EngineOption("shout", bool, "echo in capitals"),),
    cpu_environment=(("ECHO_OPEN", "["), ("ECHO_CLOSE", "]")),
)


class EchoEngine(Engine):
    def __init__(self, shout: bool):
        self.shout = shout

    @classmethod
    def load(cls, plan, weights, report):
        return cls(bool(plan.engine_options.get("shout", False)))

    async def generate(self, request):
        text = (request.prompt or "").upper() if self.shout else request.prompt or ""
        text = os.environ.get("ECHO_OPEN", "") + text + os.environ.get("ECHO_CLOSE", "")
        limit = request.sampling.max_tokens
        for index, character in enumerate(text[:limit]):
            last = index == min(limit, len(text)) - 1
            chunk = Chunk([ord(character)], character)
            if last:
                chunk.finish_reason = FinishReason.LENGTH if limit <= len(text) else FinishReason.STOP
                chunk.usage = Usage(len(text), index + 1)
            yield chunk

    def stats(self):
        return EngineStats(context_length=1024, device="cpu")

    def close(self):
        pass


ENGINE = EchoEngine


def plugin_family(model_name: str, engine_key: str, context_length: int = 1024) -> dict:
    """A model family (registry JSON) with one spec served by the test engine plugin engine_key.
    Its weights are the tiny model, generated locally: launching it never asks a hub."""
    return {
        "version": 1,
        "model_name": model_name,
        "model_description": f"A family served by the {engine_key} test engine plugin.",
        "context_length": context_length,
        "model_lang": ["en"],
        "model_ability": ["generate"],
        "model_specs": [
            {
                "model_format": "pytorch",
                "model_size_in_billions": "0_002",
                "quantizations": ["none"],
                "model_engines": [engine_key],
                "model_id": "llmgrpc/tiny-llama-3.1",
                "model_hubs": [],
                "generator": "tiny-llama-3.1",
            }
        ],
    }
