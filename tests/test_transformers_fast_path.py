"""The Transformers engine's static-cache decode path (the CUDA default) gives the plain path's tokens.

On the CPU the compiled variant uses torch.compile without CUDA graphs; the same code
captures CUDA graphs on a GPU (tests/test_cuda.py, run by `make gpu-check`).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from llmgrpc.clients import Client

TINY = "tiny-llama-3.1"
PROMPTS = [
    "Hello there",
    "The quick brown fox jumps over the lazy dog, and then over the lazy dog again",
    "Beautiful is better than ugly.",
    "1 2 3",
]


def greedy(client: Client, uid: str, prompt: str, max_tokens: int = 48) -> list[int]:
    return [
        token
        for message in client.generate(uid, prompt, max_tokens=max_tokens, temperature=0, ignore_eos=True)
        for token in message.token_ids
    ]


@pytest.mark.parametrize("decode", ["static", "compiled"])
def test_static_cache_decode_equals_the_plain_path(client: Client, tiny, decode: str):
    uid = f"tiny-{decode}"
    # A small cache makes sequences outgrow their columns, so realignment is exercised too.
    client.launch(TINY, model_uid=uid, engine_options={"decode": decode, "context_length": 96}, timeout=300)
    try:
        expected = [greedy(client, "tiny", prompt) for prompt in PROMPTS]
        assert [greedy(client, uid, prompt) for prompt in PROMPTS] == expected
        with ThreadPoolExecutor(len(PROMPTS)) as pool:
            together = list(pool.map(lambda prompt: greedy(client, uid, prompt), PROMPTS))
        assert together == expected
        assert client.get_model(uid).peak_batch_size > 1
    finally:
        client.terminate(uid)


def test_unknown_decode_mode_is_invalid(client: Client):
    import grpc

    with pytest.raises(grpc.RpcError) as error:
        client.launch(TINY, engine_options={"decode": "turbo"})
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "plain, static, compiled" in error.value.details()


def test_the_plain_path_gives_each_sequence_the_greedy_tokens_of_transformers_generate(tiny_files):
    """Prompts prefilled together, fed in parts, joining and leaving a running batch (rows
    refilled, the cache's buffers moved on a small context) each decode as generate does,
    with torch's own linear layers, oneDNN's, and eager attention."""
    import asyncio

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmgrpc.engines.base import GenerationRequest, SamplingParams
    from llmgrpc.engines.batching import ContinuousBatcher
    from llmgrpc.engines.onednn import use_onednn_linears
    from llmgrpc.engines.transformers_plain import DynamicCacheRunner

    tokenizer = AutoTokenizer.from_pretrained(tiny_files)
    model = AutoModelForCausalLM.from_pretrained(tiny_files, dtype=torch.float32).eval()
    prompts = [*PROMPTS, "one two three four five six seven eight nine ten " * 2]
    max_tokens = [30, 12, 20, 25, 16]
    expected = []
    for prompt, count in zip(prompts, max_tokens, strict=True):
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        assert ids.shape[1] + count <= 96
        output = model.generate(ids, max_new_tokens=count, min_new_tokens=count, do_sample=False)
        expected.append(output[0, ids.shape[1] :].tolist())
    onednn = AutoModelForCausalLM.from_pretrained(tiny_files, dtype=torch.float32).eval()
    assert use_onednn_linears(onednn) > 0
    eager = AutoModelForCausalLM.from_pretrained(
        tiny_files, dtype=torch.float32, attn_implementation="eager"
    ).eval()

    class Recorder(DynamicCacheRunner):
        def __init__(self, *args):
            super().__init__(*args)
            self.prefills: list[int] = []

        def prefill(self, sequences):
            self.prefills.append(len(sequences))
            return super().prefill(sequences)

    async def greedy(batcher: ContinuousBatcher, prompt: str, count: int) -> list[int]:
        request = GenerationRequest(
            "r", SamplingParams(temperature=0.0, max_tokens=count, ignore_eos=True), prompt=prompt
        )
        return [token async for chunk in batcher.generate(request) for token in chunk.token_ids]

    async def all_of(batcher: ContinuousBatcher) -> list[list[int]]:
        return await asyncio.gather(
            *(greedy(batcher, p, n) for p, n in zip(prompts, max_tokens, strict=True))
        )

    for candidate in (model, onednn, eager):
        runner = Recorder(candidate, tokenizer, 96)
        # Three rows for five requests: the last ones join as the first leave.
        batcher = ContinuousBatcher(runner, max_batch_size=3, prefill_chunk_tokens=16)
        try:
            assert asyncio.run(all_of(batcher)) == expected
        finally:
            batcher.close()
        assert batcher.peak_batch_size == 3


def test_prompts_prefilled_together_get_the_logits_each_gets_alone(tiny_files):
    """One packed forward pass for several prompts' first parts: each row's logits, and the next
    step's, equal those of the prompt prefilled by itself."""
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmgrpc.engines.transformers_plain import DynamicCacheRunner

    tokenizer = AutoTokenizer.from_pretrained(tiny_files)
    model = AutoModelForCausalLM.from_pretrained(tiny_files, dtype=torch.float32).eval()
    prompts = [tokenizer(p).input_ids for p in PROMPTS[:3]]
    together = DynamicCacheRunner(model, tokenizer, 96)
    rows = together.prefill([(i, ids) for i, ids in enumerate(prompts)])
    following = together.decode({i: 7 for i in range(len(prompts))}).copy()
    for i, ids in enumerate(prompts):
        alone = DynamicCacheRunner(model, tokenizer, 96)
        np.testing.assert_allclose(rows[i], alone.prefill([(0, ids)])[0], atol=1e-4)
        np.testing.assert_allclose(following[i], alone.decode({0: 7})[0], atol=1e-4)


def test_a_prompts_last_part_computed_in_its_batch_row_gives_the_logits_of_one_pass(tiny_files):
    """A prompt's last part, fed after earlier parts or after a prefix found in the prefix cache,
    is computed in the batch row it joins, beside a decoding row: its logits, and the next
    step's, equal those of the whole prompt prefilled in one pass."""
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmgrpc.engines.base import GenerationRequest, SamplingParams
    from llmgrpc.engines.transformers_plain import DynamicCacheRunner

    tokenizer = AutoTokenizer.from_pretrained(tiny_files)
    model = AutoModelForCausalLM.from_pretrained(tiny_files, dtype=torch.float32).eval()
    request = GenerationRequest("r", SamplingParams())
    prompt = tokenizer("one two three four five six seven eight nine ten " * 3).input_ids
    other = tokenizer(PROMPTS[0]).input_ids
    alone = DynamicCacheRunner(model, tokenizer, 96)
    alone.admit(0, prompt, request)
    expected = alone.prefill([(0, prompt)])[0].copy()
    expected_next = alone.decode({0: 7})[0].copy()

    runner = DynamicCacheRunner(model, tokenizer, 96, prefix_cache_tokens=1000)
    runner.admit(1, other, request)
    runner.prefill([(1, other)])
    runner.decode({1: 5})
    runner.admit(2, prompt, request)
    runner.prefill([(2, prompt[:16])])
    runner.decode({1: 5})
    np.testing.assert_allclose(runner.prefill([(2, prompt[16:])])[0], expected, atol=1e-4)
    np.testing.assert_allclose(runner.decode({1: 5, 2: 7})[1], expected_next, atol=1e-4)
    runner.release(2)  # its KV goes into the prefix cache

    cached = runner.admit(3, prompt, request)
    assert cached == len(prompt) - 1
    np.testing.assert_allclose(runner.prefill([(3, prompt[cached:])])[0], expected, atol=1e-4)
    np.testing.assert_allclose(runner.decode({1: 5, 3: 7})[1], expected_next, atol=1e-4)
