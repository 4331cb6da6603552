"""The prefix cache, through the gRPC service, on Transformers and llama.cpp: a prompt that
begins with what an earlier request held prefills only the rest, and gives what it gives cold."""

from __future__ import annotations

import random
from concurrent.futures import ThreadPoolExecutor

import pytest
from conftest import TINY
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rpc_helpers import collect, scrape, value, wait_until

from llmgrpc.clients import Client

# Token ids of ordinary text in the tiny model's vocabulary (its special tokens sit below 20).
WORDS = range(20, 700)
GREEDY = dict(max_tokens=12, temperature=0, ignore_eos=True)


def launch(client: Client, engine: str, uid: str, **options):
    """The tiny model on engine, with a prefix cache of its own (Q8_0 without flash attention on
    llama.cpp: its logits then do not depend on how the prompt is cut into batches)."""
    if engine == "llama.cpp":
        options = {"flash_attention": False, **options}
        gguf = dict(model_format="ggufv2", quantization="Q8_0")
    else:
        gguf = {}
    return client.launch(
        TINY, model_engine=engine, model_uid=uid, engine_options=options, timeout=300, **gguf
    ).model_uid


@pytest.fixture(scope="module", params=["transformers", "llama.cpp"])
def cached_model(request, client: Client):
    uid = launch(client, request.param, f"cache-{request.param.replace('.', '')}")
    yield uid
    client.terminate(uid)


def words(seed: int, count: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.choice(WORDS) for _ in range(count)]


def run(client: Client, uid: str, prompt: list[int], **options) -> tuple[list[int], int]:
    """The greedy output of prompt, and how many of its tokens came from the prefix cache."""
    tokens, _, messages = collect(client.generate(uid, prompt, **GREEDY, **options))
    usage = messages[-1].usage
    assert usage.prompt_tokens == len(prompt)
    return tokens, usage.cached_prompt_tokens


def cold(client: Client, uid: str, prompt: list[int]) -> list[int]:
    tokens, cached = run(client, uid, prompt, cache_prompt=False)
    assert cached == 0
    return tokens


def test_a_shared_long_prefix_is_served_from_the_cache_and_changes_nothing(client: Client, cached_model):
    prefix = words(1, 1000)
    first = prefix + words(2, 5)
    second = prefix + words(3, 7)
    _, cached = run(client, cached_model, first)
    assert cached < 10  # nothing of it was seen before
    output, cached = run(client, cached_model, second)
    assert cached >= 990
    assert output == cold(client, cached_model, second)


def test_a_request_that_opts_out_leaves_nothing_in_the_cache(client: Client, cached_model):
    prompt = words(5, 300)
    cold(client, cached_model, prompt)
    # The same prompt again finds nothing: the opted-out request kept none of its KV.
    _, cached = run(client, cached_model, prompt)
    assert cached < 10
    # Served with the cache, it is kept as usual.
    _, cached = run(client, cached_model, prompt + words(6, 3))
    assert cached >= 299


def test_the_next_turn_of_a_conversation_reuses_the_last_answer_too(client: Client, cached_model):
    history = words(4, 300)
    for turn in range(3):
        history += words(10 + turn, 40)
        answer, cached = run(client, cached_model, history)
        if turn:
            assert cached >= len(history) - 40 - 1  # all but the new user text, the answer included
        assert answer == cold(client, cached_model, history)
        history += answer


def test_a_full_cache_evicts_and_never_serves_another_conversations_prefix(client: Client):
    """More conversations than the cache holds, interleaved turn by turn: each answer is the
    one its own history gives cold."""
    for engine, options in (("transformers", {"prefix_cache_tokens": 900}), ("llama.cpp", {})):
        uid = launch(client, engine, f"cache-small-{engine.replace('.', '')}", **options)
        try:
            # Ten conversations sharing a system text: llama.cpp has 8 slots, Transformers room for 2.
            system = words(20, 100)
            histories = [system + words(30 + n, 150) for n in range(10)]
            for _ in range(2):
                for history in histories:
                    answer, _ = run(client, uid, history)
                    assert answer == cold(client, uid, history)
                    history += answer + words(len(history), 20)
        finally:
            client.terminate(uid)


def test_prefix_cache_false_serves_nothing_from_cache(client: Client):
    uid = launch(client, "transformers", "cache-off", prefix_cache=False)
    try:
        prompt = words(5, 200)
        run(client, uid, prompt)
        assert run(client, uid, prompt)[1] == 0
    finally:
        client.terminate(uid)


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_interleaving_of_prompts_sharing_prefixes_gives_the_cold_outputs(client, cached_model, data):
    """Prompts drawn from a few shared stems, sent in random order, some at once: every output
    equals the cold output of its prompt."""
    stems = [words(100 + n, data.draw(st.integers(1, 300), label="stem length")) for n in range(3)]
    prompts = [
        stems[data.draw(st.integers(0, 2), label="stem")] + words(200 + n, data.draw(st.integers(1, 60)))
        for n in range(6)
    ]
    order = data.draw(st.permutations(range(len(prompts))), label="order")
    at_once = data.draw(st.integers(1, 3), label="requests at once")
    with ThreadPoolExecutor(at_once) as pool:
        outputs = list(pool.map(lambda n: run(client, cached_model, prompts[n])[0], order))
    for n, output in zip(order, outputs, strict=True):
        assert output == cold(client, cached_model, prompts[n])


def test_metrics_count_the_prompt_tokens_looked_up_and_found(start_server):
    server = start_server(metrics_port=0, device="cpu")
    with Client(server.endpoint) as client:
        uid = launch(client, "transformers", "cache-metrics")
        prompt = words(6, 500)
        run(client, uid, prompt)
        run(client, uid, [*prompt, 21])

        def counted() -> tuple[float, float]:
            samples = scrape(server.server.metrics_port)
            return (
                value(samples, "llmgrpc:prefix_cache_queries_total", model_uid=uid),
                value(samples, "llmgrpc:prefix_cache_hits_total", model_uid=uid),
            )

        # The engine's numbers reach the server with its next stats call.
        assert wait_until(lambda: counted() == (1001, 500), timeout=30), counted()
