"""Two llmgrpc servers behind one smg: cache-aware routing, and a model worker killed under load.

Each server (port 0) serves the tiny instruct model on Transformers under the same uid on its
main port, so smg registers both as workers of one model. Which server answered a request is
read from the servers themselves: each one's count of finished Generate requests of the model.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from itertools import count

import pytest
from conftest import RunningServer
from rpc_helpers import wait_until
from smg_gateway import Gateway, StreamInFlight

from llmgrpc.clients import Client
from llmgrpc.server.settings import Settings
from llmgrpc.v1 import models_pb2

INSTRUCT = "tiny-llama-3.1-instruct"
UID = "fleet"
CHAT = "/v1/chat/completions"

# Cache-aware routing made deterministic. smg follows each worker's KV events (SubscribeKvEvents):
# a prompt matching the blocks a worker has cached by more than --cache-threshold goes to that
# worker; any other goes to the least-loaded one (requests in flight through smg).
# - --cache-threshold 0.5: a shared system text of several hundred tokens matches well above it,
#   a different one only by the chat template's few header tokens.
# - --worker-warmup-secs 0, --worker-warmup-thin-ratio 0, --worker-warmup-divert-every 0: no
#   warm-up slice, which would send some misses, and one hit in eight, to a worker with a small tree.
# - The spill gate (--balance-abs-threshold 64, never under 4 in a small pool) cannot fire with
#   at most two requests in flight.
# - --health-failure-threshold 1 --health-success-threshold 1: one HealthCheck (every second)
#   takes a worker out of routing or puts it back.
POLICY = (
    "--cache-threshold",
    "0.5",
    "--worker-warmup-secs",
    "0",
    "--worker-warmup-thin-ratio",
    "0",
    "--worker-warmup-divert-every",
    "0",
    "--health-failure-threshold",
    "1",
    "--health-success-threshold",
    "1",
)
_topics = count()


def system_text(topic: str) -> str:
    """A system message of several hundred tokens, its own from the first word on."""
    return f"{topic}. " + " ".join(f"Rule {number} of {topic} is to be kept." for number in range(60))


def chat(system: str, question: str, **sampling) -> dict:
    messages = [{"role": "system", "content": system}, {"role": "user", "content": question}]
    return {"model": UID, "messages": messages, "max_tokens": 2, "temperature": 0, **sampling}


@pytest.fixture(scope="module")
def servers(cache_dir) -> Iterator[list[tuple[RunningServer, Client]]]:
    started = []
    try:
        for _ in range(2):
            server = RunningServer(
                Settings(
                    port=0, cache_dir=cache_dir, device="cpu", shutdown_grace_s=2, max_running_requests=4
                )
            )
            client = Client(server.endpoint)
            started.append((server, client))
            client.launch(INSTRUCT, model_format="pytorch", model_uid=UID, timeout=300)
        yield started
    finally:
        for server, client in started:
            client.close()
            server.stop()


@pytest.fixture
def gateway(servers) -> Iterator[Gateway]:
    """A new smg for each test: its prefix tree starts empty."""
    with Gateway([server.endpoint for server, _ in servers], *POLICY) as started:
        started.wait_serving(UID)
        assert wait_until(lambda: all(started.workers().values()) and len(started.workers()) == 2, 60)
        yield started


def finished(server: RunningServer) -> int:
    """The Generate requests of the model this server finished (cancelled ones left out)."""
    return int(
        sum(
            sample.value
            for metric in server.server.metrics.registry.collect()
            for sample in metric.samples
            if sample.name == "llmgrpc:request_success_total"
            and sample.labels["model_uid"] == UID
            and sample.labels["finished_reason"] in ("stop", "length")
        )
    )


def routed(servers, gateway: Gateway, system: str, questions: list[str]) -> list[int]:
    """Ask each question after system, one at a time: how many each server answered."""
    before = [finished(server) for server, _ in servers]
    for question in questions:
        assert gateway.post(CHAT, chat(system, question))["usage"]["prompt_tokens"] > 300

    def served() -> list[int]:
        return [finished(server) - was for (server, _), was in zip(servers, before, strict=True)]

    # A server counts a request once its answer is sent: the count may trail the HTTP answer.
    assert wait_until(lambda: sum(served()) >= len(questions), 10), served()
    return served()


def running(server: RunningServer) -> int:
    return server.engine_stats(UID).running_requests


def endless(system: str, question: str) -> dict:
    """A chat that does not end by itself: ignore_eos (vLLM's extension, which smg forwards; it
    does not forward logit_bias, so banning the end-of-text tokens would not reach the worker)."""
    return chat(system, question, max_tokens=15000, temperature=1.0, ignore_eos=True)


@contextmanager
def in_flight(gateway: Gateway, body: dict) -> Iterator[StreamInFlight]:
    """A streamed chat in flight through smg while the block runs; the client leaves after it."""
    stream = StreamInFlight(gateway, CHAT, body)
    try:
        stream.wait_started()
        yield stream
    finally:
        stream.leave()


def test_requests_sharing_a_long_prefix_go_to_one_server(servers, gateway):
    """Which server a different prefix then goes to is smg's load-balancing choice, not asserted."""
    questions = [f"Question {number}?" for number in range(6)]
    shared = system_text(f"Topic {next(_topics)}")
    first = routed(servers, gateway, shared, questions)
    assert sorted(first) == [0, len(questions)], first
    holder = first.index(len(questions))
    # Later requests with the same prefix still go where it is cached.
    assert routed(servers, gateway, shared, questions[:2])[holder] == 2


def test_a_killed_worker_fails_its_streams_and_smg_routes_around_it_until_it_is_back(servers, gateway):
    shared = system_text(f"Topic {next(_topics)}")
    # smg learns where the prefix is cached from the worker's KV events, which trail its answer:
    # a second request that follows the first shows smg knows, before the streams go.
    placed = routed(servers, gateway, shared, ["Where?", "And now?"])
    assert sorted(placed) == [0, 2], placed
    victim = placed.index(2)
    server, client = servers[victim]
    other_server, _ = servers[1 - victim]
    victim_url = f"grpc://{server.endpoint}"
    streams = [StreamInFlight(gateway, CHAT, endless(shared, f"Stream {n}")) for n in range(2)]
    for stream in streams:
        stream.wait_started()
    assert wait_until(lambda: running(server) == 2, 10)  # the shared prefix took them there too

    os.kill(client.get_model(UID).worker_pid, signal.SIGKILL)
    for stream in streams:
        stream.wait()
        # smg reports the lost worker as an error event, or cuts the stream short.
        assert stream.ending != "done" or any("error" in event for event in stream.events), stream.events[-3:]
        assert not any(choice.get("finish_reason") for e in stream.events for choice in e.get("choices", []))
    assert wait_until(lambda: client.get_model(UID).state == models_pb2.MODEL_STATE_FAILED, 30)

    # Once smg's health check sees the model FAILED, new requests go to the other server, even
    # those with the prefix the killed one held.
    assert wait_until(lambda: not gateway.workers()[victim_url], 30), gateway.workers()
    after = routed(servers, gateway, shared, ["Still there?", "And now?", "Anyone?"])
    assert after[1 - victim] == 3, after

    # The model relaunched under the same uid: smg routes to it again. New prefixes are misses, and
    # a miss goes to the least loaded worker, which is the relaunched one while a request is in
    # flight on the other.
    with in_flight(gateway, endless(system_text(f"Topic {next(_topics)}"), "Hold on.")) as holding:
        assert wait_until(lambda: running(other_server) == 1, 10), holding.events[-1:]
        client.terminate(UID)
        client.launch(INSTRUCT, model_format="pytorch", model_uid=UID, timeout=300)
        assert wait_until(lambda: gateway.workers()[victim_url], 30), gateway.workers()
        assert wait_until(
            lambda: routed(servers, gateway, system_text(f"Topic {next(_topics)}"), ["Back?"])[victim] == 1,
            timeout=30,
            interval=0,
        )
