"""The worker process: one launched model, served to the server over a Unix socket.

The server starts ``python -m llmgrpc.server.worker --socket PATH --plan JSON`` with the
engine's interpreter. The worker answers three RPCs of an internal service,
``llmgrpc.worker.Worker``: ``Load`` (streams progress, then the engine's stats),
``Generate`` (the public GenerateRequest/GenerateResponse messages), ``Stats``, and
``Download`` (fetch the weights only, for DownloadModel: progress, then their path).
Cancelling a Generate call closes the engine's stream, which aborts the request. The
worker exits when the server closes its standard input, so it never outlives the server.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict
from typing import Any

import grpc
from opentelemetry import trace

from llmgrpc.clients.errors import FailedPrecondition, Reason, Unavailable
from llmgrpc.engines import weights
from llmgrpc.engines.base import Engine, GenerationRequest, LoadPlan, ProgressReport
from llmgrpc.engines.catalogue import engine_info, load_plugins_from_environment
from llmgrpc.server import logs, tracing
from llmgrpc.server.status import grpc_errors
from llmgrpc.v1 import generate_pb2

SERVICE = "llmgrpc.worker.Worker"
REQUEST_ID_METADATA = "x-request-id"

log = logging.getLogger("llmgrpc.worker")


def encode_json(message: dict) -> bytes:
    return json.dumps(message).encode()


def decode_json(data: bytes) -> dict:
    return json.loads(data)


class Worker:
    """Holds the one engine of this process and serves the internal RPCs."""

    def __init__(self, plan: LoadPlan, tracer: trace.Tracer | None = None):
        self.plan = plan
        self.engine: Engine | None = None
        self.tracer = tracer or trace.NoOpTracer()

    @grpc_errors
    async def Load(self, request: dict, context: grpc.aio.ServicerContext):
        _adopt_request_id(context)
        if self.engine is not None:
            yield {"stats": asdict(self.engine.stats())}
            return

        def load(report: ProgressReport) -> Engine:
            engine_class = engine_info(self.plan.engine).load_class()
            return engine_class.load(self.plan, weights.resolve(self.plan, report), report)

        loading = _Reporting(load)
        async for event in loading.events():
            yield event
        self.engine = loading.result
        yield {"stats": asdict(self.engine.stats())}

    @grpc_errors
    async def Download(self, request: dict, context: grpc.aio.ServicerContext):
        """Fetch the plan's weights without loading an engine: progress, then {"path": ...}."""
        _adopt_request_id(context)
        downloading = _Reporting(lambda report: weights.resolve(self.plan, report))
        async for event in downloading.events():
            yield event
        yield {"path": downloading.result}

    @grpc_errors
    async def Generate(self, request: generate_pb2.GenerateRequest, context: grpc.aio.ServicerContext):
        if self.engine is None:
            raise FailedPrecondition("the model is not loaded yet", reason=Reason.MODEL_LOADING)
        request_id = _adopt_request_id(context, fallback=uuid.uuid4().hex)
        metadata = context.invocation_metadata() or ()
        generation = GenerationRequest.from_pb(request, request_id)
        # The engine's part of the request's trace: a child of the server's call to this worker.
        with tracing.current_span(
            self.tracer,
            "engine.generate",
            context=tracing.extract(metadata),
            kind=trace.SpanKind.SERVER,
            attributes={
                "llmgrpc.request_id": request_id,
                "llmgrpc.model_uid": self.plan.model_uid,
                "llmgrpc.engine": self.plan.engine,
            },
        ) as span:
            generated = 0
            async with contextlib.aclosing(self.engine.generate(generation)) as chunks:
                async for chunk in chunks:
                    generated += len(chunk.token_ids)
                    yield chunk.to_pb()
            span.set_attribute("llmgrpc.generated_tokens", generated)

    @grpc_errors
    async def Stats(self, request: dict, context: grpc.aio.ServicerContext) -> dict:
        _adopt_request_id(context)
        if self.engine is None:
            raise Unavailable("the model is not loaded yet", reason=Reason.MODEL_LOADING)
        return asdict(self.engine.stats())

    def handlers(self) -> grpc.GenericRpcHandler:
        return grpc.method_handlers_generic_handler(
            SERVICE,
            {
                "Load": grpc.unary_stream_rpc_method_handler(
                    self.Load, request_deserializer=decode_json, response_serializer=encode_json
                ),
                "Generate": grpc.unary_stream_rpc_method_handler(
                    self.Generate,
                    request_deserializer=generate_pb2.GenerateRequest.FromString,
                    response_serializer=generate_pb2.GenerateResponse.SerializeToString,
                ),
                "Download": grpc.unary_stream_rpc_method_handler(
                    self.Download, request_deserializer=decode_json, response_serializer=encode_json
                ),
                "Stats": grpc.unary_unary_rpc_method_handler(
                    self.Stats, request_deserializer=decode_json, response_serializer=encode_json
                ),
            },
        )


def _adopt_request_id(context: grpc.aio.ServicerContext, fallback: str = "") -> str:
    """The server's request id for this call (fallback when it sent none), set for every log line of it.

    Set before anything can fail: grpc_errors logs an unexpected error in this context, and
    the threads a call starts (asyncio.to_thread) copy it, so the traceback of a failed load
    carries the id of the server's call that asked for it.
    """
    metadata = context.invocation_metadata() or ()
    sent = next((v for k, v in metadata if k == REQUEST_ID_METADATA and isinstance(v, str)), "")
    request_id = sent or fallback
    logs.REQUEST_ID.set(request_id)
    return request_id


class _Reporting:
    """Runs work(report) in a thread; events() yields its progress reports until it ends."""

    def __init__(self, work: Callable[[ProgressReport], Any]):
        self.work = work
        self.result: Any = None

    async def events(self) -> AsyncIterator[dict]:
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[dict] = asyncio.Queue()

        def report(phase: str, done: int, total: int) -> None:
            loop.call_soon_threadsafe(events.put_nowait, {"phase": phase, "done": done, "total": total})

        running = asyncio.ensure_future(asyncio.to_thread(self.work, report))
        while not running.done():
            next_event = asyncio.ensure_future(events.get())
            await asyncio.wait({running, next_event}, return_when=asyncio.FIRST_COMPLETED)
            if next_event.done():
                yield next_event.result()
            else:
                next_event.cancel()
        while not events.empty():  # reported just before the work ended
            yield events.get_nowait()
        self.result = running.result()


# How long an orderly exit (the engine closing) may take before the worker is ended anyway.
EXIT_GRACE_S = 15.0


def exit_when_server_goes(shut_down: Callable[[], None]) -> None:
    """When standard input closes (the server stopped us, or died), shut down in order:
    shut_down() stops serving, and the engine closes, taking with it any processes its
    library started (vLLM's engine core and workers). If that has not ended the process
    within EXIT_GRACE_S, end it and whatever is left of its process group."""

    def watch() -> None:
        sys.stdin.buffer.read()
        shut_down()
        time.sleep(EXIT_GRACE_S)
        if os.getpgrp() == os.getpid():  # the server started us as a group of our own
            os.killpg(os.getpid(), signal.SIGKILL)
        os._exit(0)

    threading.Thread(target=watch, name="server-lifeline", daemon=True).start()


async def run(socket_path: str, plan: LoadPlan, tracer_provider: trace.TracerProvider | None = None) -> None:
    provider = tracer_provider or trace.NoOpTracerProvider()
    worker = Worker(plan, provider.get_tracer(tracing.TRACER_NAME))
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((worker.handlers(),))
    server.add_insecure_port(f"unix:{socket_path}")
    await server.start()
    loop = asyncio.get_running_loop()
    exit_when_server_goes(lambda: asyncio.run_coroutine_threadsafe(server.stop(grace=None), loop))
    try:
        await server.wait_for_termination()
    finally:
        if worker.engine is not None:
            worker.engine.close()
        tracing.shutdown(provider)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--socket", required=True, help="Unix socket path to serve on")
    parser.add_argument("--plan", required=True, help="the LoadPlan, as JSON")
    args = parser.parse_args(argv)
    plan = LoadPlan.from_json_dict(json.loads(args.plan))
    # The server passes its log and trace settings in the environment (worker_client.worker_environment).
    logs.configure(os.environ.get("LLMGRPC_LOG_LEVEL", "INFO"), os.environ.get("LLMGRPC_LOG_FORMAT", "text"))
    logging.getLogger().handlers[0].addFilter(_WorkerFields(plan.model_uid))
    provider = tracing.tracer_provider(
        os.environ.get("LLMGRPC_TRACE_EXPORTER", "none"), service_name="llmgrpc-worker"
    )
    load_plugins_from_environment()
    asyncio.run(run(args.socket, plan, provider))


class _WorkerFields(logging.Filter):
    """Marks a worker's log lines with its model, so they can be told from the server's."""

    def __init__(self, model_uid: str):
        super().__init__()
        self.model_uid = model_uid

    def filter(self, record: logging.LogRecord) -> bool:
        record.worker = self.model_uid
        return True


if __name__ == "__main__":
    main()
