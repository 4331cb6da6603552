"""The Shepherd Model Gateway (the real `smg` binary) as a process in front of llmgrpc servers.

``Gateway`` starts ``smg launch --backend vllm`` with the given worker listeners, waits until
it lists the model, and speaks OpenAI's HTTP API to it (plain ``http.client``: no client
library between the test and the gateway). ``StreamInFlight`` reads a streamed answer in the
background. ``engine_stub`` is a direct client of a worker's ``vllm.grpc.engine.VllmEngine``,
for what the gateway does not show.
"""

from __future__ import annotations

import http.client
import json
import socket
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
from rpc_helpers import wait_until
from smg_grpc_proto.generated import vllm_engine_pb2 as pb
from smg_grpc_proto.generated import vllm_engine_pb2_grpc as pb_grpc


def smg_binary() -> str:
    """The smg executable of this environment (the dev extra installs it)."""
    import shutil
    import sys

    found = Path(sys.executable).parent / "smg"
    return str(found) if found.exists() else (shutil.which("smg") or "smg")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def engine_stub(endpoint: str) -> pb_grpc.VllmEngineStub:
    return pb_grpc.VllmEngineStub(grpc.insecure_channel(endpoint))


def healthy(endpoint: str) -> pb.HealthCheckResponse:
    return engine_stub(endpoint).HealthCheck(pb.HealthCheckRequest(), timeout=10)


class Gateway:
    """smg in front of worker endpoints ("host:port" of the engine contract); a context manager."""

    def __init__(self, workers: list[str], *extra: str, policy: str = "cache_aware"):
        self.port = free_port()
        self.prometheus_port = free_port()
        command = [
            smg_binary(),
            "launch",
            "--backend",
            "vllm",
            "--worker-urls",
            *(f"grpc://{worker}" for worker in workers),
            "--tool-call-parser",
            "llama",
            "--policy",
            policy,
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--prometheus-port",
            str(self.prometheus_port),
            "--health-check-interval-secs",
            "1",
            *extra,
        ]
        self.process = subprocess.Popen(
            command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, errors="replace"
        )
        self.log_lines: list[str] = []
        threading.Thread(target=self._read_log, daemon=True).start()

    def _read_log(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.log_lines.append(line)

    def log(self, last: int = 30) -> str:
        return "".join(self.log_lines[-last:])

    def models(self) -> list[str]:
        try:
            status, body = self.request("GET", "/v1/models")
        except OSError:
            return []
        return [model["id"] for model in body.get("data", [])] if status == 200 else []

    def wait_serving(self, model: str, timeout: float = 60) -> None:
        assert wait_until(lambda: model in self.models(), timeout=timeout, interval=0.2), self.log()

    def _connection(self, timeout: float) -> http.client.HTTPConnection:
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)

    def request(self, method: str, path: str, body: dict | None = None, timeout: float = 120):
        """(status, parsed JSON body) of one HTTP call."""
        connection = self._connection(timeout)
        try:
            payload = json.dumps(body) if body is not None else None
            connection.request(method, path, payload, {"content-type": "application/json"})
            response = connection.getresponse()
            data = response.read()
            return response.status, json.loads(data) if data else {}
        finally:
            connection.close()

    def post(self, path: str, body: dict, timeout: float = 120) -> dict:
        status, answer = self.request("POST", path, body, timeout)
        assert status == 200, (status, answer, self.log())
        return answer

    def stream(self, path: str, body: dict, timeout: float = 120) -> Iterator[dict]:
        """The events of a streamed answer (SSE), parsed; stops at [DONE], and raises when the
        stream ends without it. Closing the iterator closes the connection (the client leaves)."""
        connection = self._connection(timeout)
        try:
            connection.request(
                "POST", path, json.dumps({**body, "stream": True}), {"content-type": "application/json"}
            )
            response = connection.getresponse()
            assert response.status == 200, (response.status, response.read())
            for raw in response:
                line = raw.decode().strip()
                if not line.startswith("data:"):
                    continue
                data = line.removeprefix("data:").strip()
                if data == "[DONE]":
                    return
                yield json.loads(data)
            raise ConnectionError("the stream ended without [DONE]")
        finally:
            connection.close()

    def workers(self) -> dict[str, bool]:
        """Whether smg routes to each of its workers now: its URL -> healthy."""
        status, body = self.request("GET", "/workers", timeout=10)
        assert status == 200, (status, body)
        return {worker["url"]: worker["is_healthy"] for worker in body["workers"]}

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def __enter__(self) -> Gateway:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class StreamInFlight:
    """A streamed answer read in a background thread as it comes (a reader that stops would hold
    the worker back): its events, and how it ended ("done" at [DONE], else the error)."""

    def __init__(self, gateway: Gateway, path: str, body: dict):
        self.events: list[dict] = []
        self.ending: str | Exception | None = None
        self.started = threading.Event()  # the first event came, or the stream ended
        self._leaving = threading.Event()
        self._thread = threading.Thread(target=self._read, args=(gateway, path, body), daemon=True)
        self._thread.start()

    def _read(self, gateway: Gateway, path: str, body: dict) -> None:
        events = gateway.stream(path, body)
        try:
            for event in events:
                self.events.append(event)
                self.started.set()
                if self._leaving.is_set():
                    self.ending = "left"
                    return
            self.ending = "done"
        except Exception as error:  # the test reads it
            self.ending = error
        finally:
            events.close()
            self.started.set()

    def wait_started(self, timeout: float = 60) -> None:
        assert self.started.wait(timeout) and self.events, self.ending

    def wait(self, timeout: float = 60) -> StreamInFlight:
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "the stream did not end"
        return self

    def leave(self) -> None:
        """The client leaves: the connection closes at the next event."""
        self._leaving.set()
        self.wait()
