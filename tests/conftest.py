"""Fixtures: a real llmgrpc server in-process on port 0, and the tiny model launched on it."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from llmgrpc.clients import Client
from llmgrpc.server.app import LlmgrpcServer, create_server
from llmgrpc.server.settings import Settings

TINY = "tiny-llama-3.1"


class RunningServer:
    """An llmgrpc server on its own event loop in a background thread."""

    def __init__(self, settings: Settings):
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="test-server", daemon=True)
        self._thread.start()
        self.server: LlmgrpcServer
        self.server, self.port = self.call(create_server("127.0.0.1:0", settings))
        self.call(self.server.start())
        self.endpoint = f"127.0.0.1:{self.port}"

    def call(self, coroutine, timeout: float = 120.0):
        """Run a coroutine on the server's loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def stop(self, grace: float = 1.0) -> None:
        self.call(self.server.stop(grace))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=30)


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("model-cache")


@pytest.fixture(scope="session")
def settings(cache_dir: Path) -> Settings:
    # The session's models run on the CPU everywhere; tests for the GPU ask for "cuda" themselves.
    return Settings(
        port=0,
        cache_dir=cache_dir,
        device="cpu",
        max_running_requests=8,
        max_waiting_requests=4,
        shutdown_grace_s=2,
    )


@pytest.fixture(scope="session")
def running_server(settings: Settings) -> Iterator[RunningServer]:
    server = RunningServer(settings)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def client(running_server: RunningServer) -> Iterator[Client]:
    with Client(running_server.endpoint) as client:
        yield client


@pytest.fixture(scope="session")
def tiny(client: Client):
    """The tiny model, launched once for the session under uid 'tiny'."""
    return client.launch(TINY, model_uid="tiny", timeout=300)


@pytest.fixture(scope="session")
def tiny_files(tiny, cache_dir: Path) -> Path:
    """Where the server generated the tiny model's files."""
    return cache_dir / TINY / "pytorch"
