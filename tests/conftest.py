"""Fixtures: a real llmgrpc server in-process on port 0, and the tiny model launched on it."""

from __future__ import annotations

import asyncio
import json
import os
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from gated_engine import FAMILY as GATED_FAMILY
from hypothesis import HealthCheck
from hypothesis import settings as hypothesis_settings

from llmgrpc.clients import Client
from llmgrpc.server.app import LlmgrpcServer, create_server
from llmgrpc.server.settings import Settings
from llmgrpc.worker.v1 import worker_pb2

TINY = "tiny-llama-3.1"
TESTS = Path(__file__).parent

# gguf_f32 and model_uid: the tiny model on both batching engines, for the files that test a
# request field on each.
pytest_plugins = ["engine_pair"]

# The robustness suite's budget: "ci" (default) keeps the run to a few thousand cases in
# well under two minutes; HYPOTHESIS_PROFILE=thorough runs ten times as many.
_HYPOTHESIS = {"deadline": None, "database": None, "suppress_health_check": list(HealthCheck)}
hypothesis_settings.register_profile("ci", max_examples=400, **_HYPOTHESIS)
hypothesis_settings.register_profile("thorough", max_examples=4000, **_HYPOTHESIS)
hypothesis_settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


class RunningServer:
    """An llmgrpc server on its own event loop in a background thread."""

    def __init__(self, settings: Settings, tracer_provider=None):
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="test-server", daemon=True)
        self._thread.start()
        self.server: LlmgrpcServer
        self.server, self.port = self.call(
            create_server("127.0.0.1:0", settings, tracer_provider=tracer_provider)
        )
        self.call(self.server.start())
        self.endpoint = f"127.0.0.1:{self.port}"

    def call(self, coroutine, timeout: float = 120.0):
        """Run a coroutine on the server's loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def engine_stats(self, model_uid: str) -> worker_pb2.EngineStats:
        """What the model's engine reports about itself, read from its worker now (GetModel's
        running_requests is the server's own count; this is the engine's)."""
        worker = self.server.manager.get(model_uid).worker
        assert worker is not None, f"{model_uid} has no worker"
        return self.call(worker.stats(timeout=30))

    def stop(self, grace: float = 1.0) -> None:
        if not self._thread.is_alive():
            return
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


@pytest.fixture
def start_server(cache_dir: Path):
    """Start servers with other settings for one test: start_server(**settings) -> RunningServer."""
    started: list[RunningServer] = []

    def start(tracer_provider=None, **overrides) -> RunningServer:
        fields = {"port": 0, "cache_dir": cache_dir, "shutdown_grace_s": 2, **overrides}
        server = RunningServer(Settings(**fields), tracer_provider=tracer_provider)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture
def gated_server(start_server, tmp_path, monkeypatch):
    """start(**settings) -> a server whose families include gated-model, served by the Gated double."""
    monkeypatch.setenv("PYTHONPATH", str(TESTS))  # the probe and the workers import the plugin
    (tmp_path / "gated-model.json").write_text(json.dumps(GATED_FAMILY))

    def start(**overrides):
        return start_server(
            device="cpu", engine_plugins=["gated_engine:ENGINE_INFO"], families_dir=tmp_path, **overrides
        )

    return start


_TALLY = pytest.StashKey[Counter]()


@pytest.fixture(scope="session")
def robustness_tally(request) -> Counter:
    """(rpc, status code) -> generated requests answered so; summed up at the end of the run."""
    return request.config.stash.setdefault(_TALLY, Counter())


def pytest_terminal_summary(terminalreporter, config) -> None:
    tally = config.stash.get(_TALLY, None)
    if tally:
        codes = Counter()
        for (_, code), count in tally.items():
            codes[code] += count
        terminalreporter.write_line(
            f"robustness: {sum(tally.values())} generated requests answered; by status: "
            + ", ".join(f"{code} {count}" for code, count in codes.most_common())
        )
        if config.getoption("verbose") > 0:
            for (rpc, code), count in sorted(tally.items()):
                terminalreporter.write_line(f"  {rpc:<24} {code:<20} {count}")
