"""The worker process's service: one launched model, served to the server over a Unix socket.

The server starts ``python -m llmgrpc.worker --socket PATH --generate-socket PATH
--plan JSON`` with the engine's interpreter. The worker serves the internal API of
protos/llmgrpc/worker/v1, ``llmgrpc.worker.v1.WorkerService``, on the first socket:
``Load`` (progress, then the engine's stats), ``Stats``, ``CallModel`` (the public calls a
model answers, such as Tokenize: llmgrpc.worker.model_calls), and ``Download`` (fetch the
weights only, for DownloadModel: progress, then their path). Generate streams (a resolved
request with the caller's deadline) come on the second socket
(``llmgrpc.worker.generate_socket``); the server closing one closes the engine's stream, which
aborts the request. The worker exits when the server closes its standard input, so it never
outlives the server.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict
from typing import Any

import grpc
from opentelemetry import trace

from llmgrpc.clients.errors import FailedPrecondition, Reason, Unavailable, Unimplemented
from llmgrpc.engines import model_facts, weights
from llmgrpc.engines.base import Engine, EngineStats, GenerationRequest, LoadPlan, ProgressReport
from llmgrpc.engines.catalogue import engine_info, load_plugins_from_environment
from llmgrpc.engines.cpu_threads import on_a_thread_of_its_own
from llmgrpc.engines.lora import LoraModule
from llmgrpc.engines.weights.adapters import resolve_adapter
from llmgrpc.server import logs, tracing
from llmgrpc.server.status import grpc_errors
from llmgrpc.v1 import models_pb2
from llmgrpc.worker import frames, generate_socket, kv_events, model_calls
from llmgrpc.worker.v1 import worker_pb2, worker_pb2_grpc

log = logging.getLogger("llmgrpc.worker")


def stats_to_pb(stats: EngineStats) -> worker_pb2.EngineStats:
    return worker_pb2.EngineStats(**asdict(stats))


class Worker(worker_pb2_grpc.WorkerServiceServicer):
    """Holds the one engine of this process and serves the internal RPCs."""

    def __init__(self, plan: LoadPlan, tracer: trace.Tracer | None = None):
        self.plan = plan
        self.engine: Engine | None = None
        self.weights_path = ""  # what the engine loaded: a folder or a file
        self._description: worker_pb2.DescribeResponse | None = None
        self.tracer = tracer or trace.NoOpTracer()

    @grpc_errors
    async def Load(
        self, request: worker_pb2.LoadRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[worker_pb2.LoadResponse]:
        if self.engine is None:

            def load(report: ProgressReport) -> Engine:
                engine_class = engine_info(self.plan.engine).load_class()
                self.weights_path = weights.resolve(self.plan, report)
                engine = engine_class.load(self.plan, self.weights_path, report)
                try:
                    for module in self.plan.lora_modules:
                        self._load_adapter(engine, LoraModule(**module), report)
                except BaseException:
                    engine.close()
                    raise
                return engine

            loading = _Reporting(load)
            async for progress in loading.events():
                yield worker_pb2.LoadResponse(progress=progress)
            self.engine = loading.result
        assert self.engine is not None
        yield worker_pb2.LoadResponse(stats=stats_to_pb(self.engine.stats()))

    @grpc_errors
    async def Download(
        self, request: worker_pb2.DownloadRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[worker_pb2.DownloadResponse]:
        downloading = _Reporting(lambda report: weights.resolve(self.plan, report))
        async for progress in downloading.events():
            yield worker_pb2.DownloadResponse(progress=progress)
        yield worker_pb2.DownloadResponse(model_path=downloading.result)

    async def generate(self, request: worker_pb2.GenerateRequest) -> AsyncIterator[worker_pb2.GenerateFrame]:
        """The engine's pieces for one request of the Generate socket (generate_socket.serve),
        each written straight into the frame that carries it."""
        if self.engine is None:
            raise FailedPrecondition("the model is not loaded yet", reason=Reason.MODEL_LOADING)
        request_id = logs.request_id()  # the server's, which generate_socket.serve set
        deadline = frames.deadline_of(request)
        generation = GenerationRequest.from_pb(
            request.request, request_id, deadline, default_max_tokens=self.plan.default_max_tokens
        )
        # The engine's part of the request's trace: a child of the server's hop to this worker.
        with tracing.current_span(
            self.tracer,
            "engine.generate",
            context=tracing.extract(request.trace_context.items()),
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
                    frame = worker_pb2.GenerateFrame()
                    chunk.to_pb(into=frame.response)
                    yield frame
            span.set_attribute("llmgrpc.generated_tokens", generated)

    @grpc_errors
    async def Stats(
        self, request: worker_pb2.StatsRequest, context: grpc.aio.ServicerContext
    ) -> worker_pb2.StatsResponse:
        if self.engine is None:
            raise Unavailable("the model is not loaded yet", reason=Reason.MODEL_LOADING)
        return worker_pb2.StatsResponse(stats=stats_to_pb(self.engine.stats()))

    @grpc_errors
    async def CallModel(
        self, request: worker_pb2.CallModelRequest, context: grpc.aio.ServicerContext
    ) -> worker_pb2.CallModelResponse:
        answer = await model_calls.answer(self._loaded(), request.request)
        return worker_pb2.CallModelResponse(response=answer)

    @grpc_errors
    async def Describe(
        self, request: worker_pb2.DescribeRequest, context: grpc.aio.ServicerContext
    ) -> worker_pb2.DescribeResponse:
        engine = self._loaded()
        if self._description is None:
            facts = await asyncio.to_thread(
                model_facts.describe, self.weights_path, self.plan.cache_dir, engine
            )
            self._description = worker_pb2.DescribeResponse(**asdict(facts))
        return self._description

    @grpc_errors
    async def LoadAdapter(
        self, request: worker_pb2.LoadAdapterRequest, context: grpc.aio.ServicerContext
    ) -> worker_pb2.LoadAdapterResponse:
        engine = self._loaded()
        module = LoraModule.from_pb(request.adapter)
        rank = await on_a_thread_of_its_own(self._load_adapter, engine, module, _no_report)
        return worker_pb2.LoadAdapterResponse(rank=rank)

    @grpc_errors
    async def UnloadAdapter(
        self, request: worker_pb2.UnloadAdapterRequest, context: grpc.aio.ServicerContext
    ) -> worker_pb2.UnloadAdapterResponse:
        await asyncio.to_thread(self._loaded().unload_adapter, request.name)
        return worker_pb2.UnloadAdapterResponse()

    def _load_adapter(self, engine: Engine, module: LoraModule, report: ProgressReport) -> int:
        """Fetch (a hub id) and load one adapter into engine; its rank."""
        path = resolve_adapter(module, self.plan, report)
        report("loading adapters", 0, 0)
        return engine.load_adapter(module, path)

    @grpc_errors
    async def WatchKvEvents(
        self, request: worker_pb2.WatchKvEventsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[worker_pb2.WatchKvEventsResponse]:
        engine = self._loaded()
        log = engine.kv_events()
        if log is None:
            raise Unimplemented(
                f"the {type(engine).__name__} engine publishes no prefix-cache events "
                "(the Transformers and llama.cpp engines do)"
            )
        async for batch in kv_events.watch(log, request.start_sequence_number):
            yield worker_pb2.WatchKvEventsResponse(kv_event_batch=batch.SerializeToString())

    def _loaded(self) -> Engine:
        if self.engine is None:
            raise Unavailable("the model is not loaded yet", reason=Reason.MODEL_LOADING)
        return self.engine


def _no_report(phase: str, done: int, total: int) -> None:
    """Progress of a run-time adapter load goes nowhere: LoadAdapter answers once, when done."""


class _Reporting:
    """Runs work(report) in a thread; events() yields its progress reports until it ends."""

    def __init__(self, work: Callable[[ProgressReport], Any]):
        self.work = work
        self.result: Any = None

    async def events(self) -> AsyncIterator[models_pb2.LoadProgress]:
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[models_pb2.LoadProgress] = asyncio.Queue()

        def report(phase: str, done: int, total: int) -> None:
            progress = models_pb2.LoadProgress(phase=phase, done_bytes=done, total_bytes=total)
            loop.call_soon_threadsafe(events.put_nowait, progress)

        # Loads compute (a warm-up step): never on a pooled thread (see on_a_thread_of_its_own).
        running = asyncio.ensure_future(on_a_thread_of_its_own(self.work, report))
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


async def run(
    socket_path: str,
    generate_socket_path: str,
    plan: LoadPlan,
    tracer_provider: trace.TracerProvider | None = None,
) -> None:
    provider = tracer_provider or trace.NoOpTracerProvider()
    worker = Worker(plan, provider.get_tracer(tracing.TRACER_NAME))
    # Bound before the gRPC socket, whose appearing tells the server the worker is up.
    generate_server = await asyncio.start_unix_server(
        functools.partial(generate_socket.serve, worker.generate),
        generate_socket_path,
        limit=frames.FRAME_LIMIT,
    )
    server = grpc.aio.server()
    worker_pb2_grpc.add_WorkerServiceServicer_to_server(worker, server)
    server.add_insecure_port(f"unix:{socket_path}")
    await server.start()
    loop = asyncio.get_running_loop()
    exit_when_server_goes(lambda: asyncio.run_coroutine_threadsafe(server.stop(grace=None), loop))
    try:
        await server.wait_for_termination()
    finally:
        generate_server.close()  # no new streams; those open end with the engine
        if worker.engine is not None:
            worker.engine.close()
        tracing.shutdown(provider)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--socket", required=True, help="Unix socket path to serve gRPC on")
    parser.add_argument(
        "--generate-socket", required=True, help="Unix socket path to serve Generate streams on"
    )
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
    asyncio.run(run(args.socket, args.generate_socket, plan, provider))


class _WorkerFields(logging.Filter):
    """Marks a worker's log lines with its model, so they can be told from the server's."""

    def __init__(self, model_uid: str):
        super().__init__()
        self.model_uid = model_uid

    def filter(self, record: logging.LogRecord) -> bool:
        record.worker = self.model_uid
        return True
