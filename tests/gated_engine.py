"""A test double of an engine whose timing the test controls (never used by the product).

Loaded as a plugin, like ``plugin_engine``. Its load waits until the file named by the
``load_gate`` option exists (creating ``<load_gate>.waiting`` when it starts waiting), so
a test holds a launch in LOADING (and its worker slow to stop) exactly as long as it needs.
It streams ``max_tokens`` tokens ("a", "b", ...), ``token_delay_s`` apart, so a test holds
streams in flight as long as it needs too. With ``request_log``, it appends each request as
it arrived (prompt, max_tokens, deadline) to that file, one JSON object a line. It crashes
as an engine library would, by a signal after a last line on stderr: at load with
``crash_at_load: SIGILL``, or mid-stream for a prompt ``die by SIGSEGV``. With
``progress_reports``, its load reports that many steps of progress, one after another.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import string
import sys
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
        EngineOption("request_log", str, "a file each request is appended to as it arrives"),
        EngineOption("crash_at_load", str, "a signal (SIGILL, ...) the worker sends itself while loading"),
        EngineOption("progress_reports", int, "load progress steps reported", minimum=0, maximum=100_000),
    ),
)

# A gate that never opens is a test that has lost track of it: give up after this long.
GATE_LIMIT_S = 120.0

FAMILY = plugin_family("gated-model", "gated")


def die(signal_name: str, when: str) -> None:
    """End this worker process by a signal, as an engine library's crash would, after a last line
    on stderr (what the server is to quote)."""
    print(f"gated engine: dying by {signal_name} {when}", file=sys.stderr, flush=True)
    os.kill(os.getpid(), signal.Signals[signal_name])


class GatedEngine(Engine):
    def __init__(self, token_delay_s: float, request_log: str = ""):
        self.token_delay_s = token_delay_s
        self.request_log = request_log
        self.running = 0

    @classmethod
    def load(cls, plan, weights, report):
        if plan.engine_options.get("crash_at_load"):
            die(plan.engine_options["crash_at_load"], "while loading")
        gate = plan.engine_options.get("load_gate")
        if gate:
            Path(gate + ".waiting").touch()  # tells the test the load has begun
            give_up = time.monotonic() + GATE_LIMIT_S
            while not Path(gate).exists() and time.monotonic() < give_up:
                time.sleep(0.02)
        options = plan.engine_options
        steps = int(options.get("progress_reports", 0))
        for step in range(steps):
            report("loading", step + 1, steps)
        return cls(float(options.get("token_delay_s", 0.0)), options.get("request_log", ""))

    async def generate(self, request):
        if request.prompt.startswith("die by "):  # after a first piece: a crash mid-stream
            yield Chunk([0], "a")
            die(request.prompt.removeprefix("die by "), "in the middle of a stream")
        limit = request.sampling.max_tokens
        if self.request_log:
            entry = {"prompt": request.prompt, "max_tokens": limit, "deadline": request.deadline}
            with open(self.request_log, "a") as log:
                log.write(json.dumps(entry) + "\n")
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
