"""The model lifecycle through the service: idle unload and reload, WatchModel, launches that do not
wait, and FAILED models that stay listed until terminated."""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import grpc
from conftest import TINY
from fleet import Gate, listed_uids
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import generate_latest
from rpc_helpers import collect, rpc_error, wait_until
from status_details import bad_request, reason, retry_info

from llmgrpc.clients import Client
from llmgrpc.v1 import models_pb2

LOADING = models_pb2.MODEL_STATE_LOADING
READY = models_pb2.MODEL_STATE_READY
FAILED = models_pb2.MODEL_STATE_FAILED
UNLOADED = models_pb2.MODEL_STATE_UNLOADED
TERMINATED = models_pb2.MODEL_STATE_TERMINATED
GREEDY = {"max_tokens": 12, "temperature": 0, "ignore_eos": True}


def serving(client: Client, uid: str) -> bool:
    health = health_pb2_grpc.HealthStub(client.channel)
    check = health.Check(health_pb2.HealthCheckRequest(service=f"model/{uid}"), timeout=5)
    return check.status == health_pb2.HealthCheckResponse.SERVING


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        with open(f"/proc/{pid}/stat") as stat:  # reaped between the two: ESRCH or ENOENT
            state = stat.read().rpartition(")")[2].split()[0]
    except (ProcessLookupError, FileNotFoundError):
        return False
    return state != "Z"


def models_loaded(server) -> float:
    for line in generate_latest(server.server.metrics.registry).decode().splitlines():
        if line.startswith("llmgrpc:models_loaded "):
            return float(line.split()[1])
    raise AssertionError("no llmgrpc:models_loaded metric")


def test_an_idle_model_is_unloaded_and_its_next_generate_reloads_it(client, running_server, tiny):
    model = client.launch(TINY, model_uid="napper", idle_unload_s=2, timeout=300)
    assert model.idle_unload_s == 2
    before = collect(client.generate("napper", "Hello there", **GREEDY))
    last_stream_ended = time.time()
    loaded_with_napper = models_loaded(running_server)

    assert wait_until(lambda: client.get_model("napper").state == UNLOADED, 15)
    unloaded = client.get_model("napper")
    assert unloaded.condition.reason == "IdleUnloaded"
    # The clock counts from the end of the last stream.
    assert unloaded.condition.transition_time.ToNanoseconds() / 1e9 >= last_stream_ended + 1.9
    assert unloaded.worker_pid == 0 and unloaded.memory_bytes == 0
    assert wait_until(lambda: not alive(model.worker_pid))
    assert not serving(client, "napper")
    assert models_loaded(running_server) == loaded_with_napper - 1

    after = collect(client.generate("napper", "Hello there", timeout=120, **GREEDY))
    assert (after[0], after[1]) == (before[0], before[1])  # same tokens, same text
    reloaded = client.get_model("napper")
    assert reloaded.state == READY and reloaded.condition.reason == "Loaded"
    assert serving(client, "napper")
    client.terminate("napper")


def test_a_live_stream_is_never_cut_by_the_idle_clock(gated_server):
    server = gated_server()
    with Client(server.endpoint) as client:
        client.launch(
            "gated-model", model_uid="talker", idle_unload_s=2, engine_options={"token_delay_s": 0.1}
        )
        token_ids, text, messages = collect(client.generate("talker", "x", max_tokens=100, timeout=60))
        assert len(token_ids) == 100 and messages[-1].finish_reason == 2  # LENGTH: ran its 10 s whole
        assert wait_until(lambda: client.get_model("talker").state == UNLOADED, 10)


def test_an_unloaded_model_is_terminated_and_frees_its_uid(gated_server):
    server = gated_server()
    with Client(server.endpoint) as client:
        client.launch("gated-model", model_uid="sleeper", idle_unload_s=0.5)
        assert wait_until(lambda: client.get_model("sleeper").state == UNLOADED, 10)
        assert client.terminate("sleeper").model_uid == "sleeper"
        assert listed_uids(client) == set()
        assert client.launch("gated-model", model_uid="sleeper").state == READY


def test_a_reload_longer_than_the_callers_deadline_is_unavailable_with_retry_info(gated_server, tmp_path):
    server = gated_server()
    gate = Gate(tmp_path, "reload-may-finish")
    gate.open()
    with Client(server.endpoint) as client:
        options = {"load_gate": str(gate.path)}
        client.launch("gated-model", model_uid="slow-waker", idle_unload_s=0.5, engine_options=options)
        assert wait_until(lambda: client.get_model("slow-waker").state == UNLOADED, 10)
        gate.path.unlink()  # the reload will wait at the gate
        error = rpc_error(client.generate, "slow-waker", "x", max_tokens=2, timeout=1.0)
        assert error.code() == grpc.StatusCode.UNAVAILABLE and reason(error) == "MODEL_LOADING"
        assert retry_info(error) is not None
        assert client.get_model("slow-waker").condition.reason == "Reloading"
        gate.open()
        assert collect(client.generate("slow-waker", "x", max_tokens=2, timeout=60))[1] == "ab"


def test_watch_model_follows_a_launch_that_does_not_wait(gated_server, tmp_path):
    server = gated_server()
    gate = Gate(tmp_path, "load-may-finish")
    with Client(server.endpoint) as client:
        started = client.launch(
            "gated-model", model_uid="watched", wait=False, engine_options={"load_gate": str(gate.path)}
        )
        assert started.state == LOADING and started.condition.reason == "LaunchRequested"
        events = client.watch("watched", timeout=60)
        first = next(events)
        assert first.state == LOADING
        assert wait_until(gate.waited_on, 60)
        gate.open()
        rest = list(events)  # ends by itself once the model settles
        assert rest[-1].state == READY and rest[-1].condition.reason == "Loaded"
        assert all(event.state == LOADING for event in rest[:-1])
        # A model that has settled: one event, and the stream ends.
        assert [event.state for event in client.watch("watched", timeout=10)] == [READY]


def test_watch_model_ends_with_terminated(gated_server, tmp_path):
    server = gated_server()
    gate = Gate(tmp_path, "never")
    with Client(server.endpoint) as client:
        client.launch(
            "gated-model", model_uid="doomed", wait=False, engine_options={"load_gate": str(gate.path)}
        )
        events = client.watch("doomed", timeout=60)
        assert next(events).state == LOADING
        assert wait_until(gate.waited_on, 60)
        client.terminate("doomed")
        states = [event.state for event in events]
        assert states[-1] == TERMINATED and models_pb2.MODEL_STATE_TERMINATING in states


def test_a_killed_worker_leaves_its_model_failed_and_listed_until_terminated(gated_server):
    server = gated_server()
    with Client(server.endpoint) as client:
        model = client.launch("gated-model", model_uid="casualty")
        os.kill(model.worker_pid, signal.SIGKILL)
        assert wait_until(lambda: client.get_model("casualty").state == FAILED, 15)
        (listed,) = client.list_models()
        assert (listed.model_uid, listed.state) == ("casualty", FAILED)
        assert "SIGKILL" in listed.error and listed.condition.reason == "WorkerExited"
        time.sleep(1.0)  # still there a while later
        assert client.get_model("casualty").state == FAILED
        client.terminate("casualty")
        assert listed_uids(client) == set()


def test_a_higher_priority_request_is_admitted_before_those_queued_ahead_of_it(gated_server, tmp_path):
    """One decode slot, held; three priority-10 requests queue, then a priority-0 one: when the slot
    frees, the priority-0 request is admitted first, then the others in their arrival order."""
    requests_log = tmp_path / "requests.jsonl"
    server = gated_server(max_running_requests=1, max_waiting_requests=8)
    options = {"token_delay_s": 0.01, "request_log": str(requests_log)}
    with Client(server.endpoint) as client:
        client.launch("gated-model", model_uid="busy", engine_options=options, timeout=60)
        holder = client.generate("busy", "holder", timeout=60, max_tokens=100_000)
        next(holder)
        queued = []
        for index in range(3):
            queued.append(client.generate("busy", f"later-{index}", timeout=60, max_tokens=2, priority=10))
            assert wait_until(lambda waiting=index + 1: client.get_model("busy").waiting_requests == waiting)
        queued.append(client.generate("busy", "urgent", timeout=60, max_tokens=2, priority=0))
        assert wait_until(lambda: client.get_model("busy").waiting_requests == 4)
        holder.cancel()
        for stream in queued:
            assert collect(stream)[2][-1].finish_reason == 2  # LENGTH: each ran
    arrived = [json.loads(line)["prompt"] for line in requests_log.read_text().splitlines()]
    assert arrived == ["holder", "urgent", "later-0", "later-1", "later-2"]


def test_a_low_priority_request_runs_under_a_steady_stream_of_urgent_ones(gated_server):
    """Two decode slots and six callers sending priority -1 requests back to back, so that some
    always wait: a priority-5 request still runs, its priority ageing as it waits."""
    server = gated_server(max_running_requests=2, max_waiting_requests=16, priority_ageing_per_s=20)
    stop = threading.Event()
    with Client(server.endpoint) as client:
        client.launch("gated-model", model_uid="busy", engine_options={"token_delay_s": 0.01}, timeout=60)

        def urgent_caller() -> None:
            while not stop.is_set():
                collect(client.generate("busy", "urgent", timeout=60, max_tokens=5, priority=-1))

        callers = [threading.Thread(target=urgent_caller) for _ in range(6)]
        for caller in callers:
            caller.start()
        try:
            assert wait_until(lambda: client.get_model("busy").waiting_requests >= 3)
            patient = collect(client.generate("busy", "patient", timeout=30, max_tokens=2, priority=5))
            assert patient[1] == "ab"  # it ran, though urgent requests kept waiting beside it
        finally:
            stop.set()
            for caller in callers:
                caller.join(timeout=60)


def test_a_priority_out_of_range_is_refused_naming_the_range(client):
    for priority in (-(2**31), 101, -101):
        error = rpc_error(client.generate, "tiny", "Hello", max_tokens=2, priority=priority)
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "[-100, 100]" in error.details()
        assert [v.field for v in bad_request(error).field_violations] == ["priority"]
