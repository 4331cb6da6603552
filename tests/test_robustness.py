"""Whatever a client sends, the server answers with a status that is not INTERNAL or UNKNOWN,
stays up, and serves a normal request afterwards.

Thousands of generated requests go to every RPC: messages with extreme values (empty and
huge strings, int32/int64 limits, NaN and infinities, long repeated fields, deeply nested
engine_options and JSON texts: schemas, tool parameters, call arguments), bytes that are not
the message at all or carry fields with the wrong wire type, and metadata with odd tokens,
request ids and binary values. A raw HTTP/2 client also sends metadata values that are not
UTF-8, which no gRPC client library would send.
The requests have no enum fields; unknown fields and wire types stand in for unknown values.

Budget: the hypothesis profile (tests/conftest.py): "ci" by default, "thorough" for more.
"""

from __future__ import annotations

import json
import socket
from collections import Counter

import grpc
import h2.config
import h2.connection
import h2.events
import pytest
from conftest import TINY, RunningServer
from google.protobuf import struct_pb2
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2
from hypothesis import given, settings
from hypothesis import strategies as st

from llmgrpc.clients import Client
from llmgrpc.server.settings import Settings
from llmgrpc.v1 import generate_pb2, models_pb2

ADMIN, INFERENCE = "robust-admin", "robust-inference"
FORBIDDEN = (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN)
GRPC_CODES = {code.value[0]: code for code in grpc.StatusCode}

# method -> (request class, response streaming, request streaming, deadline in seconds)
METHODS = {
    "/llmgrpc.v1.ModelService/ListSpecs": (models_pb2.ListSpecsRequest, False, False, 5.0),
    "/llmgrpc.v1.ModelService/LaunchModel": (models_pb2.LaunchModelRequest, False, False, 3.0),
    "/llmgrpc.v1.ModelService/ListModels": (models_pb2.ListModelsRequest, False, False, 5.0),
    "/llmgrpc.v1.ModelService/GetModel": (models_pb2.GetModelRequest, False, False, 5.0),
    "/llmgrpc.v1.ModelService/TerminateModel": (models_pb2.TerminateModelRequest, False, False, 5.0),
    "/llmgrpc.v1.GenerateService/Generate": (generate_pb2.GenerateRequest, True, False, 1.0),
    "/llmgrpc.v1.GenerateService/Tokenize": (generate_pb2.TokenizeRequest, False, False, 5.0),
    "/llmgrpc.v1.GenerateService/Detokenize": (generate_pb2.DetokenizeRequest, False, False, 5.0),
    "/grpc.health.v1.Health/Check": (health_pb2.HealthCheckRequest, False, False, 5.0),
    "/grpc.health.v1.Health/Watch": (health_pb2.HealthCheckRequest, True, False, 0.1),
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo": (
        reflection_pb2.ServerReflectionRequest,
        True,
        True,
        5.0,
    ),
}


@pytest.fixture(scope="module")
def target(cache_dir, robustness_tally):
    """A server with authentication on (so tokens are exercised too) and the tiny model as 'tiny'."""
    server = RunningServer(
        Settings(
            port=0,
            cache_dir=cache_dir,
            auth_tokens={ADMIN: "admin", INFERENCE: "inference"},
            max_running_requests=4,
            max_waiting_requests=4,
            shutdown_grace_s=1,
        )
    )
    with Client(server.endpoint, token=ADMIN) as admin:
        admin.launch(TINY, model_uid="tiny", timeout=300)
    channel = grpc.insecure_channel(server.endpoint, options=[("grpc.max_send_message_length", -1)])
    yield server, channel
    channel.close()
    server.stop()


def still_serves(server: RunningServer) -> None:
    """The server is up, and a normal request gets a normal answer."""
    with Client(server.endpoint, token=INFERENCE) as client:
        messages = list(client.generate("tiny", "Hello", max_tokens=3, temperature=0, timeout=30))
        assert messages[-1].usage.completion_tokens == 3
    with Client(server.endpoint, token=ADMIN) as admin:
        for model in admin.list_models():
            if model.model_uid != "tiny":
                admin.terminate(model.model_uid)  # whatever a generated launch started


def send(channel, method: str, payload: bytes, metadata, tally: Counter) -> grpc.StatusCode:
    _, streaming_response, streaming_request, timeout = METHODS[method]
    try:
        if streaming_request:
            responses = channel.stream_stream(method)(
                iter([payload, payload]), timeout=timeout, metadata=metadata
            )
            for _ in responses:
                pass
        elif streaming_response:
            for _ in channel.unary_stream(method)(payload, timeout=timeout, metadata=metadata):
                pass
        else:
            channel.unary_unary(method)(payload, timeout=timeout, metadata=metadata)
        code = grpc.StatusCode.OK
    except grpc.RpcError as error:
        code = error.code()
        assert code not in FORBIDDEN, f"{method}: {code.name}: {error.details()}"
    tally[(method.rpartition("/")[2], code.name)] += 1
    return code


# Values.

NAMES = st.sampled_from(
    [
        "",
        "tiny",
        TINY,
        "llama-3.1",
        "pytorch",
        "ggufv2",
        "transformers",
        "llama.cpp",
        "vllm",
        "sglang",
        "Q4_K_M",
        "F32",
        "8",
        "405",
        "0_002",
        "cpu",
        "cuda",
        "cuda:99",
        "auto",
        "none",
        "../../etc/passwd",
        "/",
        "/tmp",
        "model/tiny",
        "llmgrpc.v1.GenerateService",
        "\x00",
        "💥" * 8,
        "ﬀ",
        "a" * 65,
    ]
)
HUGE = st.builds(lambda char, count: char * count, st.characters(codec="utf-8"), st.integers(10_000, 400_000))
STRINGS = st.one_of(NAMES, st.text(max_size=40), HUGE)
INT32 = st.one_of(st.integers(-(2**31), 2**31 - 1), st.sampled_from([0, 1, -1, 2**31 - 1, -(2**31)]))
SMALL = st.integers(1, 8)
MAX_TOKENS = st.one_of(SMALL, SMALL, SMALL, INT32)  # mostly short, so valid requests end quickly
FLOATS = st.floats(width=32)  # NaN, infinities, subnormals, -0.0 included
MOSTLY_VALID = st.one_of(st.floats(0.125, 1.0, width=32), st.floats(0.125, 1.0, width=32), FLOATS)
INT64 = st.integers(-(2**63), 2**63 - 1)
TOKEN_IDS = st.one_of(
    st.lists(st.integers(0, 700), min_size=1, max_size=50),  # inside the tiny model's vocabulary
    st.lists(INT32, max_size=20),
    st.lists(st.integers(0, 1000), min_size=1000, max_size=5000),
)

JSON = st.recursive(
    st.one_of(st.none(), st.booleans(), st.floats(), st.text(max_size=20)),
    lambda children: st.one_of(
        st.lists(children, max_size=4), st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=20,
)


# JSON text nested up to far deeper than Python's parser goes (it raises RecursionError there).
DEEP_JSON = st.builds(
    lambda depth, array: "[" * depth + "]" * depth if array else '{"a": ' * depth + "1" + "}" * depth,
    st.integers(1, 20_000),
    st.booleans(),
)
JSON_TEXTS = st.one_of(st.builds(json.dumps, JSON), DEEP_JSON, STRINGS)


def nested(depth: int) -> dict:
    value: dict = {"leaf": 1}
    for _ in range(depth):
        value = {"n": value}
    return value


ENGINE_OPTIONS = st.one_of(
    st.dictionaries(
        st.sampled_from(
            [
                "dtype",
                "n_threads",
                "context_length",
                "trust_remote_code",
                "attn_implementation",
                "n_gpu_layers",
            ]
        )
        | st.text(max_size=10),
        JSON,
        max_size=4,
    ),
    st.integers(1, 300).map(nested),
)


def structs(options: dict) -> struct_pb2.Struct:
    struct = struct_pb2.Struct()
    struct.update(options)
    return struct


@st.composite
def launch_requests(draw) -> bytes:
    fields = draw(
        st.fixed_dictionaries(
            {},
            optional={
                name: STRINGS
                for name in (
                    "model_name",
                    "model_engine",
                    "model_format",
                    "size_in_billions",
                    "quantization",
                    "model_uid",
                    "model_path",
                    "device",
                )
            },
        )
    )
    request = models_pb2.LaunchModelRequest(**fields)
    if draw(st.booleans()):
        request.engine_options.CopyFrom(structs(draw(ENGINE_OPTIONS)))
    return request.SerializeToString()


# Formats valid and not: schemas, regexes and grammars that compile, and ones that do not.
STRUCTURED_OUTPUTS = st.one_of(
    st.builds(
        lambda text: {"json_schema": text},
        st.one_of(
            st.just('{"type": "object", "properties": {"a": {"type": "integer"}}}'),
            st.just('{"type": "nonsense"}'),
            JSON_TEXTS,
        ),
    ),
    st.builds(lambda text: {"regex": text}, st.one_of(st.just("[0-9]{2}"), st.just("(["), STRINGS)),
    st.builds(lambda choices: {"choice": {"choices": choices}}, st.lists(STRINGS, max_size=4)),
    st.builds(lambda text: {"grammar": text}, st.one_of(st.just('start: "a" | "b"'), STRINGS)),
    st.builds(lambda value: {"json_object": value}, st.booleans()),
    st.just({}),
)


# Conversations: roles valid and not; tools and past calls whose JSON may be nested deep.
CHAT_MESSAGES = st.lists(
    st.fixed_dictionaries(
        {"role": st.sampled_from(["user", "assistant", "tool", "system", "robot"]), "content": STRINGS},
        optional={
            "tool_calls": st.lists(
                st.fixed_dictionaries({"name": STRINGS, "arguments": JSON_TEXTS}), max_size=2
            )
        },
    ),
    min_size=1,
    max_size=3,
)
TOOLS = st.lists(st.fixed_dictionaries({"name": STRINGS, "parameters": JSON_TEXTS}), max_size=3)


@st.composite
def generate_requests(draw) -> bytes:
    optional_numbers = {
        "max_tokens": MAX_TOKENS,
        "temperature": MOSTLY_VALID,
        "top_p": MOSTLY_VALID,
        "top_k": st.one_of(st.integers(0, 1000), INT32),
        "min_p": MOSTLY_VALID,
        "repetition_penalty": MOSTLY_VALID,
        "presence_penalty": MOSTLY_VALID,
        "frequency_penalty": MOSTLY_VALID,
        "seed": INT64,
        "min_tokens": st.one_of(st.integers(0, 4), INT32),
        "logprobs": st.one_of(st.integers(0, 20), INT32),
        "truncate_prompt_tokens": st.one_of(st.integers(1, 8), INT32),
    }
    fields = draw(
        st.fixed_dictionaries(
            {"model_uid": st.one_of(st.just("tiny"), st.just("tiny"), STRINGS)},
            optional={
                "stop": st.lists(STRINGS, max_size=5),
                "stop_token_ids": st.lists(INT32, max_size=5),
                "ignore_eos": st.booleans(),
                "logit_bias": st.dictionaries(INT32, st.one_of(MOSTLY_VALID, FLOATS), max_size=4),
                "priority": INT32,
                "structured_output": STRUCTURED_OUTPUTS,
                **optional_numbers,
            },
        )
    )
    # Mostly exactly one of prompt, prompt_token_ids and messages (else validation refuses it
    # straight away).
    prompt = draw(st.sampled_from(["text", "text", "ids", "messages", "both", "neither"]))
    if prompt in ("text", "both"):
        fields["prompt"] = draw(STRINGS)
        fields["parse_special_tokens"] = draw(st.booleans())
    if prompt in ("ids", "both"):
        fields["prompt_token_ids"] = draw(TOKEN_IDS)
    if prompt == "messages":
        fields["messages"] = draw(CHAT_MESSAGES)
        fields["tools"] = draw(TOOLS)
    return generate_pb2.GenerateRequest(**fields).SerializeToString()


@st.composite
def reflection_requests(draw) -> bytes:
    kind = draw(
        st.sampled_from(
            [
                "file_by_filename",
                "file_containing_symbol",
                "file_containing_extension",
                "all_extension_numbers_of_type",
                "list_services",
            ]
        )
    )
    request = reflection_pb2.ServerReflectionRequest(host=draw(STRINGS))
    if kind == "file_containing_extension":
        request.file_containing_extension.containing_type = draw(STRINGS)
        request.file_containing_extension.extension_number = draw(INT32)
    else:
        setattr(request, kind, draw(STRINGS))
    return request.SerializeToString()


def _varint(value: int) -> bytes:
    value &= (1 << 64) - 1
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


@st.composite
def wrong_wire(draw) -> bytes:
    """Fields encoded with any wire type, known field numbers or not: wrong types of values."""
    out = bytearray()
    for _ in range(draw(st.integers(1, 6))):
        number, wire = draw(st.integers(1, 20)), draw(st.sampled_from([0, 1, 2, 5, 3, 4, 6, 7]))
        out += _varint(number << 3 | wire)
        if wire == 0:
            out += _varint(draw(st.integers(-(2**63), 2**64 - 1)))
        elif wire == 1:
            out += draw(st.binary(min_size=8, max_size=8))
        elif wire == 5:
            out += draw(st.binary(min_size=4, max_size=4))
        elif wire == 2:
            data = draw(st.binary(max_size=40))
            out += _varint(draw(st.sampled_from([len(data), len(data) + 7, 2**40]))) + data
    return bytes(out)


BYTES = st.one_of(wrong_wire(), st.binary(max_size=200))

PRINTABLE = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=60)
METADATA = st.lists(
    st.one_of(
        st.tuples(
            st.just("authorization"), st.sampled_from([f"Bearer {ADMIN}"] * 6 + [f"Bearer {INFERENCE}"] * 2)
        ),
        st.tuples(st.just("authorization"), PRINTABLE),
        st.tuples(st.just("x-request-id"), PRINTABLE),
        st.tuples(st.just("traceparent"), PRINTABLE),
        st.tuples(
            st.sampled_from(["x-blob-bin", "authorization-bin", "x-request-id-bin"]), st.binary(max_size=40)
        ),
    ),
    max_size=4,
)
# Mostly past authentication (the first authorization value counts), to reach the servicers.
WITH_TOKEN = METADATA.map(lambda items: [("authorization", f"Bearer {ADMIN}"), *items[:3]])


def test_every_rpc_answers_generated_messages(target, robustness_tally: Counter):
    server, channel = target
    payloads = {
        "/llmgrpc.v1.ModelService/ListSpecs": st.builds(
            lambda f: models_pb2.ListSpecsRequest(**f).SerializeToString(),
            st.fixed_dictionaries(
                {},
                optional={
                    n: STRINGS
                    for n in (
                        "model_name",
                        "model_engine",
                        "model_format",
                        "size_in_billions",
                        "quantization",
                    )
                },
            ),
        ),
        "/llmgrpc.v1.ModelService/LaunchModel": launch_requests(),
        "/llmgrpc.v1.ModelService/ListModels": st.just(b""),
        "/llmgrpc.v1.ModelService/GetModel": STRINGS.map(
            lambda u: models_pb2.GetModelRequest(model_uid=u).SerializeToString()
        ),
        "/llmgrpc.v1.ModelService/TerminateModel": STRINGS.filter(lambda u: u != "tiny").map(
            lambda u: models_pb2.TerminateModelRequest(model_uid=u).SerializeToString()
        ),
        "/llmgrpc.v1.GenerateService/Generate": generate_requests(),
        "/llmgrpc.v1.GenerateService/Tokenize": st.builds(
            lambda uid, text: generate_pb2.TokenizeRequest(model_uid=uid, text=text).SerializeToString(),
            st.one_of(st.just("tiny"), STRINGS),
            STRINGS,
        ),
        "/llmgrpc.v1.GenerateService/Detokenize": st.builds(
            lambda uid, ids: generate_pb2.DetokenizeRequest(model_uid=uid, token_ids=ids).SerializeToString(),
            st.one_of(st.just("tiny"), STRINGS),
            TOKEN_IDS,
        ),
        "/grpc.health.v1.Health/Check": STRINGS.map(
            lambda s: health_pb2.HealthCheckRequest(service=s).SerializeToString()
        ),
        "/grpc.health.v1.Health/Watch": STRINGS.map(
            lambda s: health_pb2.HealthCheckRequest(service=s).SerializeToString()
        ),
        "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo": reflection_requests(),
    }

    @given(
        st.sampled_from(sorted(payloads)).flatmap(lambda m: st.tuples(st.just(m), payloads[m], WITH_TOKEN))
    )
    def one(case):
        method, payload, metadata = case
        send(channel, method, payload, metadata, robustness_tally)

    # Eleven methods share this test: four times the profile's examples.
    settings(max_examples=4 * settings().max_examples)(one)()
    still_serves(server)


def test_every_rpc_answers_bytes_that_are_not_its_message(target, robustness_tally: Counter):
    server, channel = target

    @given(st.sampled_from(sorted(METHODS)), BYTES, WITH_TOKEN)
    def one(method, payload, metadata):
        send(channel, method, payload, metadata, robustness_tally)

    one()
    still_serves(server)


def test_every_rpc_answers_odd_metadata(target, robustness_tally: Counter):
    server, channel = target
    valid = {
        "/llmgrpc.v1.ModelService/ListModels": b"",
        "/llmgrpc.v1.ModelService/GetModel": models_pb2.GetModelRequest(model_uid="tiny").SerializeToString(),
        "/llmgrpc.v1.GenerateService/Generate": generate_pb2.GenerateRequest(
            model_uid="tiny", prompt="Hi", max_tokens=1
        ).SerializeToString(),
        "/llmgrpc.v1.ModelService/TerminateModel": models_pb2.TerminateModelRequest(
            model_uid="x"
        ).SerializeToString(),
        "/grpc.health.v1.Health/Check": b"",
    }

    @given(st.sampled_from(sorted(valid)), METADATA)
    def one(method, metadata):
        send(channel, method, valid[method], metadata, robustness_tally)

    one()
    still_serves(server)


def raw_grpc_call(port: int, path: str, message: bytes, headers: list[tuple[bytes, bytes]]) -> str:
    """One unary call over a bare HTTP/2 connection, headers as raw bytes; returns grpc-status."""
    config = h2.config.H2Configuration(
        client_side=True,
        header_encoding=None,
        validate_outbound_headers=False,
        normalize_outbound_headers=False,
        validate_inbound_headers=False,
    )
    connection = h2.connection.H2Connection(config=config)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        connection.initiate_connection()
        stream = connection.get_next_available_stream_id()
        connection.send_headers(
            stream,
            [
                (b":method", b"POST"),
                (b":scheme", b"http"),
                (b":path", path.encode()),
                (b":authority", b"127.0.0.1"),
                (b"content-type", b"application/grpc"),
                (b"te", b"trailers"),
                *headers,
            ],
        )
        connection.send_data(stream, b"\x00" + len(message).to_bytes(4, "big") + message, end_stream=True)
        sock.sendall(connection.data_to_send())
        while True:
            data = sock.recv(65536)
            if not data:
                return "connection closed"
            for event in connection.receive_data(data):
                if isinstance(event, (h2.events.ResponseReceived, h2.events.TrailersReceived)):
                    status = dict(event.headers).get(b"grpc-status")
                    if status is not None:
                        return status.decode()
                elif isinstance(event, h2.events.DataReceived):
                    connection.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                elif isinstance(event, h2.events.StreamReset):
                    return f"stream reset ({event.error_code})"
            sock.sendall(connection.data_to_send())


def test_metadata_that_is_not_utf8(target, robustness_tally: Counter):
    """Header values no client library would send: invalid UTF-8, control bytes."""
    server, _ = target
    request = generate_pb2.GenerateRequest(model_uid="tiny", prompt="Hi", max_tokens=1).SerializeToString()
    odd_bytes = st.binary(min_size=1, max_size=40).filter(lambda b: b"\r" not in b and b"\n" not in b)
    # Keys are legal header names: gRPC's transport refuses illegal names, bad base64 in -bin
    # values and bad grpc-timeout values itself (INTERNAL), before any application code runs.
    keys = st.sampled_from([b"authorization", b"x-request-id", b"traceparent", b"tracestate", b"x-custom"])

    @given(
        st.sampled_from(
            [
                "/llmgrpc.v1.GenerateService/Generate",
                "/llmgrpc.v1.ModelService/ListModels",
                "/grpc.health.v1.Health/Check",
            ]
        ),
        st.lists(st.tuples(keys, st.one_of(odd_bytes, st.just(f"Bearer {ADMIN}".encode()))), max_size=4),
    )
    def one(method, headers):
        payload = request if method.endswith("Generate") else b""
        status = raw_grpc_call(server.port, method, payload, headers)
        code = GRPC_CODES.get(int(status)) if status.isdigit() else None
        assert code not in FORBIDDEN, (method, headers, status)
        robustness_tally[(f"raw {method.rpartition('/')[2]}", code.name if code else status)] += 1

    one()
    still_serves(server)


# Cases the generated requests found, kept as plain regressions.


def test_negative_seeds_are_seeds(target):
    server, _ = target
    with Client(server.endpoint, token=INFERENCE) as client:
        runs = [
            [
                t
                for m in client.generate("tiny", "Hello", max_tokens=6, seed=-(2**63), ignore_eos=True)
                for t in m.token_ids
            ]
            for _ in range(2)
        ]
    assert runs[0] == runs[1] and len(runs[0]) == 6


def test_non_finite_engine_options_are_invalid(target):
    server, _ = target
    with Client(server.endpoint, token=ADMIN) as admin:
        with pytest.raises(grpc.RpcError) as error:
            admin.launch(TINY, engine_options={"dtype": float("inf")})
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "engine_options.dtype" in error.value.details()
