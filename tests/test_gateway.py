"""The Shepherd Model Gateway (the real `smg` binary) in front of llmgrpc's vLLM engine contract.

One llmgrpc server on port 0 serves the tiny instruct model twice, on Transformers (uid
gw-pt) and on llama.cpp (gw-gguf), each on its own engine-contract listener
(engine_api_ports); one smg per listener turns OpenAI's HTTP API into Generate calls. smg
gets no tokenizer path: it reads the worker's (GetModelInfo's tokenizer_path), so the GGUF
model is served with the tokenizer llmgrpc built from the GGUF's own vocabulary.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor

import grpc
import jsonschema
import pytest
from conftest import RunningServer
from rpc_helpers import collect, wait_until
from smg_gateway import Gateway, engine_stub, free_port
from smg_grpc_proto.generated import common_pb2
from smg_grpc_proto.generated import vllm_engine_pb2 as pb

from llmgrpc.clients import Client
from llmgrpc.server.settings import Settings
from llmgrpc.v1 import models_pb2

INSTRUCT = "tiny-llama-3.1-instruct"
UIDS = {"gw-pt": {"model_format": "pytorch"}, "gw-gguf": {"model_format": "ggufv2", "quantization": "F32"}}
MESSAGES = [
    {"role": "system", "content": "You answer in one word."},
    {"role": "user", "content": "Name a colour."},
]
# A closed schema: with additionalProperties false and enum values, a model with random weights
# can only write a few short documents, so every sample finishes.
WEATHER = {
    "type": "object",
    "properties": {"city": {"type": "string", "enum": ["Paris", "Rome"]}, "unit": {"enum": ["C", "F"]}},
    "required": ["city", "unit"],
    "additionalProperties": False,
}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}}]


@pytest.fixture(scope="module")
def served(cache_dir):
    ports = {uid: free_port() for uid in UIDS}
    server = RunningServer(
        Settings(
            port=0,
            cache_dir=cache_dir,
            device="cpu",
            shutdown_grace_s=2,
            engine_api_ports=ports,
            max_running_requests=4,
        )
    )
    with Client(server.endpoint) as client:
        for uid, words in UIDS.items():
            client.launch(INSTRUCT, model_uid=uid, timeout=300, **words)
        yield server, client
    server.stop()


@pytest.fixture(scope="module")
def gateways(served):
    server, _ = served
    started = {uid: Gateway([f"127.0.0.1:{port}"]) for uid, port in server.server.engine_api_ports.items()}
    try:
        for uid, gateway in started.items():
            gateway.wait_serving(uid)
        yield started
    finally:
        for gateway in started.values():
            gateway.stop()


def tokenizer_of(server: RunningServer, uid: str):
    """The tokenizer the gateway uses: the folder GetModelInfo names."""
    from transformers import AutoTokenizer

    port = server.server.engine_api_ports[uid]
    info = engine_stub(f"127.0.0.1:{port}").GetModelInfo(pb.GetModelInfoRequest(), timeout=60)
    return AutoTokenizer.from_pretrained(info.tokenizer_path)


@pytest.mark.parametrize("uid", list(UIDS))
def test_a_greedy_completion_through_smg_is_llmgrpcs_own(served, gateways, uid):
    server, client = served
    prompt = "The quick brown fox jumps over"
    answer = gateways[uid].post(
        "/v1/completions", {"model": uid, "prompt": prompt, "max_tokens": 16, "temperature": 0}
    )
    # smg adds no beginning-of-text token to a completion's prompt.
    ids = tokenizer_of(server, uid)(prompt, add_special_tokens=False).input_ids
    assert answer["usage"]["prompt_tokens"] == len(ids)
    _, text, messages = collect(client.generate(uid, ids, max_tokens=16, temperature=0))
    assert answer["choices"][0]["text"] == text
    assert answer["usage"]["completion_tokens"] == messages[-1].usage.completion_tokens


@pytest.mark.parametrize("uid", list(UIDS))
@pytest.mark.parametrize("stream", [False, True])
def test_a_greedy_chat_through_smg_is_llmgrpcs_own(served, gateways, uid, stream):
    _, client = served
    body = {"model": uid, "messages": MESSAGES, "max_tokens": 16, "temperature": 0}
    if stream:
        events = list(
            gateways[uid].stream("/v1/chat/completions", {**body, "stream_options": {"include_usage": True}})
        )
        text = "".join(e["choices"][0]["delta"].get("content") or "" for e in events if e["choices"])
        usage = events[-1]["usage"]
    else:
        answer = gateways[uid].post("/v1/chat/completions", body)
        text, usage = answer["choices"][0]["message"]["content"], answer["usage"]
    _, own_text, messages = collect(client.chat(uid, MESSAGES, max_tokens=16, temperature=0))
    # The random model writes byte tokens: an answer cut by max_tokens in the middle of a UTF-8
    # character ends, in llmgrpc's text, with U+FFFD for its bytes, which smg leaves out.
    assert text == own_text.removesuffix("\ufffd")
    assert usage["prompt_tokens"] == messages[-1].usage.prompt_tokens
    assert usage["completion_tokens"] == messages[-1].usage.completion_tokens


@pytest.mark.parametrize("uid", list(UIDS))
def test_a_required_tool_call_through_smg_validates_for_every_seed(gateways, uid):
    for seed in range(5):
        answer = gateways[uid].post(
            "/v1/chat/completions",
            {
                "model": uid,
                "messages": [{"role": "user", "content": "The weather in Paris?"}],
                "tools": TOOLS,
                "tool_choice": "required",
                "temperature": 1.0,
                "seed": seed,
                "max_tokens": 200,
            },
        )
        choice = answer["choices"][0]
        calls = choice["message"]["tool_calls"]  # "required": one call or more, each a valid one
        assert calls, (seed, choice)
        for call in calls:
            assert call["function"]["name"] == "get_weather", (seed, choice)
            jsonschema.validate(json.loads(call["function"]["arguments"]), WEATHER)


@pytest.mark.parametrize("uid", list(UIDS))
def test_a_json_schema_response_format_through_smg_validates_for_every_seed(gateways, uid):
    for seed in range(5):
        answer = gateways[uid].post(
            "/v1/chat/completions",
            {
                "model": uid,
                "messages": [{"role": "user", "content": "The weather in Paris, as JSON."}],
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "weather", "schema": WEATHER},
                },
                "temperature": 1.0,
                "seed": seed,
                "max_tokens": 200,
            },
        )
        choice = answer["choices"][0]
        assert choice["finish_reason"] == "stop", (seed, choice)
        jsonschema.validate(json.loads(choice["message"]["content"]), WEATHER)


def _cancelled_generates(server: RunningServer) -> float:
    labels = {"service": "vllm.grpc.engine.VllmEngine", "method": "Generate", "code": "CANCELLED"}
    return server.server.metrics.registry.get_sample_value("llmgrpc:rpc_requests_total", labels) or 0.0


# On Transformers only: llama.cpp decodes the tiny model's 4,000 tokens (its context's worth)
# before smg's client has read three events on a quiet machine, leaving nothing to cancel; its
# cancellation is tested on the service (test_llamacpp.py) and through Abort below.
@pytest.mark.parametrize("uid", ["gw-pt"])
def test_a_client_leaving_mid_stream_stops_the_engine(served, gateways, uid):
    server, client = served
    cancelled = _cancelled_generates(server)
    events = gateways[uid].stream(
        "/v1/chat/completions",
        {
            "model": uid,
            "messages": MESSAGES,
            "max_tokens": 4000,
            "temperature": 1.0,
            "ignore_eos": True,  # it never ends by itself (smg forwards it; not logit_bias)
        },
    )
    for _ in range(3):
        next(events)
    assert server.engine_stats(uid).running_requests == 1
    events.close()  # the client leaves
    assert wait_until(lambda: server.engine_stats(uid).running_requests == 0, timeout=10)
    assert wait_until(lambda: _cancelled_generates(server) > cancelled, timeout=10)


# The contract itself, called directly: what smg does not show.


def _stub(server: RunningServer, uid: str):
    return engine_stub(f"127.0.0.1:{server.server.engine_api_ports[uid]}")


def test_the_tokenizer_zip_tokenizes_as_the_engine_on_both_engines(served, tmp_path):
    server, client = served
    text = "Hello world, ünïcode 12345\n\n  spaces\ttabs"
    ids = {}
    for uid in UIDS:
        chunks = list(_stub(server, uid).GetTokenizer(common_pb2.GetTokenizerRequest(), timeout=120))
        data = b"".join(chunk.data for chunk in chunks)
        assert chunks[-1].sha256 == hashlib.sha256(data).hexdigest()
        assert not any(chunk.sha256 for chunk in chunks[:-1])
        folder = tmp_path / uid
        zipfile.ZipFile(io.BytesIO(data)).extractall(folder)
        from transformers import AutoTokenizer

        ids[uid] = AutoTokenizer.from_pretrained(folder)(text).input_ids
        assert ids[uid] == list(client.tokenize(uid, text).token_ids)
    assert ids["gw-pt"] == ids["gw-gguf"]


def test_model_info_is_the_launched_models(served):
    server, client = served
    for uid in UIDS:
        info = _stub(server, uid).GetModelInfo(pb.GetModelInfoRequest(), timeout=60)
        model = client.get_model(uid)
        assert info.served_model_name == uid
        assert info.max_context_length == model.context_length
        assert info.max_req_input_len == model.context_length - 1
        tokenizer = tokenizer_of(server, uid)
        assert set(info.eos_token_ids) == set(
            tokenizer.convert_tokens_to_ids(["<|eot_id|>", "<|end_of_text|>", "<|eom_id|>"])
        )
        assert info.vocab_size >= len(tokenizer)
        server_info = _stub(server, uid).GetServerInfo(pb.GetServerInfoRequest(), timeout=10)
        assert server_info.max_num_seqs == 4  # max_running_requests
        (load,) = _stub(server, uid).GetLoads(pb.GetLoadsRequest(), timeout=10).loads
        assert load.max_running_requests == 4


def test_n_samples_come_tagged_by_index_each_with_its_own_seed(served):
    server, client = served
    request = pb.GenerateRequest(
        tokenized=pb.TokenizedInput(input_ids=[5, 6, 7]),
        sampling_params=pb.SamplingParams(temperature=1.0, seed=7, max_tokens=6, n=2, ignore_eos=True),
    )
    completes = [answer.complete for answer in _stub(server, "gw-pt").Generate(request, timeout=60)]
    assert sorted(complete.index for complete in completes) == [0, 1]
    for complete in completes:
        own, _, _ = collect(
            client.generate(
                "gw-pt", [5, 6, 7], temperature=1.0, seed=7 + complete.index, max_tokens=6, ignore_eos=True
            )
        )
        assert list(complete.output_ids) == own
        assert complete.finish_reason == "length"


@pytest.mark.parametrize(
    ("sampling", "field"),
    [
        ({"prompt_logprobs": 1}, "sampling_params.prompt_logprobs"),
        ({"structural_tag": "{}"}, "sampling_params.structural_tag"),
        ({"logprobs": -1}, "sampling_params.logprobs"),
        ({"include_stop_str_in_output": True}, "sampling_params.include_stop_str_in_output"),
        ({"n": 17}, "sampling_params.n"),
    ],
)
def test_what_llmgrpc_cannot_honour_is_refused_by_name(served, sampling, field):
    server, _ = served
    request = pb.GenerateRequest(
        tokenized=pb.TokenizedInput(input_ids=[5, 6]),
        sampling_params=pb.SamplingParams(max_tokens=2, **sampling),
    )
    with pytest.raises(grpc.RpcError) as raised:
        list(_stub(server, "gw-pt").Generate(request, timeout=30))
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in raised.value.details()


def test_what_llmgrpc_does_not_implement_says_why(served):
    stub = _stub(served[0], "gw-pt")
    calls = {
        "Embed": lambda: stub.Embed(pb.EmbedRequest(), timeout=10),
        "FlushCache": lambda: stub.FlushCache(common_pb2.FlushCacheRequest(), timeout=10),
        "StartProfile": lambda: stub.StartProfile(common_pb2.StartProfileRequest(), timeout=10),
    }
    for name, call in calls.items():
        with pytest.raises(grpc.RpcError) as raised:
            call()
        assert raised.value.code() == grpc.StatusCode.UNIMPLEMENTED, name
        assert raised.value.details().startswith(f"{name}: "), raised.value.details()


def test_abort_stops_the_engines_work_on_that_request(served):
    server, _ = served
    stream = _stub(server, "gw-gguf").Generate(_endless_request("abort-me"), timeout=120)
    next(stream)
    assert server.engine_stats("gw-gguf").running_requests == 1
    # What a fleet routes on: the load as GetLoads and Prometheus tell it.
    (load,) = _stub(server, "gw-gguf").GetLoads(pb.GetLoadsRequest(), timeout=10).loads
    assert load.num_running_reqs == 1 and load.num_waiting_reqs == 0
    assert 0 < load.token_usage <= 1
    registry = server.server.metrics.registry
    for name in ("llmgrpc:num_requests_running", "llmgrpc:kv_cache_usage_perc"):
        assert registry.get_sample_value(name, {"model_uid": "gw-gguf"}) > 0, name
    # The gateway reads its streams as they come (one it does not read is ended by the unread
    # watch instead: docs/operations.md), so this client does too while Abort is sent.
    with ThreadPoolExecutor(1) as reader:
        read = reader.submit(list, stream)
        _stub(server, "gw-gguf").Abort(pb.AbortRequest(request_ids=["abort-me", "unknown"]), timeout=10)
        with pytest.raises(grpc.RpcError) as raised:
            read.result(timeout=60)
    assert raised.value.code() == grpc.StatusCode.CANCELLED
    assert "abort-me" in raised.value.details()
    assert wait_until(lambda: server.engine_stats("gw-gguf").running_requests == 0, timeout=10)


def test_abort_ends_the_call_whenever_it_comes(served):
    """An Abort may come while the call waits on the engine or while gRPC sends a response: both
    end it CANCELLED at once, never leaving the caller to wait out its deadline."""
    server, _ = served
    stub = _stub(server, "gw-gguf")
    for attempt in range(30):
        request_id = f"abort-at-{attempt}"
        stream = stub.Generate(_endless_request(request_id), timeout=120)
        next(stream)
        time.sleep(attempt / 1000)  # a different moment of the stream each time
        with ThreadPoolExecutor(1) as reader:
            read = reader.submit(list, stream)
            stub.Abort(pb.AbortRequest(request_ids=[request_id]), timeout=10)
            with pytest.raises(grpc.RpcError) as raised:
                read.result(timeout=30)
        assert raised.value.code() == grpc.StatusCode.CANCELLED, attempt


def test_the_main_port_of_a_server_with_several_models_names_the_way_out(served):
    server, _ = served
    stub = engine_stub(server.endpoint)
    answer = stub.HealthCheck(pb.HealthCheckRequest(), timeout=10)
    assert not answer.healthy
    assert "no model is launched for this port" in answer.message


def test_health_follows_the_model_and_an_unloaded_model_reloads_for_smg(start_server):
    server = start_server(device="cpu", max_running_requests=4)
    stub = engine_stub(server.endpoint)  # the main port: the server's one model

    def health() -> pb.HealthCheckResponse:
        return stub.HealthCheck(pb.HealthCheckRequest(), timeout=10)

    assert not health().healthy  # no model yet
    with Client(server.endpoint) as client:
        client.launch(INSTRUCT, model_format="pytorch", model_uid="life", wait=False, idle_unload_s=2)

        def state() -> str:
            return models_pb2.ModelState.Name(client.get_model("life").state)

        before, answer, after = state(), health(), state()
        if before == after == "MODEL_STATE_LOADING":
            assert not answer.healthy, answer
        assert wait_until(lambda: state() == "MODEL_STATE_READY", timeout=300)
        assert health().healthy
        with Gateway([server.endpoint]) as gateway:
            gateway.wait_serving("life")
            assert wait_until(lambda: state() == "MODEL_STATE_UNLOADED", timeout=30)
            assert health().healthy, health()  # the next request loads it again
            assert wait_until(lambda: "life" in gateway.models(), timeout=10)
            answer = gateway.post(
                "/v1/chat/completions",
                {"model": "life", "messages": MESSAGES, "max_tokens": 4, "temperature": 0},
            )
            assert answer["usage"]["completion_tokens"] == 4
            assert state() in ("MODEL_STATE_READY", "MODEL_STATE_UNLOADED")

        # Draining: with a stream in flight the server waits for it, and tells gateways to go away.
        stream = stub.Generate(_endless_request("drain-me"), timeout=120)
        next(stream)
        stopping = asyncio.run_coroutine_threadsafe(server.server.stop(30), server.loop)
        assert wait_until(lambda: not health().healthy, timeout=10)
        assert "draining" in health().message
        stream.cancel()
        stopping.result(60)
    server.loop.call_soon_threadsafe(server.loop.stop)
    server._thread.join(timeout=30)  # stopped here: the fixture has nothing left to stop


def _endless_request(request_id: str) -> pb.GenerateRequest:
    return pb.GenerateRequest(
        request_id=request_id,
        tokenized=pb.TokenizedInput(input_ids=[5, 6, 7]),
        sampling_params=pb.SamplingParams(max_tokens=4000, ignore_eos=True),
        stream=True,
    )


def test_the_models_file_gives_a_model_its_own_listener():
    from llmgrpc.server.models_file import ModelsFileError, parse_models

    (launch,) = parse_models({"models": [{"model_name": INSTRUCT, "engine_api_port": 50061}]})
    assert launch.engine_api_port == 50061
    with pytest.raises(ModelsFileError, match="engine_api_port must be a port"):
        parse_models({"models": [{"model_name": INSTRUCT, "engine_api_port": "x"}]})


@pytest.mark.parametrize("uid", list(UIDS))
def test_a_prompt_sharing_a_served_prefix_reports_its_cached_tokens(served, uid):
    server, _ = served
    prefix = [20 + (7 * n) % 600 for n in range(300)]

    def cached_tokens(input_ids: list[int]) -> int:
        request = pb.GenerateRequest(
            tokenized=pb.TokenizedInput(input_ids=input_ids),
            sampling_params=pb.SamplingParams(temperature=0, max_tokens=4, ignore_eos=True),
        )
        (answer,) = _stub(server, uid).Generate(request, timeout=60)
        return answer.complete.cached_tokens

    cached_tokens([*prefix, 5])
    assert cached_tokens([*prefix, 6, 7]) >= 300


@pytest.mark.parametrize("uid", list(UIDS))
def test_kv_events_announce_the_blocks_a_finished_request_left_in_the_cache(served, uid):
    server, client = served
    prompt = [20 + (11 * n) % 600 for n in range(40)]
    events = _stub(server, uid).SubscribeKvEvents(common_pb2.SubscribeKvEventsRequest(), timeout=60)
    collect(client.generate(uid, prompt, max_tokens=4, temperature=0, ignore_eos=True))
    stored: dict[tuple[int, ...], common_pb2.KvBlocksStored] = {}
    try:
        for batch in events:  # from the first batch kept: what earlier requests stored comes too
            for event in batch.events:
                if event.HasField("stored"):
                    stored.update({tuple(block.token_ids): event.stored for block in event.stored.blocks})
            if tuple(prompt[16:32]) in stored:
                break
    finally:
        events.cancel()
    first, second = stored[tuple(prompt[:16])], stored[tuple(prompt[16:32])]
    assert all(block.block_size == 16 for block in [*first.blocks, *second.blocks])
    # The second block's parent is the first: the block before it in its event, or the event's parent.
    blocks = list(second.blocks)
    position = [list(block.token_ids) for block in blocks].index(prompt[16:32])
    parent = blocks[position - 1].block_hash if position else second.parent_block_hash
    assert parent == _block_hash(first, prompt[:16])


def _block_hash(event: common_pb2.KvBlocksStored, token_ids: list[int]) -> int:
    (block,) = [block for block in event.blocks if list(block.token_ids) == token_ids]
    return block.block_hash
