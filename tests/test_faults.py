"""Regression tests of faults found by attacking the service: each failed before its fix.

Races are made deterministic with the Gated engine double (tests/gated_engine.py), whose
load waits for a gate file, and with an engine probe that waits for one: the test opens
each gate when the state it wants to test is reached.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from pathlib import Path

import grpc
import pytest
from conftest import TINY
from fleet import (
    Background,
    Gate,
    assert_fleet_agrees,
    gated_python,
    launch_held_at,
    listed_uids,
    socket_folders,
)
from grpc_health.v1 import health_pb2, health_pb2_grpc
from rpc_helpers import rpc_error, wait_until
from status_details import reason

from llmgrpc.clients import Client
from llmgrpc.server.auth import TokenTable
from llmgrpc.server.interceptor import ServerInterceptor
from llmgrpc.server.metrics import Metrics
from llmgrpc.server.settings import Settings
from llmgrpc.server.worker_environment import worker_environment
from llmgrpc.v1 import models_pb2

TESTS = Path(__file__).parent
READY = models_pb2.MODEL_STATE_READY
LOADING = models_pb2.MODEL_STATE_LOADING
ENDLESS = {"max_tokens": 100_000, "ignore_eos": True, "temperature": 0}


# 1. A caller leaving while the engine probe runs does not cancel it for everyone else.


def test_callers_leaving_while_the_engine_probe_runs_do_not_wedge_the_control_plane(gated_server, tmp_path):
    probe_gate = Gate(tmp_path, "probe-may-run")
    server = gated_server(worker_python={"Gated": gated_python(tmp_path, probe_gate)})
    with Client(server.endpoint) as client:
        for call in (
            lambda: client.list_specs(model_name="gated-model", timeout=0.2),
            lambda: client.download("gated-model", timeout=0.2),
            lambda: client.launch("gated-model", model_uid="early", timeout=0.2),
        ):
            assert rpc_error(call).code() == grpc.StatusCode.DEADLINE_EXCEEDED
        # A launch that does not wait goes on whatever its caller does.
        assert client.launch("gated-model", model_uid="on-its-own", wait=False, timeout=0.5).state == LOADING
        probe_gate.open()
        (engine,) = client.list_specs(model_name="gated-model", timeout=30)[0].specs[0].engines
        assert (engine.name, engine.available) == ("Gated", True)
        assert wait_until(lambda: client.get_model("on-its-own").state == READY, 60)
        # The waiting launch whose caller left was stopped with it, leaving nothing.
        assert wait_until(lambda: listed_uids(client) == {"on-its-own"}, 30)
        assert client.launch("gated-model", model_uid="late", timeout=60).state == READY


def test_a_probe_that_fails_is_asked_again_not_kept(start_server, tmp_path):
    missing = tmp_path / "no-python-here"
    server = start_server(device="cpu", worker_python={"llama.cpp": str(missing)})
    with Client(server.endpoint) as client:

        def llama_cpp_reason() -> str:
            families = client.list_specs(model_name=TINY, model_format="ggufv2", timeout=30)
            return families[0].specs[0].engines[0].reason

        assert "could not run" in llama_cpp_reason()
        # The environment is repaired: the next caller sees it.
        missing.write_text(f"#!/bin/sh\nexec '{sys.executable}' \"$@\"\n")
        missing.chmod(0o755)
        assert llama_cpp_reason() == ""


# 2. Terminate ends the streams in flight with a status.


def assert_streams_end_terminated(streams) -> None:
    for stream in streams:
        error = rpc_error(list, stream)
        assert error.code() == grpc.StatusCode.UNAVAILABLE, error
        assert reason(error) == "MODEL_TERMINATED"


def test_terminate_ends_the_streams_in_flight_with_unavailable_model_terminated(client, tiny):
    client.launch(TINY, model_uid="doomed", timeout=300)
    streams = [client.generate("doomed", f"Stream {i}", timeout=120, **ENDLESS) for i in range(3)]
    for stream in streams:
        next(stream)
    client.terminate("doomed")
    assert_streams_end_terminated(streams)


def test_terminate_ends_the_gated_engines_streams_too(gated_server):
    server = gated_server()
    with Client(server.endpoint) as client:
        client.launch("gated-model", model_uid="doomed", engine_options={"token_delay_s": 0.02}, timeout=60)
        streams = [client.generate("doomed", "x", timeout=60, max_tokens=100_000) for _ in range(4)]
        for stream in streams:
            next(stream)
        client.terminate("doomed")
        assert_streams_end_terminated(streams)


# 3. Terminate and relaunch of one uid never orphan a worker.


def test_relaunch_during_a_slow_terminate_never_orphans_a_worker(gated_server, tmp_path):
    folders_before = socket_folders()
    server = gated_server()
    load_gate = Gate(tmp_path, "first-load-may-finish")
    with Client(server.endpoint) as client:
        first = launch_held_at(client, "twin", load_gate)
        # The worker is loading and cannot stop until its load ends: the terminate waits on it.
        terminating = Background(client.terminate, "twin")
        assert wait_until(lambda: client.get_model("twin").state == models_pb2.MODEL_STATE_TERMINATING)
        relaunch = rpc_error(client.launch, "gated-model", model_uid="twin", timeout=60)
        assert relaunch.code() == grpc.StatusCode.ALREADY_EXISTS
        assert "being terminated" in relaunch.details()
        load_gate.open()
        assert terminating.wait().error is None
        first.wait()
        assert first.error.code() == grpc.StatusCode.CANCELLED and reason(first.error) == "MODEL_TERMINATED"
        assert client.launch("gated-model", model_uid="twin", timeout=60).state == READY
        assert_fleet_agrees(client, folders_before)
        client.terminate("twin")
        assert_fleet_agrees(client, folders_before)
        assert listed_uids(client) == set()


# 4. A terminate whose caller gives up still completes.


def test_a_terminate_whose_caller_gives_up_still_completes(gated_server, tmp_path):
    folders_before = socket_folders()
    server = gated_server()
    load_gate = Gate(tmp_path, "load-may-finish")
    with Client(server.endpoint) as client:
        launch = launch_held_at(client, "stuck", load_gate)
        error = rpc_error(client.terminate, "stuck", timeout=0.3)
        assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        load_gate.open()  # now the worker can stop: the termination goes on without its caller
        assert wait_until(lambda: listed_uids(client) == set(), 30)
        assert launch.wait().error.code() == grpc.StatusCode.CANCELLED
        assert_fleet_agrees(client, folders_before)
        assert client.launch("gated-model", model_uid="stuck", timeout=60).state == READY


# 6. No file I/O on the event loop.


def test_a_fifo_named_config_json_does_not_freeze_the_server(start_server, tmp_path):
    folder = tmp_path / "models" / "trap"
    folder.mkdir(parents=True)
    os.mkfifo(folder / "config.json")
    server = start_server(device="cpu", allowed_model_dirs=[tmp_path / "models"])
    with Client(server.endpoint) as client:
        launch = Background(client.launch, TINY, model_format="pytorch", model_path=str(folder), timeout=30)
        health = health_pb2_grpc.HealthStub(client.channel)
        for _ in range(5):  # the server answers meanwhile
            assert health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status == 1
        error = launch.wait(40).error
        assert error is not None and error.code() == grpc.StatusCode.FAILED_PRECONDITION, error
        assert "config.json" in error.details() and "not a regular file" in error.details()
        assert listed_uids(client) == set()


# 7. Workers do not inherit the server's secrets.


def test_workers_do_not_inherit_the_servers_secrets(gated_server, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf-secret")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "cloud-secret")
    monkeypatch.setenv("LLMGRPC_AUTH_TOKENS", json.dumps({"admin-secret": "admin"}))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # what engines read passes
    server = gated_server()
    with Client(server.endpoint, token="admin-secret") as client:
        model = client.launch("gated-model", model_uid="sealed", timeout=60)
        environ = Path(f"/proc/{model.worker_pid}/environ").read_bytes().decode()
    variables = dict(item.split("=", 1) for item in environ.split("\0") if "=" in item)
    assert not {"HF_TOKEN", "AWS_SECRET_ACCESS_KEY", "LLMGRPC_AUTH_TOKENS"} & set(variables)
    assert "secret" not in environ
    assert variables["OMP_NUM_THREADS"] == "1" and variables["PYTHONPATH"] == str(TESTS)


def test_only_a_worker_that_may_download_gets_the_hub_tokens():
    environ = {"HF_TOKEN": "hf", "MODELSCOPE_API_TOKEN": "ms", "HF_ENDPOINT": "http://hub", "SECRET": "x"}
    settings = Settings(worker_environment_names=["SECRET"])
    loading = worker_environment(Settings(), environ=environ)
    downloading = worker_environment(Settings(), hub_credentials=True, environ=environ)
    assert "HF_TOKEN" not in loading and "MODELSCOPE_API_TOKEN" not in loading
    assert loading["HF_ENDPOINT"] == "http://hub" and "SECRET" not in loading
    assert downloading["HF_TOKEN"] == "hf" and downloading["MODELSCOPE_API_TOKEN"] == "ms"
    assert worker_environment(settings, environ=environ)["SECRET"] == "x"  # the operator's addition


# 8. The in-flight count never leaks.


def test_calls_whose_deadline_passes_as_they_arrive_are_counted_out(start_server):
    server = start_server(device="cpu")
    with Client(server.endpoint) as client:
        for index in range(300):
            with pytest.raises(grpc.RpcError):
                client.get_model("nobody", timeout=0.001 + (index % 20) / 1000)
    assert wait_until(lambda: server.server.interceptor.in_flight == 0, 10)


def test_a_call_that_fails_while_sending_its_request_id_is_counted_out():
    class Context:
        def invocation_metadata(self):
            return ()

        async def send_initial_metadata(self, metadata):
            raise asyncio.CancelledError  # the deadline passed as the call arrived

        def code(self):
            return None

        def cancelled(self):
            return True

        def time_remaining(self):
            return -0.001

    async def servicer(request, context):
        raise AssertionError("not reached")

    async def call() -> ServerInterceptor:
        interceptor = ServerInterceptor(TokenTable({}), Metrics(), trace_provider_tracer())
        handler = grpc.unary_unary_rpc_method_handler(servicer)
        wrapped = interceptor._wrap(handler, "/llmgrpc.v1.ModelService/GetModel")
        with pytest.raises(asyncio.CancelledError):
            await wrapped.unary_unary(models_pb2.GetModelRequest(), Context())
        return interceptor

    interceptor = asyncio.run(call())
    assert interceptor.in_flight == 0
    assert interceptor._idle.is_set()


def trace_provider_tracer():
    from opentelemetry import trace

    return trace.NoOpTracerProvider().get_tracer("test")


# 10. The uid is listed from the start; frozen workers; shutdown's reason.


def test_a_launch_is_listed_from_its_first_moment_and_can_be_terminated_then(gated_server, tmp_path):
    folders_before = socket_folders()
    probe_gate = Gate(tmp_path, "probe-may-run")
    server = gated_server(worker_python={"Gated": gated_python(tmp_path, probe_gate)})
    with Client(server.endpoint) as client:
        launch = Background(client.launch, "gated-model", model_uid="newborn", timeout=60)
        # The engine probe cannot answer yet, so the launch is still being checked: listed all the same.
        assert wait_until(lambda: "newborn" in listed_uids(client), 10)
        described = client.get_model("newborn")
        assert (described.state, described.model_name) == (models_pb2.MODEL_STATE_LOADING, "gated-model")
        client.terminate("newborn", timeout=30)
        error = launch.wait().error
        assert error.code() == grpc.StatusCode.CANCELLED and reason(error) == "MODEL_TERMINATED"
        probe_gate.open()
        assert listed_uids(client) == set()
        assert_fleet_agrees(client, folders_before)


def test_a_frozen_worker_makes_its_model_not_serving_and_never_slows_get_model(gated_server):
    server = gated_server(worker_ping_interval_s=0.2, worker_ping_timeout_s=0.5)
    with Client(server.endpoint) as client:
        model = client.launch("gated-model", model_uid="frozen", timeout=60)
        health = health_pb2_grpc.HealthStub(client.channel)

        def serving() -> bool:
            check = health.Check(health_pb2.HealthCheckRequest(service="model/frozen"), timeout=5)
            return check.status == health_pb2.HealthCheckResponse.SERVING

        os.kill(model.worker_pid, signal.SIGSTOP)
        try:
            assert wait_until(lambda: not serving(), 10)
            for _ in range(5):  # each answers at once, from what the server knows
                described = client.get_model("frozen", timeout=0.5)
                assert "did not answer" in described.error
                client.list_models(timeout=0.5)
        finally:
            os.kill(model.worker_pid, signal.SIGCONT)
        assert wait_until(serving, 10)
        assert client.get_model("frozen").error == ""


def test_streams_cut_at_the_end_of_the_shutdown_grace_say_shutting_down(gated_server):
    server = gated_server(shutdown_grace_s=0.5)
    with Client(server.endpoint) as client:
        client.launch("gated-model", model_uid="long", engine_options={"token_delay_s": 0.02}, timeout=60)
        stream = client.generate("long", "x", timeout=60, max_tokens=100_000)
        next(stream)
        stopping = Background(server.stop, 0.5)
        error = rpc_error(list, stream)
        assert error.code() == grpc.StatusCode.UNAVAILABLE
        assert reason(error) == "SHUTTING_DOWN"
        assert stopping.wait().error is None


# 11. The worker gets the caller's deadline, so time queued for admission counts against it.


def test_the_worker_gets_the_callers_deadline_not_one_restarted_after_the_queue(gated_server, tmp_path):
    requests_log = tmp_path / "requests.jsonl"
    server = gated_server(max_running_requests=1, max_waiting_requests=1, default_max_tokens=3)
    options = {"token_delay_s": 0.02, "request_log": str(requests_log)}
    timeout_s, queued_s = 30.0, 1.0
    with Client(server.endpoint) as client:
        client.launch("gated-model", model_uid="queued", engine_options=options, timeout=60)
        running = client.generate("queued", "running", timeout=60, max_tokens=100_000)
        next(running)  # it holds the one slot
        sent = time.time()
        queued = client.generate("queued", "queued", timeout=timeout_s)  # max_tokens left to the server
        assert wait_until(lambda: client.get_model("queued").waiting_requests == 1)
        time.sleep(queued_s)  # time it spends queued, which must count against its deadline
        running.cancel()
        assert "".join(response.text for response in queued) == "abc"
    arrived = {entry["prompt"]: entry for entry in map(json.loads, requests_log.read_text().splitlines())}
    assert arrived["queued"]["deadline"] == pytest.approx(sent + timeout_s, abs=queued_s / 2)
    assert arrived["queued"]["max_tokens"] == 3  # resolved by the server
    assert arrived["running"]["max_tokens"] == 100_000
