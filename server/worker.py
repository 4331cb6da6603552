"""The worker process: one launched model, served to the server over a Unix socket.

The server starts ``python -m llmgrpc.server.worker --socket PATH --plan JSON`` with the
engine's interpreter. The worker answers three RPCs of an internal service,
``llmgrpc.worker.Worker``: ``Load`` (streams progress, then the engine's stats),
``Generate`` (the public GenerateRequest/GenerateResponse messages) and ``Stats``.
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
import sys
import threading
import uuid
from dataclasses import asdict

import grpc

from llmgrpc.engines import weights
from llmgrpc.engines.base import Engine, GenerationRequest, LoadPlan
from llmgrpc.engines.catalogue import engine_info
from llmgrpc.engines.errors import FailedPrecondition, Unavailable
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

    def __init__(self, plan: LoadPlan):
        self.plan = plan
        self.engine: Engine | None = None

    @grpc_errors
    async def Load(self, request: dict, context: grpc.aio.ServicerContext):
        if self.engine is not None:
            yield {"stats": asdict(self.engine.stats())}
            return
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[dict] = asyncio.Queue()

        def report(phase: str, done: int, total: int) -> None:
            loop.call_soon_threadsafe(events.put_nowait, {"phase": phase, "done": done, "total": total})

        def load() -> Engine:
            engine_class = engine_info(self.plan.engine).load_class()
            return engine_class.load(self.plan, weights.resolve(self.plan, report), report)

        loading = asyncio.ensure_future(asyncio.to_thread(load))
        while not loading.done():
            next_event = asyncio.ensure_future(events.get())
            await asyncio.wait({loading, next_event}, return_when=asyncio.FIRST_COMPLETED)
            if next_event.done():
                yield next_event.result()
            else:
                next_event.cancel()
        self.engine = loading.result()
        yield {"stats": asdict(self.engine.stats())}

    @grpc_errors
    async def Generate(self, request: generate_pb2.GenerateRequest, context: grpc.aio.ServicerContext):
        if self.engine is None:
            raise FailedPrecondition("the model is not loaded yet")
        request_id = dict(context.invocation_metadata() or ()).get(REQUEST_ID_METADATA) or uuid.uuid4().hex
        generation = GenerationRequest.from_pb(request, request_id)
        async with contextlib.aclosing(self.engine.generate(generation)) as chunks:
            async for chunk in chunks:
                yield chunk.to_pb()

    @grpc_errors
    async def Stats(self, request: dict, context: grpc.aio.ServicerContext) -> dict:
        if self.engine is None:
            raise Unavailable("the model is not loaded yet")
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
                "Stats": grpc.unary_unary_rpc_method_handler(
                    self.Stats, request_deserializer=decode_json, response_serializer=encode_json
                ),
            },
        )


def exit_when_server_goes() -> None:
    """Exit as soon as standard input closes: the server stopped us, or died."""

    def watch() -> None:
        sys.stdin.buffer.read()
        os._exit(0)

    threading.Thread(target=watch, name="server-lifeline", daemon=True).start()


async def run(socket_path: str, plan: LoadPlan) -> None:
    worker = Worker(plan)
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((worker.handlers(),))
    server.add_insecure_port(f"unix:{socket_path}")
    await server.start()
    try:
        await server.wait_for_termination()
    finally:
        if worker.engine is not None:
            worker.engine.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--socket", required=True, help="Unix socket path to serve on")
    parser.add_argument("--plan", required=True, help="the LoadPlan, as JSON")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=os.environ.get("LLMGRPC_LOG_LEVEL", "INFO"), format="%(asctime)s worker %(message)s"
    )
    exit_when_server_goes()
    asyncio.run(run(args.socket, LoadPlan.from_json_dict(json.loads(args.plan))))


if __name__ == "__main__":
    main()
