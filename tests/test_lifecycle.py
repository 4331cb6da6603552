"""Cancellation, deadlines, worker crashes and health, through a real server."""

from __future__ import annotations

import os
import signal

import grpc
import pytest
from conftest import TINY
from grpc_health.v1 import health_pb2, health_pb2_grpc
from rpc_helpers import wait_until

from llmgrpc.clients import Client
from llmgrpc.v1 import models_pb2

ENDLESS = {"max_tokens": 10_000, "ignore_eos": True, "temperature": 0}


def idle(client: Client, running_server, uid: str) -> bool:
    model = client.get_model(uid)
    return (
        model.running_requests == 0
        and model.waiting_requests == 0
        and running_server.engine_stats(uid).running_requests == 0
    )


def test_cancelled_stream_frees_the_request(client: Client, running_server, tiny):
    stream = client.generate("tiny", "Tell me everything", **ENDLESS)
    for _, _ in zip(range(3), stream, strict=False):
        pass
    assert client.get_model("tiny").running_requests == 1
    stream.cancel()
    assert wait_until(lambda: idle(client, running_server, "tiny"))
    assert list(client.generate("tiny", "Hello", max_tokens=3))[-1].usage.completion_tokens == 3


def test_deadline_stops_generation(client: Client, running_server, tiny):
    with pytest.raises(grpc.RpcError) as error:
        for _ in client.generate("tiny", "Go on forever", timeout=0.5, **ENDLESS):
            pass
    assert error.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert wait_until(lambda: idle(client, running_server, "tiny"))


def test_queue_beyond_its_bound_is_resource_exhausted(client: Client, running_server, tiny, settings):
    capacity = settings.max_running_requests + settings.max_waiting_requests
    streams = [client.generate("tiny", f"Stream {i}", **ENDLESS) for i in range(capacity)]
    try:
        for stream in streams[: settings.max_running_requests]:
            next(stream)  # these are decoding; the rest wait
        assert wait_until(lambda: client.get_model("tiny").waiting_requests == settings.max_waiting_requests)
        with pytest.raises(grpc.RpcError) as error:
            list(client.generate("tiny", "One too many", max_tokens=1))
        assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "retry" in error.value.details()
    finally:
        for stream in streams:
            stream.cancel()
    assert wait_until(lambda: idle(client, running_server, "tiny"))


def test_killed_worker_marks_its_model_failed_and_the_server_carries_on(client: Client, running_server, tiny):
    victim = client.launch(TINY, model_uid="victim")
    health = health_pb2_grpc.HealthStub(client.channel)
    assert (
        health.Check(health_pb2.HealthCheckRequest(service="model/victim")).status
        == health_pb2.HealthCheckResponse.SERVING
    )

    stream = client.generate("victim", "Keep talking", **ENDLESS)
    next(stream)
    os.kill(victim.worker_pid, signal.SIGKILL)
    with pytest.raises(grpc.RpcError) as error:
        list(stream)
    assert error.value.code() == grpc.StatusCode.UNAVAILABLE

    assert wait_until(lambda: client.get_model("victim").state == models_pb2.MODEL_STATE_FAILED)
    failed = client.get_model("victim")
    assert "SIGKILL" in failed.error
    assert (
        health.Check(health_pb2.HealthCheckRequest(service="model/victim")).status
        == health_pb2.HealthCheckResponse.NOT_SERVING
    )
    with pytest.raises(grpc.RpcError) as error:
        list(client.generate("victim", "Hello", max_tokens=2))
    assert error.value.code() == grpc.StatusCode.FAILED_PRECONDITION

    # Other models and the server itself are untouched.
    assert list(client.generate("tiny", "Hello", max_tokens=2))[-1].usage.completion_tokens == 2
    assert (
        health.Check(health_pb2.HealthCheckRequest(service="")).status
        == health_pb2.HealthCheckResponse.SERVING
    )
    client.terminate("victim")


def test_health_reports_services_and_models(client: Client, tiny):
    health = health_pb2_grpc.HealthStub(client.channel)
    for service in ("", "llmgrpc.v1.ModelService", "llmgrpc.v1.GenerateService", "model/tiny"):
        response = health.Check(health_pb2.HealthCheckRequest(service=service))
        assert response.status == health_pb2.HealthCheckResponse.SERVING, service
    with pytest.raises(grpc.RpcError) as error:
        health.Check(health_pb2.HealthCheckRequest(service="model/never-launched"))
    assert error.value.code() == grpc.StatusCode.NOT_FOUND
