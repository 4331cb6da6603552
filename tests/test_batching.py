"""The continuous batcher, sampler and text settling, on a test double runner (no model, no gRPC)."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from doubles import CountingRunner

from llmgrpc.clients.errors import InvalidArgument
from llmgrpc.engines.base import FinishReason, GenerationRequest, SamplingParams
from llmgrpc.engines.batching import ContinuousBatcher
from llmgrpc.engines.sampling import Sampler
from llmgrpc.engines.text import IncrementalDetokenizer, StopStringMatcher


def request(prompt: str = "a", **sampling) -> GenerationRequest:
    return GenerationRequest(
        request_id="r", sampling=SamplingParams(**{"temperature": 0.0, **sampling}), prompt=prompt
    )


async def collect(batcher: ContinuousBatcher, req: GenerationRequest):
    return [chunk async for chunk in batcher.generate(req)]


def run(coroutine):
    return asyncio.run(coroutine)


def test_tokens_text_and_length_finish():
    batcher = ContinuousBatcher(CountingRunner(), max_batch_size=4)
    chunks = run(collect(batcher, request("a", max_tokens=5)))
    assert [t for c in chunks for t in c.token_ids] == [1, 2, 3, 4, 5]
    assert "".join(c.text for c in chunks) == "bcdef"
    assert chunks[-1].finish_reason is FinishReason.LENGTH
    assert (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == (1, 5)
    batcher.close()


def test_eos_stop_token_and_stop_string_rules():
    batcher = ContinuousBatcher(CountingRunner(), max_batch_size=4)
    eos = run(collect(batcher, request("w", max_tokens=20)))  # x, y, then eos (25)
    assert [t for c in eos for t in c.token_ids] == [23, 24, 25] and eos[
        -1
    ].finish_reason is FinishReason.STOP
    assert "".join(c.text for c in eos) == "xy"
    ignored = run(collect(batcher, request("w", max_tokens=5, ignore_eos=True)))
    assert [t for c in ignored for t in c.token_ids] == [23, 24, 25, 0, 1]
    early = run(collect(batcher, request("w", max_tokens=5, min_tokens=4)))
    assert 25 not in [t for c in early for t in c.token_ids]
    by_id = run(collect(batcher, request("a", max_tokens=20, stop_token_ids=[3])))
    assert [t for c in by_id for t in c.token_ids] == [1, 2, 3] and by_id[
        -1
    ].finish_reason is FinishReason.STOP
    by_text = run(collect(batcher, request("a", max_tokens=20, stop=["def", "xyz"])))
    assert "".join(c.text for c in by_text) == "bc"
    assert by_text[-1].finish_reason is FinishReason.STOP
    # A partial stop string that never completes is released at the end.
    held = run(collect(batcher, request("a", max_tokens=3, stop=["dq"])))
    assert "".join(c.text for c in held) == "bcd"
    batcher.close()


def test_concurrent_sequences_share_decode_steps():
    # Steps slow enough that all four are admitted before the first finishes its six tokens.
    runner = CountingRunner(step_delay_s=0.01)
    batcher = ContinuousBatcher(runner, max_batch_size=8)

    async def main():
        return await asyncio.gather(*(collect(batcher, request(p, max_tokens=6)) for p in "abcd"))

    results = run(main())
    for prompt, chunks in zip("abcd", results, strict=True):
        start = ord(prompt) - ord("a")
        assert [t for c in chunks for t in c.token_ids] == [(start + i) % 26 for i in range(1, 7)]
    assert batcher.peak_batch_size == 4
    assert max(len(step) for step in runner.decoded_ids) == 4
    batcher.close()


def test_max_batch_size_bounds_a_step_and_the_rest_wait():
    runner = CountingRunner()
    batcher = ContinuousBatcher(runner, max_batch_size=2)

    async def main():
        return await asyncio.gather(*(collect(batcher, request("a", max_tokens=4)) for _ in range(5)))

    assert all(len(chunks) == 4 for chunks in run(main()))
    assert max(len(step) for step in runner.decoded_ids) == 2
    batcher.close()


def test_an_abandoned_stream_leaves_the_batch_within_one_decode_step():
    runner = CountingRunner(step_delay_s=0.01)
    batcher = ContinuousBatcher(runner, max_batch_size=4)

    async def main():
        survivor = asyncio.ensure_future(collect(batcher, request("a", max_tokens=40, ignore_eos=True)))
        assert await asyncio.to_thread(runner.first_prefill.wait, 30), "the survivor was never prefilled"
        stream = batcher.generate(request("b", max_tokens=1000, ignore_eos=True))
        await stream.__anext__()
        await stream.aclose()  # the caller went away
        steps_at_abort = len(runner.decoded_ids)
        chunks = await survivor
        return steps_at_abort, chunks

    steps_at_abort, survivor_chunks = run(main())
    abandoned_id = runner.prefilled[1]
    steps_with_abandoned = [i for i, step in enumerate(runner.decoded_ids) if abandoned_id in step]
    # At most the step already under way when the caller left still decoded it (none at all when
    # it left between its prefill and its first decode step).
    assert max(steps_with_abandoned, default=-1) <= steps_at_abort
    assert len([t for c in survivor_chunks for t in c.token_ids]) == 40
    assert runner.live == set()
    batcher.close()


def test_invalid_prompts_are_refused_without_disturbing_others():
    runner = CountingRunner(context_length=8)
    batcher = ContinuousBatcher(runner, max_batch_size=4)
    with pytest.raises(InvalidArgument, match="context length is 8"):
        run(collect(batcher, request("abcdefghij")))
    with pytest.raises(InvalidArgument, match="vocabulary"):
        run(collect(batcher, GenerationRequest("r", SamplingParams(), prompt_token_ids=(99,))))
    chunks = run(collect(batcher, request("abc", max_tokens=100)))
    assert chunks[-1].finish_reason is FinishReason.LENGTH
    assert chunks[-1].usage.completion_tokens == 8 - 3  # the context is full
    batcher.close()


def test_sampler_greedy_seeded_and_filters():
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05], dtype=np.float32))
    assert Sampler(SamplingParams(temperature=0.0), []).sample(logits) == 0
    assert Sampler(SamplingParams(temperature=0.0), []).sample(logits, banned=[0]) == 1

    def draws(**params):
        sampler = Sampler(SamplingParams(seed=7, **params), [])
        return [sampler.sample(logits) for _ in range(200)]

    assert draws() == draws()
    assert draws() != draws(temperature=0.5)
    assert set(draws(top_k=1)) == {0}
    assert set(draws(top_k=2)) == {0, 1}
    assert set(draws(top_p=0.6)) == {0, 1}  # 0.5 alone is below 0.6
    assert set(draws(min_p=0.5)) == {0, 1}  # 0.15 < 0.5 * 0.5
    assert set(draws()) == {0, 1, 2, 3}


def test_sampler_penalties():
    logits = np.array([2.0, 1.9, 1.0], dtype=np.float32)
    assert (
        Sampler(SamplingParams(temperature=0.0, repetition_penalty=1.2), prompt_token_ids=[0]).sample(logits)
        == 1
    )
    sampler = Sampler(SamplingParams(temperature=0.0, frequency_penalty=0.5), [])
    assert [sampler.sample(logits) for _ in range(3)] == [0, 1, 0]
    sampler = Sampler(SamplingParams(temperature=0.0, presence_penalty=2.0), [])
    assert [sampler.sample(logits) for _ in range(3)] == [0, 1, 2]


def test_detokenizer_holds_back_incomplete_characters():
    pieces = {1: b"\xe2", 2: b"\x82", 3: b"\xac", 4: b"!"}

    def decode(ids):
        return b"".join(pieces[i] for i in ids).decode("utf-8", errors="replace")

    detokenizer = IncrementalDetokenizer(decode)
    assert [detokenizer.push(i) for i in (1, 2, 3, 4)] == ["", "", "€", "!"]
    detokenizer = IncrementalDetokenizer(decode)
    detokenizer.push(1)
    assert detokenizer.flush() == "\ufffd"


def test_stop_matcher_releases_only_what_cannot_become_a_stop_string():
    matcher = StopStringMatcher(["END"])
    assert matcher.feed("hello E") == ("hello ", False)
    assert matcher.feed("N") == ("", False)
    assert matcher.feed("Dless") == ("", True)
    matcher = StopStringMatcher(["END"])
    assert matcher.feed("hello E") == ("hello ", False)
    assert matcher.feed("x") == ("Ex", False)
