"""A noisy neighbour never freezes the other streams of its model.

A huge prompt is tokenized and refused off the batcher's thread, a long prompt is prefilled
in parts between decode steps, and stop strings are bounded. The service tests run a real
server whose model is the Neighbour test engine (tests/neighbour_engine.py): its runner
makes the races decidable, so no test depends on timing.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import random
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest
from doubles import CountingRunner
from neighbour_engine import PREFILL_CHUNK_TOKENS
from plugin_engine import plugin_family
from rpc_helpers import collect, rpc_error
from status_details import bad_request, reason

from llmgrpc.clients import Client
from llmgrpc.engines.base import FinishReason, GenerationRequest, SamplingParams
from llmgrpc.engines.batching import LONG_TEXT_CHARACTERS, TOKENIZER_NICENESS, ContinuousBatcher
from llmgrpc.engines.text import StopStringMatcher

TESTS = Path(__file__).parent
FAMILY = plugin_family("neighbour-model", "neighbour", context_length=100000)
# The contract: at most 64 stop strings, of 4096 characters in all.
MAX_STOP_STRINGS, MAX_STOP_CHARACTERS = 64, 4096
FOUR_MB = 4_000_000  # characters, each one token of the Neighbour engine; under gRPC's 4 MiB


class Victim:
    """A long stream read on its own thread; counts the tokens it has received."""

    def __init__(self, client: Client, model_uid: str):
        self.tokens = 0
        self._changed = threading.Condition()
        self._stream = client.generate(model_uid, "a", max_tokens=50_000, ignore_eos=True, temperature=0)
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        try:
            for message in self._stream:
                with self._changed:
                    self.tokens += len(message.token_ids)
                    self._changed.notify_all()
        except grpc.RpcError:
            pass  # cancelled by stop()

    def wait_for(self, tokens: int, timeout: float) -> bool:
        with self._changed:
            return self._changed.wait_for(lambda: self.tokens >= tokens, timeout)

    def stop(self) -> None:
        self._stream.cancel()
        self._thread.join(timeout=30)


@pytest.fixture
def neighbour_server(start_server, tmp_path, monkeypatch):
    """A server with the Neighbour engine's model launched as 'neighbour'; yields (client, gate folder)."""
    gate = tmp_path / "gate"
    gate.mkdir()
    (gate / "calls").touch()
    families = tmp_path / "families"
    families.mkdir()
    (families / "neighbour-model.json").write_text(json.dumps(FAMILY))
    # The probe and the worker are processes of their own: they import the engine from PYTHONPATH.
    monkeypatch.setenv("PYTHONPATH", str(TESTS))
    monkeypatch.setenv("NEIGHBOUR_GATE_DIR", str(gate))
    server = start_server(
        device="cpu",
        engine_plugins=["neighbour_engine:ENGINE_INFO"],
        families_dir=families,
        worker_environment_names=["NEIGHBOUR_GATE_DIR"],
        max_running_requests=4,
    )
    with Client(server.endpoint) as client:
        client.launch("neighbour-model", model_uid="neighbour", timeout=300)
        yield client, gate


def test_a_stream_keeps_decoding_while_a_4_mb_prompt_is_tokenized_and_refused(neighbour_server):
    client, gate = neighbour_server
    victim = Victim(client, "neighbour")
    assert victim.wait_for(1, timeout=60)
    refused: list[grpc.RpcError] = []

    def neighbour() -> None:
        refused.append(rpc_error(client.generate, "neighbour", "a" * FOUR_MB, max_tokens=4))

    neighbour_thread = threading.Thread(target=neighbour)
    neighbour_thread.start()
    try:
        for _ in range(6000):  # the engine's tokenizer is reached within seconds
            if (gate / "tokenizing").exists():
                break
            threading.Event().wait(0.01)
        assert (gate / "tokenizing").exists()
        # The neighbour's tokenization waits for the release: the victim's tokens can only
        # come while it is under way. Before the fix it ran on the batcher's thread, so
        # the victim received nothing until the release.
        before = victim.tokens
        streamed_meanwhile = victim.wait_for(before + 20, timeout=20)
    finally:
        (gate / "release").touch()
        neighbour_thread.join(timeout=60)
        victim.stop()
    assert streamed_meanwhile, (
        f"the victim got {victim.tokens - before} tokens while the neighbour was tokenized"
    )
    (error,) = refused
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert reason(error) == "PROMPT_TOO_LONG"
    assert f"the prompt has {FOUR_MB} tokens" in error.details()


def test_a_long_prompt_is_prefilled_in_parts_between_the_decode_steps_of_others(neighbour_server):
    client, gate = neighbour_server
    victim = Victim(client, "neighbour")
    assert victim.wait_for(1, timeout=60)
    try:
        long_prompt = "b" * (5 * PREFILL_CHUNK_TOKENS + 7)
        token_ids, _, messages = collect(
            client.generate("neighbour", long_prompt, max_tokens=3, temperature=0)
        )
    finally:
        victim.stop()
    assert token_ids == [2, 3, 4]  # the CountingRunner: the token after the prompt's last, and on
    assert messages[-1].usage.prompt_tokens == len(long_prompt)

    calls = (gate / "calls").read_text().splitlines()
    victim_id, neighbour_id = "1", "2"  # the batcher numbers sequences in order of arrival
    parts = [
        (i, int(call.split()[2]))
        for i, call in enumerate(calls)
        if call.startswith(f"prefill {neighbour_id} ")
    ]
    assert [length for _, length in parts] == [PREFILL_CHUNK_TOKENS] * 5 + [7]
    # Between any two parts of the long prompt, the victim had a decode step.
    for (before, _), (after, _) in itertools.pairwise(parts):
        between = calls[before + 1 : after]
        assert any(call.startswith("decode") and victim_id in call.split()[1:] for call in between)


def test_stop_strings_are_bounded_in_count_and_size(neighbour_server):
    client, _ = neighbour_server
    too_many = rpc_error(
        client.generate, "neighbour", "a", max_tokens=2, stop=[f"s{i}" for i in range(10_000)]
    )
    too_long = rpc_error(
        client.generate, "neighbour", "a", max_tokens=2, stop=["x" * (MAX_STOP_CHARACTERS + 1)]
    )
    for error in (too_many, too_long):
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert [v.field for v in bad_request(error).field_violations] == ["stop"]
    assert f"at most {MAX_STOP_STRINGS}" in too_many.details()
    assert f"at most {MAX_STOP_CHARACTERS}" in too_long.details()
    # At the limits, the request is served.
    largest = [
        chr(ord("k") + i % 10) * (MAX_STOP_CHARACTERS // MAX_STOP_STRINGS) for i in range(MAX_STOP_STRINGS)
    ]
    token_ids, text, _ = collect(client.generate("neighbour", "a", max_tokens=3, stop=largest, temperature=0))
    assert (token_ids, text) == ([1, 2, 3], "bcd")


# The same, in-process: no gRPC, the CountingRunner directly.


def test_the_batcher_cuts_each_prompt_at_fixed_offsets_and_feeds_one_part_per_step():
    class PartRecorder(CountingRunner):
        def __init__(self):
            super().__init__(context_length=1000)
            self.calls: list[list[tuple[int, int]]] = []

        def prefill(self, sequences):
            self.calls.append([(sequence_id, len(part)) for sequence_id, part in sequences])
            return super().prefill(sequences)

    runner = PartRecorder()
    batcher = ContinuousBatcher(runner, max_batch_size=4, prefill_chunk_tokens=8)

    async def run(prompt: str):
        request = GenerationRequest("r", SamplingParams(temperature=0.0, max_tokens=2), prompt=prompt)
        return [chunk async for chunk in batcher.generate(request)]

    async def both():
        return await asyncio.gather(run("a" * 20), run("c" * 3))

    long_chunks, short_chunks = asyncio.run(both())
    batcher.close()
    assert [t for c in long_chunks for t in c.token_ids] == [1, 2]
    assert [t for c in short_chunks for t in c.token_ids] == [3, 4]
    assert long_chunks[-1].finish_reason is FinishReason.LENGTH
    parts: dict[int, list[int]] = {}
    for call in runner.calls:
        for sequence_id, length in call:
            parts.setdefault(sequence_id, []).append(length)
    assert sorted(parts.values()) == [[3], [8, 8, 4]]
    assert all(sum(length for _, length in call) <= 8 for call in runner.calls)
    assert runner.live == set()


async def _generated_ids(batcher: ContinuousBatcher, prompt: str, max_tokens: int) -> list[int]:
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    request = GenerationRequest("r", params, prompt=prompt)
    return [token for chunk in [c async for c in batcher.generate(request)] for token in chunk.token_ids]


def _serve_beside_a_stream(batcher, runner: CountingRunner, prompt: str, stream_tokens: int) -> list[int]:
    """Generate one token for prompt once a stream ("a", stream_tokens long) decodes beside it."""

    async def scenario():
        stream = asyncio.ensure_future(_generated_ids(batcher, "a", stream_tokens))
        while not runner.decoded_ids:  # the stream decodes before the prompt comes
            await asyncio.sleep(0.001)
        ids = await _generated_ids(batcher, prompt, 1)
        stream.cancel()
        return ids

    return asyncio.run(scenario())


def test_while_others_decode_a_prompt_part_pays_for_the_prefix_it_attends_to():
    """With prefix_tokens_per_token set, a part fed beside a decoding sequence counts its tokens
    times (1 + the positions each attends to, on average, over prefix_tokens_per_token): a
    long prompt's parts shrink to one chunk as it grows. Alone, it takes the idle step's budget
    in tokens."""

    class PartRecorder(CountingRunner):
        prefix_tokens_per_token = 16.0

        def __init__(self):
            super().__init__(context_length=1000)
            self.parts: list[int] = []

        def prefill(self, sequences):
            self.parts += [len(part) for sequence_id, part in sequences if sequence_id == long_id[0]]
            return super().prefill(sequences)

        def decode(self, last_tokens):
            time.sleep(0.001)  # the victim's 900 steps outlast the long prompt's, on any machine
            return super().decode(last_tokens)

    long_id = [0]

    def parts_of_a_long_prompt(beside_a_decoding_one: bool, idle_step_tokens: int | None = None) -> list[int]:
        runner = PartRecorder()
        batcher = ContinuousBatcher(
            runner,
            max_batch_size=2,
            prefill_chunk_tokens=8,
            max_num_batched_tokens=32,
            idle_step_tokens=idle_step_tokens,
        )

        long_id[0] = 1 if not beside_a_decoding_one else 2
        try:
            if beside_a_decoding_one:
                _serve_beside_a_stream(batcher, runner, "b" * 64, stream_tokens=900)
            else:
                asyncio.run(_generated_ids(batcher, "b" * 64, 1))
        finally:
            batcher.close()
        return runner.parts

    # Budget 32, chunks of 8: alone, 32 tokens a step, or the idle step's budget where it is set.
    assert parts_of_a_long_prompt(False) == [32, 32]
    assert parts_of_a_long_prompt(False, idle_step_tokens=48) == [48, 16]
    # Beside a decoding sequence, 31 left: [0, 16) costs 16 * (1 + 8 / 16) = 24, [0, 24) 42;
    # [16, 24) costs 8 * (1 + 20 / 16) = 18 and [16, 32) 40; from then on one chunk a step.
    for idle_step_tokens in (None, 48):
        assert parts_of_a_long_prompt(True, idle_step_tokens) == [16, *[8] * 6]


def test_beside_decoding_sequences_prompt_parts_are_paced_to_the_time_ratio():
    """A part that costs many decode steps' time is followed by decode-only steps until the
    decoding sequences' share pays it back (prefill_time_ratio 1: parts take at most as long as
    decoding, over the steps); without a ratio one part goes in every step. Either way the
    prompt is served."""

    class SlowParts(CountingRunner):
        def __init__(self):
            super().__init__(context_length=1000)
            self.calls: list[str] = []

        def prefill(self, sequences):
            if any(sequence_id != victim_id for sequence_id, _ in sequences):
                self.calls.append("part")
                time.sleep(0.02)  # 20 decode steps' worth
            return super().prefill(sequences)

        def decode(self, last_tokens):
            self.calls.append("decode")
            time.sleep(0.001)
            return super().decode(last_tokens)

    victim_id = 1

    def decode_steps_between_parts(ratio: float | None) -> list[int]:
        runner = SlowParts()
        batcher = ContinuousBatcher(
            runner,
            max_batch_size=2,
            prefill_chunk_tokens=8,
            max_num_batched_tokens=8,
            prefill_time_ratio=ratio,
        )

        try:
            # The long prompt is served: "b" is 1, then 2.
            assert _serve_beside_a_stream(batcher, runner, "b" * 48, stream_tokens=5000) == [2]
        finally:
            batcher.close()
        parts = [index for index, call in enumerate(runner.calls) if call == "part"]
        assert len(parts) == 6  # 48 tokens in parts of 8
        return [later - earlier - 1 for earlier, later in itertools.pairwise(parts)]

    assert decode_steps_between_parts(None) == [1] * 5
    # 20 ms of part against about 1 ms of decoding a step: many decode-only steps between (fewer
    # than 20 only where a loaded machine stretches the decode steps' sleeps).
    assert min(decode_steps_between_parts(1.0)) >= 5


def test_long_texts_are_tokenized_nicer_than_the_decode_loop_and_short_ones_are_not():
    """Long prompts are tokenized at a lower CPU priority than the process (Linux): their
    tokenizing then never takes a core from the decode loop's compute threads. Short ones keep
    the process's priority: a nicer thread may wait long for a core beside busy decoding."""
    if not sys.platform.startswith("linux"):
        pytest.skip("threads have a niceness of their own on Linux")

    class PriorityRecorder(CountingRunner):
        def tokenize(self, text: str, parse_special: bool = False) -> list[int]:
            self.niceness[len(text)] = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
            return super().tokenize(text, parse_special)

    runner = PriorityRecorder()
    runner.niceness = {}
    batcher = ContinuousBatcher(runner, max_batch_size=1)
    try:
        ids = asyncio.run(batcher.tokenize("abc"))
        asyncio.run(batcher.tokenize("a" * LONG_TEXT_CHARACTERS))
    finally:
        batcher.close()
    assert list(ids.token_ids) == [0, 1, 2]
    process = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    assert runner.niceness == {3: process, LONG_TEXT_CHARACTERS: min(process + TOKENIZER_NICENESS, 19)}


def _reference_stop_matcher(stops):
    """The plain algorithm: every stop string searched in full at every feed."""
    stops = [stop for stop in stops if stop]
    pending = ""

    def feed(text):
        nonlocal pending
        if not stops:
            return text, False
        pending += text
        found = [i for i in (pending.find(stop) for stop in stops) if i >= 0]
        if found:
            released, pending = pending[: min(found)], ""
            return released, True
        held = 0
        for stop in stops:
            for length in range(min(len(stop) - 1, len(pending)), held, -1):
                if pending.endswith(stop[:length]):
                    held = length
                    break
        released, pending = pending[: len(pending) - held], pending[len(pending) - held :]
        return released, False

    return feed


def test_the_stop_matcher_agrees_with_the_plain_algorithm():
    draw = random.Random(13)
    for _ in range(2000):
        stops = [
            "".join(draw.choice("ab") for _ in range(draw.randint(1, 4))) for _ in range(draw.randint(0, 4))
        ]
        matcher, reference = StopStringMatcher(stops), _reference_stop_matcher(stops)
        for _ in range(8):
            text = "".join(draw.choice("abc") for _ in range(draw.randint(0, 3)))
            expected = reference(text)
            assert matcher.feed(text) == expected, (stops, text)
            if expected[1]:
                break


def test_a_prompt_prefilled_in_parts_gives_the_greedy_tokens_of_transformers_generate(tiny_files):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmgrpc.engines.transformers_plain import DynamicCacheRunner
    from llmgrpc.engines.transformers_static import StaticCacheRunner

    tokenizer = AutoTokenizer.from_pretrained(tiny_files)
    model = AutoModelForCausalLM.from_pretrained(tiny_files, dtype=torch.float32).eval()
    prompt = " ".join(f"word{i % 97} and" for i in range(250))  # about 1,500 tokens
    prompt_ids = tokenizer(prompt).input_ids
    expected = model.generate(torch.tensor([prompt_ids]), max_new_tokens=16, do_sample=False)
    expected = expected[0, len(prompt_ids) :].tolist()

    async def greedy(batcher: ContinuousBatcher) -> list[int]:
        request = GenerationRequest(
            "r", SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True), prompt=prompt
        )
        return [token async for chunk in batcher.generate(request) for token in chunk.token_ids]

    for make_runner in (
        lambda: DynamicCacheRunner(model, tokenizer, 4096),
        lambda: StaticCacheRunner(model, tokenizer, 4096, 2, compile_step=False),
    ):
        for chunk in (100, 512):
            batcher = ContinuousBatcher(make_runner(), max_batch_size=2, prefill_chunk_tokens=chunk)
            try:
                assert asyncio.run(greedy(batcher)) == expected, (make_runner, chunk)
            finally:
                batcher.close()
