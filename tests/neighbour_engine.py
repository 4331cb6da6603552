"""A batched test engine, loaded as a plugin, for the noisy-neighbour tests (never used by the product).

Its runner is the CountingRunner (one token per step, one character per token) with a long
context, and it makes races decidable: tokenizing a prompt of GATE_CHARACTERS or more
writes ``tokenizing`` in the folder NEIGHBOUR_GATE_DIR and waits there until the test
writes ``release``; each prefill and decode call is appended to ``calls`` in that folder.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

from doubles import CountingRunner

from llmgrpc.engines.base import EngineStats
from llmgrpc.engines.batched_engine import BatchedEngine
from llmgrpc.engines.catalogue import EngineInfo

GATE_CHARACTERS = 1_000_000
CONTEXT_LENGTH = 100_000
PREFILL_CHUNK_TOKENS = 512

ENGINE_INFO = EngineInfo(
    name="Neighbour",
    key="neighbour",
    module="neighbour_engine",
    extra="neighbour",
    required_modules=(),
    formats=("pytorch",),
    options=(),
)


class GatedRunner(CountingRunner):
    def __init__(self, gate: Path):
        super().__init__(context_length=CONTEXT_LENGTH, step_delay_s=0.002)
        self.gate = gate
        self._log = (gate / "calls").open("a", buffering=1)

    def tokenize(self, text: str, parse_special: bool = False) -> list[int]:
        if len(text) >= GATE_CHARACTERS:
            (self.gate / "tokenizing").touch()
            waited = 0.0
            while not (self.gate / "release").exists() and waited < 60:
                threading.Event().wait(0.01)
                waited += 0.01
        return super().tokenize(text)

    def prefill(self, sequences):
        for sequence_id, part in sequences:
            self._log.write(f"prefill {sequence_id} {len(part)}\n")
        return super().prefill(sequences)

    def decode(self, last_tokens):
        self._log.write("decode " + " ".join(map(str, last_tokens)) + "\n")
        return super().decode(last_tokens)


class NeighbourEngine(BatchedEngine):
    @classmethod
    def load(cls, plan, weights, report):
        runner = GatedRunner(Path(os.environ["NEIGHBOUR_GATE_DIR"]))
        return cls(runner, plan.max_batch_size, "cpu", prefill_chunk_tokens=PREFILL_CHUNK_TOKENS)

    def stats(self):
        return EngineStats(context_length=CONTEXT_LENGTH, device="cpu")


ENGINE = NeighbourEngine
