"""Errors a machine can read: ErrorInfo reasons, BadRequest, RetryInfo; and health Watch."""

from __future__ import annotations

import threading

import grpc
import pytest
from conftest import TINY, RunningServer
from grpc_health.v1 import health_pb2, health_pb2_grpc
from rpc_helpers import rpc_error
from status_details import bad_request, error_info, reason, retry_info
from test_lifecycle import ENDLESS, wait_until

from llmgrpc.clients import Client
from llmgrpc.clients.errors import NotFound, Reason, ResourceExhausted
from llmgrpc.server.settings import Settings
from llmgrpc.server.status import from_rpc_error, to_rpc_status
from llmgrpc.v1 import models_pb2

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVICE_UNKNOWN = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN


@pytest.mark.parametrize(
    "launch, code, expected",
    [
        ({"model_name": "llama-9"}, grpc.StatusCode.NOT_FOUND, "MODEL_FAMILY_NOT_FOUND"),
        (
            {"model_name": "llama-3.1", "model_format": "ggufv3"},
            grpc.StatusCode.INVALID_ARGUMENT,
            "SPEC_NOT_FOUND",
        ),
        (
            {"model_name": "llama-3.1", "model_format": "ggufv2", "quantization": "Q9_K"},
            grpc.StatusCode.INVALID_ARGUMENT,
            "QUANTIZATION_NOT_SUPPORTED",
        ),
        (
            {"model_name": "llama-3.1", "model_format": "pytorch", "model_engine": "llama.cpp"},
            grpc.StatusCode.INVALID_ARGUMENT,
            "ENGINE_NOT_SUPPORTED",
        ),
        (
            {"model_name": TINY, "model_engine": "vllm"},
            grpc.StatusCode.FAILED_PRECONDITION,
            "ENGINE_UNAVAILABLE",
        ),
        (
            {"model_name": "llama-3.1", "size_in_billions": "405", "model_engine": "transformers"},
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "INSUFFICIENT_MEMORY",
        ),
        ({"model_name": TINY, "model_uid": "bad uid"}, grpc.StatusCode.INVALID_ARGUMENT, "INVALID_FIELD"),
    ],
)
def test_launch_errors_carry_a_stable_reason(client: Client, launch: dict, code, expected: str):
    error = rpc_error(client.launch, **launch)
    assert error.code() == code
    info = error_info(error)
    assert (info.reason, info.domain) == (expected, "llmgrpc.v1")


def test_every_error_has_error_info(client: Client, tiny):
    error = rpc_error(client.get_model, "nobody")
    assert error_info(error).reason == "MODEL_NOT_FOUND"
    assert error_info(error).metadata["model_uid"] == "nobody"
    error = rpc_error(client.launch, TINY, model_uid="tiny")
    assert reason(error) == "MODEL_UID_TAKEN"
    error = rpc_error(client.generate, "tiny", "Hello", max_tokens=0, top_p=2.0)
    assert reason(error) == "INVALID_FIELD"
    assert {v.field for v in bad_request(error).field_violations} == {"max_tokens", "top_p"}
    # Errors raised in the worker keep their code across the hop, and get a reason too.
    error = rpc_error(client.generate, "tiny", [5] * (tiny.context_length + 10))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and reason(error)


def test_a_message_that_does_not_parse_is_invalid_not_unknown(running_server):
    with grpc.insecure_channel(running_server.endpoint) as channel:
        for method in ("/llmgrpc.v1.ModelService/GetModel", "/llmgrpc.v1.GenerateService/Generate"):
            call = (channel.unary_stream if "Generate" in method else channel.unary_unary)(method)
            error = rpc_error(call, b"\x0a\x02\xff\xfe")  # field 1, a string that is not UTF-8
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert reason(error) == "MALFORMED_REQUEST"


def test_huge_input_is_clipped_in_the_status(client: Client):
    error = rpc_error(client.get_model, "é" * 200_000)
    assert error.code() == grpc.StatusCode.NOT_FOUND
    assert len(error.details()) < 2000 and error.details().endswith("...")
    assert error_info(error).reason == "MODEL_NOT_FOUND"


def test_reason_and_retry_delay_cross_the_worker_hop():
    sent = ResourceExhausted("busy", reason=Reason.QUEUE_FULL, retry_after_s=1.5, metadata={"model_uid": "m"})
    status = to_rpc_status(sent)
    received = from_rpc_error(
        grpc.aio.AioRpcError(
            status.code,
            grpc.aio.Metadata(),
            grpc.aio.Metadata(*status.trailing_metadata),
            details=status.details,
        )
    )
    assert (received.code_name, received.reason, received.retry_after_s) == (
        "RESOURCE_EXHAUSTED",
        "QUEUE_FULL",
        1.5,
    )
    assert received.metadata == {"model_uid": "m"}
    assert to_rpc_status(NotFound("x")).code == grpc.StatusCode.NOT_FOUND


@pytest.fixture(scope="module")
def small_server(cache_dir):
    """One decoding slot and no queue, so the second request is refused."""
    server = RunningServer(
        Settings(
            port=0, cache_dir=cache_dir, max_running_requests=1, max_waiting_requests=0, shutdown_grace_s=1
        )
    )
    yield server
    server.stop()


def test_watch_follows_a_model_from_loading_to_serving_and_loading_means_retry(small_server):
    client = Client(small_server.endpoint)
    health = health_pb2_grpc.HealthStub(client.channel)
    watch = health.Watch(health_pb2.HealthCheckRequest(service="model/slow"), timeout=120)
    assert next(watch).status == SERVICE_UNKNOWN

    launched: list = []
    launcher = threading.Thread(target=lambda: launched.append(client.launch(TINY, model_uid="slow")))
    launcher.start()
    try:
        assert next(watch).status == NOT_SERVING
        assert wait_until(lambda: any(m.model_uid == "slow" for m in client.list_models()), timeout=30)
        if client.get_model("slow").state == models_pb2.MODEL_STATE_LOADING:
            error = rpc_error(client.generate, "slow", "Hello", max_tokens=1)
            if error.code() == grpc.StatusCode.UNAVAILABLE:  # else: READY meanwhile
                assert reason(error) == "MODEL_LOADING"
                assert retry_info(error).retry_delay.seconds >= 1
        assert next(watch).status == SERVING
    finally:
        launcher.join(timeout=300)
    assert launched and launched[0].state == models_pb2.MODEL_STATE_READY

    client.terminate("slow")
    assert next(watch).status == NOT_SERVING
    watch.cancel()
    client.close()


def test_a_full_queue_is_resource_exhausted_with_retry_info(small_server):
    with Client(small_server.endpoint) as client:
        client.launch(TINY, model_uid="busy")
        stream = client.generate("busy", "Keep going", **ENDLESS)
        next(stream)
        try:
            error = rpc_error(client.generate, "busy", "One too many", max_tokens=1)
            assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert reason(error) == "QUEUE_FULL"
            assert retry_info(error).retry_delay.ToNanoseconds() == 1_000_000_000
        finally:
            stream.cancel()
        client.terminate("busy")
