"""Draining: on SIGTERM health goes NOT_SERVING, new calls are refused, streams in flight finish,
then workers stop and the process exits 0."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest
from conftest import TINY
from grpc_health.v1 import health_pb2, health_pb2_grpc
from status_details import reason
from test_lifecycle import wait_until

from llmgrpc.clients import Client
from llmgrpc.v1 import generate_pb2

LLMGRPC = Path(sys.executable).parent / "llmgrpc"
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVING = health_pb2.HealthCheckResponse.SERVING


class Streams:
    """Streams read to the end in background threads, each recording its messages or its error."""

    def __init__(self, client: Client, uid: str, count: int, max_tokens: int):
        self.results: list = [None] * count
        self.started = threading.Barrier(count + 1)
        self.threads = [
            threading.Thread(target=self._read, args=(client, uid, i, max_tokens), daemon=True)
            for i in range(count)
        ]
        for thread in self.threads:
            thread.start()
        self.started.wait(timeout=60)  # every stream has its first message

    def _read(self, client: Client, uid: str, index: int, max_tokens: int) -> None:
        messages = []
        try:
            stream = client.generate(uid, f"Stream {index}", max_tokens=max_tokens, ignore_eos=True)
            messages.append(next(stream))
            self.started.wait(timeout=60)
            messages.extend(stream)
            self.results[index] = messages
        except grpc.RpcError as error:
            self.results[index] = error

    def join(self, timeout: float) -> None:
        for thread in self.threads:
            thread.join(timeout)

    @property
    def finished(self) -> int:
        return sum(isinstance(result, list) for result in self.results)


def assert_complete(streams: Streams, max_tokens: int) -> None:
    for result in streams.results:
        assert isinstance(result, list), result
        assert result[-1].finish_reason == generate_pb2.FINISH_REASON_LENGTH
        assert sum(len(message.token_ids) for message in result) == max_tokens


def refused_while_draining(client: Client) -> grpc.RpcError | None:
    try:
        client.list_models()
    except grpc.RpcError as error:
        return error
    return None


def test_stop_drains_streams_then_frees_the_workers(start_server):
    server = start_server(shutdown_grace_s=60)
    client = Client(server.endpoint)
    model = client.launch(TINY, model_uid="draining")
    streams = Streams(client, "draining", 2, max_tokens=800)
    stopping = threading.Thread(target=server.stop, kwargs={"grace": 60}, daemon=True)
    stopping.start()

    health = health_pb2_grpc.HealthStub(client.channel)
    assert wait_until(lambda: refused_while_draining(client) is not None, timeout=10)
    error = refused_while_draining(client)
    assert error.code() == grpc.StatusCode.UNAVAILABLE and reason(error) == "SHUTTING_DOWN"
    if stopping.is_alive():  # still draining: health says so
        status = health.Check(health_pb2.HealthCheckRequest(service="llmgrpc.v1.GenerateService")).status
        assert status == NOT_SERVING
    assert streams.finished < 2 or not stopping.is_alive()

    stopping.join(timeout=60)
    streams.join(timeout=10)
    assert_complete(streams, 800)
    with pytest.raises(ProcessLookupError):
        os.kill(model.worker_pid, 0)  # the worker process is gone, and its memory with it
    client.close()


def test_sigterm_during_four_streams(tmp_path, cache_dir):
    grace = 40
    process = subprocess.Popen(
        [
            str(LLMGRPC),
            "serve",
            "--port",
            "0",
            "--launch",
            TINY,
            "--cache-dir",
            str(cache_dir),
            "--shutdown-grace-s",
            str(grace),
            "--log-format",
            "json",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    log_lines: list[str] = []
    endpoint: list[str] = []

    def read_log() -> None:
        for line in process.stderr:
            log_lines.append(line)
            found = re.search(r"llmgrpc listening on ([\w.]+:\d+)", line)
            if found:
                endpoint.append(found.group(1))

    threading.Thread(target=read_log, daemon=True).start()
    try:
        assert wait_until(lambda: bool(endpoint), timeout=60), "".join(log_lines)
        client = Client(endpoint[0])
        health = health_pb2_grpc.HealthStub(client.channel)

        def ready() -> bool:
            request = health_pb2.HealthCheckRequest(service="llmgrpc.v1.GenerateService")
            return health.Check(request).status == SERVING

        assert wait_until(ready, timeout=300), "".join(log_lines)
        worker_pid = client.get_model(TINY).worker_pid

        streams = Streams(client, TINY, 4, max_tokens=2000)
        signalled = time.monotonic()
        process.send_signal(signal.SIGTERM)

        assert wait_until(lambda: refused_while_draining(client) is not None, timeout=10)
        error = refused_while_draining(client)
        assert error.code() == grpc.StatusCode.UNAVAILABLE, error
        assert streams.finished < 4  # the streams were still going when new calls were refused

        assert process.wait(timeout=grace + 10) == 0, "".join(log_lines[-20:])
        assert time.monotonic() - signalled < grace
        streams.join(timeout=10)
        assert_complete(streams, 2000)
        assert not Path(f"/proc/{worker_pid}").exists()
        client.close()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
