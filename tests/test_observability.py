"""Metrics, traces and logs of a real server: what an operator watching it would see."""

from __future__ import annotations

import asyncio
import functools
import io
import json
import logging

import grpc
import pytest
from conftest import TINY, RunningServer
from doubles import CountingRunner
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from rpc_helpers import scrape, value
from test_lifecycle import wait_until

from llmgrpc.clients import Client
from llmgrpc.engines.base import LoadPlan, SpecRef
from llmgrpc.engines.batched_engine import BatchedEngine
from llmgrpc.server import generate_socket, logs, tracing
from llmgrpc.server.settings import Settings
from llmgrpc.v1 import generate_pb2, models_pb2
from llmgrpc.worker import generate_socket as worker_socket
from llmgrpc.worker.service import Worker
from llmgrpc.worker.v1 import worker_pb2

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
TRACEPARENT = f"00-{TRACE_ID}-00f067aa0ba902b7-01"


@pytest.fixture(scope="module")
def spans() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture(scope="module")
def observed(cache_dir, spans):
    """A server with /metrics on a free port, spans kept in memory, and the tiny model."""
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(spans))
    server = RunningServer(Settings(port=0, cache_dir=cache_dir, metrics_port=0), tracer_provider=provider)
    client = Client(server.endpoint)
    client.launch(TINY, model_uid="watched", timeout=300)
    yield server, client
    client.close()
    server.stop()


def test_metrics_reflect_a_generation(observed):
    server, client = observed
    before = scrape(server.server.metrics_port)
    messages = list(client.generate("watched", "Hello there", max_tokens=8, ignore_eos=True, temperature=0))
    usage = messages[-1].usage
    after = scrape(server.server.metrics_port)

    def moved(name: str, **labels) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    uid = {"model_uid": "watched"}
    assert moved("llmgrpc:generation_tokens_total", **uid) == 8
    assert moved("llmgrpc:prompt_tokens_total", **uid) == usage.prompt_tokens > 0
    assert moved("llmgrpc:time_to_first_token_seconds_count", **uid) == 1
    assert moved("llmgrpc:inter_token_latency_seconds_count", **uid) == 7
    assert moved("llmgrpc:e2e_request_latency_seconds_count", **uid) == 1
    assert moved("llmgrpc:request_queue_time_seconds_count", **uid) == 1
    assert moved("llmgrpc:request_success_total", finished_reason="length", **uid) == 1
    assert moved("llmgrpc:e2e_request_latency_seconds_sum", **uid) > 0
    assert (
        moved(
            "llmgrpc:rpc_requests_total", service="llmgrpc.v1.GenerateService", method="Generate", code="OK"
        )
        == 1
    )
    # Per-model gauges, read from the manager when scraped.
    assert value(after, "llmgrpc:num_requests_running", **uid) == 0
    assert value(after, "llmgrpc:num_requests_waiting", **uid) == 0
    assert value(after, "llmgrpc:model_memory_bytes", kind="rss", **uid) > 0
    assert value(after, "llmgrpc:model_load_time_seconds_count", model_name=TINY) >= 1
    assert value(after, "process_resident_memory_bytes") > 0


def test_failed_calls_are_counted_by_code(observed):
    server, client = observed
    before = scrape(server.server.metrics_port)
    with pytest.raises(grpc.RpcError):
        client.get_model("nobody")
    labels = {"service": "llmgrpc.v1.ModelService", "method": "GetModel", "code": "NOT_FOUND"}
    counted = value(before, "llmgrpc:rpc_requests_total", **labels) + 1
    # A refused call's status reaches the caller before the server has counted it.
    assert wait_until(
        lambda: value(scrape(server.server.metrics_port), "llmgrpc:rpc_requests_total", **labels) == counted,
        timeout=5,
    )


def test_a_trace_follows_the_request_with_the_callers_trace_id(observed, spans):
    server, client = observed
    spans.clear()
    list(client.generate("watched", "Hi", max_tokens=3, metadata=(("traceparent", TRACEPARENT),)))
    finished = [s for s in spans.get_finished_spans() if format(s.context.trace_id, "032x") == TRACE_ID]
    by_name = {s.name: s for s in finished}
    rpc = by_name["llmgrpc.v1.GenerateService/Generate"]
    assert rpc.kind == SpanKind.SERVER
    assert format(rpc.parent.span_id, "016x") == "00f067aa0ba902b7"
    assert rpc.attributes["rpc.grpc.status_code"] == 0
    hop = by_name["llmgrpc.worker.v1/Generate"]
    assert hop.kind == SpanKind.CLIENT and hop.parent.span_id == rpc.context.span_id


def test_every_rpc_returns_its_request_id(observed):
    server, client = observed
    call = client.models.ListModels.with_call(
        models_pb2.ListModelsRequest(), metadata=(("x-request-id", "caller-chosen-42"),)
    )
    assert ("x-request-id", "caller-chosen-42") in call[1].initial_metadata()
    stream = client.generate("watched", "Hi", max_tokens=2)
    generated_id = dict(stream.initial_metadata())["x-request-id"]
    list(stream)
    assert len(generated_id) == 32
    # An id that is not plain text is replaced, not echoed.
    for odd in ("a b;c", "x" * 300):
        stream = client.generate("watched", "Hi", max_tokens=1, metadata=(("x-request-id", odd),))
        assert len(dict(stream.initial_metadata())["x-request-id"]) == 32
        list(stream)


def test_logs_are_json_lines_with_the_request_id(observed):
    server, client = observed
    stream = io.StringIO()
    handler = logs.handler("json", stream)
    logger = logging.getLogger("llmgrpc")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        list(client.generate("watched", "Hi", max_tokens=1, metadata=(("x-request-id", "log-me-7"),)))
        with pytest.raises(grpc.RpcError):
            client.get_model("absent")
        # A refused call's status reaches the caller before the server has logged it.
        assert wait_until(lambda: "GetModel" in stream.getvalue(), timeout=5)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    generate = next(line for line in lines if line.get("rpc") == "/llmgrpc.v1.GenerateService/Generate")
    assert generate["request_id"] == "log-me-7"
    assert generate["code"] == "OK" and generate["level"] == "INFO" and "duration_ms" in generate
    failed = next(line for line in lines if line.get("rpc") == "/llmgrpc.v1.ModelService/GetModel")
    assert failed["code"] == "NOT_FOUND" and len(failed["request_id"]) == 32


def test_each_generation_of_a_call_takes_the_calls_request_id_and_its_index():
    """One channel for request ids: what a call's generations read (and send to the worker) is
    the context's id; each generation's task adopts its own part, leaving the call's as it was."""

    async def call() -> tuple[str, list[str], str]:
        logs.adopt_request_id("call-9")

        async def generation(index: int) -> str:
            logs.adopt_part_id(index)
            await asyncio.sleep(0)  # the others run meanwhile, each in its own context
            return logs.request_id()

        parts = await asyncio.gather(*(asyncio.ensure_future(generation(index)) for index in range(3)))
        return logs.request_id(), parts, logs.adopt_request_id("bad id\nforged: line")

    call_id, parts, refused = asyncio.run(call())
    assert call_id == "call-9"
    assert parts == ["call-9.0", "call-9.1", "call-9.2"]
    assert refused != "bad id\nforged: line" and len(refused) == 32


class _CountingEngine(BatchedEngine):
    @classmethod
    def load(cls, plan, weights, report):
        raise NotImplementedError


def test_a_stream_its_caller_cancels_is_counted_and_traced_as_cancelled(observed, spans):
    """gRPC sets no status code on a call its caller left: the server's own records must still
    say CANCELLED, not OK."""
    server, client = observed
    spans.clear()
    labels = {"service": "llmgrpc.v1.GenerateService", "method": "Generate", "code": "CANCELLED"}
    counted = value(scrape(server.server.metrics_port), "llmgrpc:rpc_requests_total", **labels) + 1
    stream = client.generate("watched", "Tell me a long story", max_tokens=400, ignore_eos=True)
    next(stream)
    stream.cancel()
    assert wait_until(
        lambda: value(scrape(server.server.metrics_port), "llmgrpc:rpc_requests_total", **labels) == counted
    )
    (call,) = [s for s in spans.get_finished_spans() if s.name.endswith("GenerateService/Generate")]
    assert call.attributes["rpc.grpc.status_code"] == grpc.StatusCode.CANCELLED.value[0]


def test_a_response_stream_closed_from_another_task_ends_its_span_quietly(caplog):
    """What the event loop does with a stream its caller left: the generator was advanced in the
    call's task, and is closed later from a task of its own (another context)."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("test")

    async def responses():
        with tracing.current_span(tracer, "stream"):
            yield 1
            yield 2

    async def scenario() -> None:
        stream = responses()

        async def first():
            return await stream.__anext__()

        assert await asyncio.create_task(first()) == 1
        await asyncio.create_task(stream.aclose())

    with caplog.at_level(logging.WARNING):
        asyncio.run(scenario())
    assert [span.name for span in exporter.get_finished_spans()] == ["stream"]
    assert [r.getMessage() for r in caplog.records if r.name.startswith("opentelemetry")] == []


def test_the_worker_opens_a_span_around_the_engine_continuing_the_trace(tmp_path):
    """The worker side of the trace, in-process: the engine span is a child of the caller's context."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    plan = LoadPlan(
        model_uid="counting",
        engine="Transformers",
        spec=SpecRef("m", "pytorch", "1", "none", "m"),
        device="cpu",
        cache_dir=str(tmp_path),
        max_batch_size=4,
    )

    async def scenario() -> list[generate_pb2.GenerateResponse]:
        worker = Worker(plan, provider.get_tracer("test"))
        worker.engine = _CountingEngine(CountingRunner(), 4, "cpu")
        socket = tmp_path / "generate.sock"
        serve = functools.partial(worker_socket.serve, worker.generate)
        server = await asyncio.start_unix_server(serve, socket)
        try:
            request = worker_pb2.GenerateRequest(
                request=generate_pb2.GenerateRequest(model_uid="counting", prompt="abc", max_tokens=4),
                request_id="worker-span-1",
                trace_context={"traceparent": TRACEPARENT},
            )
            return [piece async for piece in generate_socket.Streams(socket).stream(request, None)]
        finally:
            server.close()
            worker.engine.close()

    responses = asyncio.run(scenario())
    assert sum(len(r.token_ids) for r in responses) == 4
    (span,) = exporter.get_finished_spans()
    assert span.name == "engine.generate"
    assert format(span.context.trace_id, "032x") == TRACE_ID
    assert format(span.parent.span_id, "016x") == "00f067aa0ba902b7"
    assert span.attributes["llmgrpc.request_id"] == "worker-span-1"
    assert span.attributes["llmgrpc.generated_tokens"] == 4
