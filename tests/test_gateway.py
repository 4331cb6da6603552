"""The Shepherd Model Gateway (the real `smg` binary) in front of llmgrpc's vLLM engine contract.

One llmgrpc server on port 0 serves the tiny instruct model twice, on Transformers (uid
gw-pt) and on llama.cpp (gw-gguf), each on its own engine-contract listener
(engine_api_ports); one smg per listener turns OpenAI's HTTP API into Generate calls. smg
gets no tokenizer path: it reads the worker's (GetModelInfo's tokenizer_path), so the GGUF
model is served with the tokenizer llmgrpc built from the GGUF's own vocabulary.
"""

from __future__ import annotations

import json

import jsonschema
import pytest
from conftest import RunningServer
from rpc_helpers import collect, wait_until
from smg_gateway import Gateway, free_port

from llmgrpc.clients import Client
from llmgrpc.server.settings import Settings

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
    from smg_gateway import engine_stub
    from smg_grpc_proto.generated import vllm_engine_pb2 as pb
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


def _nudges(client: Client, uid: str) -> dict[str, float]:
    """The random model, left alone, pads JSON with whitespace for ever: whitespace tokens are all
    but banned and closing quotes and braces favoured; the grammar does the rest."""
    bias = {}
    for text, value in (
        (" ", -100.0),
        ("\n", -100.0),
        ("\t", -100.0),
        ("\r", -100.0),
        ('"', 6.0),
        ("}", 6.0),
    ):
        bias[str(client.tokenize(uid, text).token_ids[-1])] = value
    return bias


@pytest.mark.parametrize("uid", list(UIDS))
def test_a_required_tool_call_through_smg_validates_for_every_seed(served, gateways, uid):
    _, client = served
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
                "logit_bias": _nudges(client, uid),
            },
        )
        choice = answer["choices"][0]
        calls = choice["message"]["tool_calls"]  # "required": one call or more, each a valid one
        assert calls, (seed, choice)
        for call in calls:
            assert call["function"]["name"] == "get_weather", (seed, choice)
            jsonschema.validate(json.loads(call["function"]["arguments"]), WEATHER)


@pytest.mark.parametrize("uid", list(UIDS))
def test_a_json_schema_response_format_through_smg_validates_for_every_seed(served, gateways, uid):
    _, client = served
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
                "logit_bias": _nudges(client, uid),
            },
        )
        choice = answer["choices"][0]
        assert choice["finish_reason"] == "stop", (seed, choice)
        jsonschema.validate(json.loads(choice["message"]["content"]), WEATHER)


def _cancelled_generates(server: RunningServer) -> float:
    labels = {"service": "vllm.grpc.engine.VllmEngine", "method": "Generate", "code": "CANCELLED"}
    return server.server.metrics.registry.get_sample_value("llmgrpc:rpc_requests_total", labels) or 0.0


@pytest.mark.parametrize("uid", list(UIDS))
def test_a_client_leaving_mid_stream_stops_the_engine(served, gateways, uid):
    server, client = served
    eos = [
        str(token)
        for token in tokenizer_of(server, uid).convert_tokens_to_ids(
            ["<|eot_id|>", "<|end_of_text|>", "<|eom_id|>"]
        )
    ]
    cancelled = _cancelled_generates(server)
    events = gateways[uid].stream(
        "/v1/chat/completions",
        {
            "model": uid,
            "messages": MESSAGES,
            "max_tokens": 4000,
            "temperature": 1.0,
            "logit_bias": {token: -100.0 for token in eos},  # it never ends by itself
        },
    )
    for _ in range(3):
        next(events)
    assert server.engine_stats(uid).running_requests == 1
    events.close()  # the client leaves
    assert wait_until(lambda: server.engine_stats(uid).running_requests == 0, timeout=10)
    assert wait_until(lambda: _cancelled_generates(server) > cancelled, timeout=10)
