"""Replicas: several worker processes serving one model uid, through the gRPC service.

Generate goes to the READY replica with the fewest requests in flight; a replica whose worker
dies is restarted while the others serve; the model is READY (and its health SERVING) while
one replica is READY; TerminateModel stops them all.
"""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

import grpc
import pytest
from conftest import TINY
from fleet import Gate, fleet_disagreement, gated_workers, listed_uids, live_workers
from grpc_health.v1 import health_pb2, health_pb2_grpc
from rpc_helpers import collect, rpc_error, scrape, value, wait_until
from status_details import bad_request

from llmgrpc.clients import Client
from llmgrpc.server.resources import process_memory_bytes
from llmgrpc.v1 import models_pb2

LOADING = models_pb2.MODEL_STATE_LOADING
READY = models_pb2.MODEL_STATE_READY
FAILED = models_pb2.MODEL_STATE_FAILED
UNLOADED = models_pb2.MODEL_STATE_UNLOADED


def socket_folders_of(model_uid: str) -> dict[int, Path]:
    """pid -> socket folder of this model's workers (other tests' servers in this process may
    have workers of their own alive)."""
    return {
        pid: Path(worker["socket"]).parent
        for pid, worker in live_workers().items()
        if worker["model_uid"] == model_uid
    }


def serving(client: Client, uid: str) -> bool:
    health = health_pb2_grpc.HealthStub(client.channel)
    check = health.Check(health_pb2.HealthCheckRequest(service=f"model/{uid}"), timeout=5)
    return check.status == health_pb2.HealthCheckResponse.SERVING


def replica_states(client: Client, uid: str) -> list[int]:
    return [replica.state for replica in client.get_model(uid).replicas]


def running(client: Client, uid: str) -> list[int]:
    return [replica.running_requests for replica in client.get_model(uid).replicas]


def close(gate: Gate) -> None:
    """Close an open gate, forgetting the loads that waited at it before."""
    gate.path.unlink()
    Path(f"{gate.path}.waiting").unlink()


class Stream:
    """A Generate stream read to its end in a thread: its token count, or the error it ended with."""

    def __init__(self, client: Client, uid: str, **request):
        self.tokens, self.error = 0, None
        self._thread = threading.Thread(target=self._read, args=(client, uid, request), daemon=True)
        self._thread.start()

    def _read(self, client: Client, uid: str, request: dict) -> None:
        try:
            for message in client.generate(uid, "Hello there", timeout=300, **request):
                self.tokens += len(message.token_ids)
        except grpc.RpcError as error:
            self.error = error

    def wait(self) -> Stream:
        self._thread.join(300)
        assert not self._thread.is_alive(), "the stream did not end"
        return self


def test_two_replicas_of_the_tiny_model_split_the_streams_and_outlive_a_killed_worker(start_server):
    # Pings patient enough that a busy machine never takes a replica out of the routing.
    server = start_server(
        device="cpu",
        max_running_requests=8,
        max_waiting_requests=4,
        replica_restart_backoff_s=0.5,
        worker_ping_timeout_s=60,
        metrics_port=0,
    )
    with Client(server.endpoint) as client:
        model = client.launch(TINY, model_uid="pair", replica=2, timeout=300)
        assert model.state == READY and len(model.replicas) == 2
        pids = [replica.worker_pid for replica in model.replicas]
        assert all(pids) and pids[0] != pids[1] and model.worker_pid == pids[0]
        assert [replica.device for replica in model.replicas] == ["cpu", "cpu"]
        assert serving(client, "pair")
        # The model's memory is both workers': well above either one's.
        metrics = scrape(server.server.metrics_port)
        rss = value(metrics, "llmgrpc:model_memory_bytes", model_uid="pair", kind="rss")
        assert rss > 1.5 * max(process_memory_bytes(pid) for pid in pids)

        streams = [Stream(client, "pair", max_tokens=400, ignore_eos=True) for _ in range(16)]
        # The fewest in flight first: 16 streams at once are 8 on each worker.
        assert wait_until(lambda: running(client, "pair") == [8, 8], 60), running(client, "pair")

        os.kill(pids[0], signal.SIGKILL)
        for stream in streams:
            stream.wait()
        cut = [stream for stream in streams if stream.error is not None]
        assert len(cut) == 8, [stream.error for stream in cut]
        assert {stream.error.code() for stream in cut} == {grpc.StatusCode.UNAVAILABLE}
        assert all(stream.tokens == 400 for stream in streams if stream.error is None)

        # New requests keep succeeding (on the replica left, or on both once the other is back).
        for _ in range(4):
            token_ids, _, _ = collect(client.generate("pair", "Hello", max_tokens=8, ignore_eos=True))
            assert len(token_ids) == 8
        assert client.get_model("pair").state == READY

        # The killed replica comes back READY, in a new worker.
        assert wait_until(lambda: replica_states(client, "pair") == [READY, READY], 120)
        back = client.get_model("pair")
        assert back.replicas[0].restarts == 1 and back.replicas[1].restarts == 0
        assert back.replicas[0].worker_pid not in (0, pids[0]) and back.replicas[1].worker_pid == pids[1]
        assert back.replicas[0].condition.reason == "Loaded"
        assert serving(client, "pair")
        client.terminate("pair")


def test_new_requests_go_to_the_other_replica_while_the_dead_one_restarts(gated_server, tmp_path):
    server = gated_server(replica_restart_backoff_s=0.1, worker_ping_timeout_s=60)
    gate = Gate(tmp_path, "loads-may-finish")
    gate.open()
    with Client(server.endpoint) as client:
        options = {"load_gate": str(gate.path), "token_delay_s": 0.05}
        model = client.launch("gated-model", model_uid="duo", replica=2, engine_options=options)
        folders = socket_folders_of("duo")
        close(gate)  # the restart will wait at the gate
        killed = model.replicas[1].worker_pid
        os.kill(killed, signal.SIGKILL)
        assert wait_until(gate.waited_on, 60)  # replica 1's new worker is loading

        restarting = client.get_model("duo")
        assert restarting.state == READY and serving(client, "duo")
        assert restarting.replicas[1].state == LOADING
        assert restarting.replicas[1].condition.reason == "Restarting"
        assert restarting.replicas[1].restarts == 1
        assert restarting.replicas[0].state == READY
        # Every request goes to replica 0, the only one READY.
        streams = [Stream(client, "duo", max_tokens=40) for _ in range(3)]
        assert wait_until(lambda: running(client, "duo") == [3, 0], 30), running(client, "duo")
        assert all(stream.wait().tokens == 40 for stream in streams)

        gate.open()
        assert wait_until(lambda: replica_states(client, "duo") == [READY, READY], 60)
        # Both serve again: two streams at once go one to each.
        streams = [Stream(client, "duo", max_tokens=100) for _ in range(2)]
        assert wait_until(lambda: running(client, "duo") == [1, 1], 30), running(client, "duo")
        assert all(stream.wait().tokens == 100 for stream in streams)
        # ListModels and the worker processes agree; the dead worker's socket folder is gone.
        assert wait_until(lambda: not fleet_disagreement(client), 20), fleet_disagreement(client)
        assert not folders[killed].exists()
        folders.update(socket_folders_of("duo"))

        client.terminate("duo")
        assert listed_uids(client) == set()
        assert wait_until(lambda: not gated_workers(), 20), gated_workers()
        assert wait_until(lambda: not any(folder.exists() for folder in folders.values()), 10)


def test_a_model_with_no_replica_ready_is_loading_and_not_serving_until_one_is_back(gated_server, tmp_path):
    server = gated_server(replica_restart_backoff_s=0.1)
    gate = Gate(tmp_path, "loads-may-finish")
    gate.open()
    with Client(server.endpoint) as client:
        model = client.launch(
            "gated-model", model_uid="both", replica=2, engine_options={"load_gate": str(gate.path)}
        )
        close(gate)
        for replica in model.replicas:
            os.kill(replica.worker_pid, signal.SIGKILL)
        assert wait_until(lambda: replica_states(client, "both") == [LOADING, LOADING], 60)
        down = client.get_model("both")
        assert (down.state, down.condition.reason) == (LOADING, "Restarting")
        assert not serving(client, "both")
        error = rpc_error(client.generate, "both", "x", max_tokens=2, timeout=10)
        assert error.code() == grpc.StatusCode.UNAVAILABLE

        gate.open()
        assert wait_until(lambda: client.get_model("both").state == READY, 60)
        assert serving(client, "both")
        assert collect(client.generate("both", "x", max_tokens=2, timeout=60))[1] == "ab"
        assert wait_until(lambda: replica_states(client, "both") == [READY, READY], 60)
        client.terminate("both")


def test_the_idle_clock_runs_again_once_a_model_with_no_replica_ready_is_back(gated_server, tmp_path):
    server = gated_server(replica_restart_backoff_s=0.1)
    gate = Gate(tmp_path, "loads-may-finish")
    gate.open()
    with Client(server.endpoint) as client:
        options = {"load_gate": str(gate.path)}
        model = client.launch(
            "gated-model", model_uid="waker", replica=2, idle_unload_s=5, engine_options=options
        )
        close(gate)
        for replica in model.replicas:
            os.kill(replica.worker_pid, signal.SIGKILL)
        assert wait_until(lambda: client.get_model("waker").state == LOADING, 30)
        gate.open()
        assert wait_until(lambda: client.get_model("waker").state == READY, 60)
        assert wait_until(lambda: client.get_model("waker").state == UNLOADED, 60)
        client.terminate("waker")


def test_idle_unload_stops_every_replica_and_a_generate_reloads_them_all(gated_server):
    server = gated_server()
    with Client(server.endpoint) as client:
        client.launch("gated-model", model_uid="nappers", replica=2, idle_unload_s=0.5)
        assert len({worker["socket"] for worker in gated_workers()}) == 2
        assert wait_until(lambda: client.get_model("nappers").state == UNLOADED, 10)
        unloaded = client.get_model("nappers")
        assert [replica.state for replica in unloaded.replicas] == [UNLOADED, UNLOADED]
        assert [replica.worker_pid for replica in unloaded.replicas] == [0, 0]
        assert wait_until(lambda: not gated_workers(), 20), gated_workers()

        assert collect(client.generate("nappers", "x", max_tokens=3, timeout=60))[1] == "abc"
        reloaded = client.get_model("nappers")
        assert reloaded.state == READY and [r.state for r in reloaded.replicas] == [READY, READY]
        assert len(gated_workers()) == 2
        client.terminate("nappers")
        assert wait_until(lambda: not gated_workers(), 20), gated_workers()


def test_a_replica_that_fails_to_load_at_launch_fails_the_launch_and_stops_the_others(gated_server, tmp_path):
    server = gated_server()
    with Client(server.endpoint) as client:
        # A load gate in a folder that does not exist: the engine cannot create <gate>.waiting.
        options = {"load_gate": str(tmp_path / "missing" / "gate")}
        error = rpc_error(client.launch, "gated-model", model_uid="broken", replica=2, engine_options=options)
        assert error.code() != grpc.StatusCode.OK
        failed = client.get_model("broken")
        assert failed.state == FAILED and failed.error
        assert [replica.state for replica in failed.replicas] == [FAILED, FAILED]
        assert [replica.worker_pid for replica in failed.replicas] == [0, 0]
        assert wait_until(lambda: not gated_workers(), 20), gated_workers()
        client.terminate("broken")
        assert listed_uids(client) == set()


@pytest.mark.parametrize("replica", [0, -2])
def test_a_replica_count_below_one_is_invalid_argument_before_any_worker_starts(gated_server, replica):
    server = gated_server()
    with Client(server.endpoint) as client:
        error = rpc_error(client.launch, "gated-model", model_uid="none", replica=replica)
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        violations = bad_request(error)
        assert violations is not None
        assert "replica" in [violation.field for violation in violations.field_violations]
        assert listed_uids(client) == set() and not gated_workers()


def test_a_launch_without_replica_lists_its_one_worker_as_replica_zero(gated_server):
    server = gated_server()
    with Client(server.endpoint) as client:
        model = client.launch("gated-model", model_uid="solo")
        (replica,) = model.replicas
        assert (replica.index, replica.state, replica.device) == (0, READY, "cpu")
        assert replica.worker_pid == model.worker_pid != 0
        client.terminate("solo")
        assert wait_until(lambda: not gated_workers(), 20), gated_workers()
