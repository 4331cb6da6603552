"""Assembling the server: services, health, reflection; start, serve, drain and stop."""

from __future__ import annotations

import asyncio
import logging
import signal

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from llmgrpc.server.availability import EngineAvailability
from llmgrpc.server.manager import EngineManager, LaunchRequest
from llmgrpc.server.reflection import enable_reflection
from llmgrpc.server.registry import Registry, SpecQuery
from llmgrpc.server.servicers import GenerateServicer, ModelServicer
from llmgrpc.server.settings import Settings
from llmgrpc.v1 import generate_pb2, generate_pb2_grpc, models_pb2, models_pb2_grpc

log = logging.getLogger("llmgrpc")

SERVICE_NAMES = (
    models_pb2.DESCRIPTOR.services_by_name["ModelService"].full_name,
    generate_pb2.DESCRIPTOR.services_by_name["GenerateService"].full_name,
)
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class LlmgrpcServer:
    """A gRPC server with its engine manager; stopping it stops every worker too."""

    def __init__(
        self, grpc_server: grpc.aio.Server, manager: EngineManager, health_servicer, settings: Settings
    ):
        self.grpc_server = grpc_server
        self.manager = manager
        self.health = health_servicer
        self.settings = settings

    async def start(self) -> None:
        await self.grpc_server.start()
        self.manager.availability.start()
        for name in ("", *SERVICE_NAMES):
            await self.health.set(name, SERVING)

    async def stop(self, grace: float | None = None) -> None:
        """Refuse new calls, let streams in flight finish within grace seconds, stop workers."""
        await self.health.enter_graceful_shutdown()
        await self.grpc_server.stop(self.settings.shutdown_grace_s if grace is None else grace)
        await self.manager.close()

    async def wait_for_termination(self) -> None:
        await self.grpc_server.wait_for_termination()


async def create_server(address: str, settings: Settings | None = None) -> tuple[LlmgrpcServer, int]:
    """Build the server bound to address ("host:port"; port 0 picks a free one). Not started."""
    settings = settings or Settings()
    registry = Registry.load([settings.families_dir] if settings.families_dir else [])
    availability = EngineAvailability(settings)
    health_servicer = health.aio.HealthServicer()
    loop = asyncio.get_running_loop()

    def set_health(name: str, serving: bool) -> None:
        status = SERVING if serving else NOT_SERVING
        loop.create_task(health_servicer.set(name, status))

    manager = EngineManager(settings, registry, availability, set_health)
    server = grpc.aio.server()
    models_pb2_grpc.add_ModelServiceServicer_to_server(ModelServicer(manager, registry, availability), server)
    generate_pb2_grpc.add_GenerateServiceServicer_to_server(GenerateServicer(manager), server)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    enable_reflection((*SERVICE_NAMES, health.SERVICE_NAME), server)
    port = server.add_insecure_port(address)
    return LlmgrpcServer(server, manager, health_servicer, settings), port


async def serve(settings: Settings) -> None:
    """Run until SIGTERM or SIGINT, launching settings.launch first; then drain and stop."""
    server, port = await create_server(settings.address, settings)
    await server.start()
    endpoint = f"{settings.host}:{port}"
    log.info("llmgrpc listening on %s", endpoint)
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping.set)
    for model_name in settings.launch:
        log.info("launching %s ...", model_name)
        model = await server.manager.launch(
            LaunchRequest(query=SpecQuery(model_name=model_name), model_uid=model_name)
        )
        log.info("model %s READY (%s on %s)", model.uid, model.selection.engine, model.device)
    print(ready_banner(endpoint, settings.launch), flush=True)
    await stopping.wait()
    log.info("shutting down: draining streams for up to %.0f s", settings.shutdown_grace_s)
    await server.stop()


def ready_banner(endpoint: str, launched: list[str]) -> str:
    uid = launched[0] if launched else "MODEL_UID"
    return f"""
llmgrpc is ready on {endpoint}{" with " + ", ".join(launched) if launched else ""}. Try:
  grpcurl -plaintext {endpoint} list
  grpcurl -plaintext -d '{{"model_name": "llama-3.1"}}' {endpoint} llmgrpc.v1.ModelService/ListSpecs
  grpcurl -plaintext {endpoint} llmgrpc.v1.ModelService/ListModels
  grpcurl -plaintext -d '{{"model_uid": "{uid}", "prompt": "Hello", "max_tokens": 16, "temperature": 0}}' \\
    {endpoint} llmgrpc.v1.GenerateService/Generate
  llmgrpc generate --endpoint {endpoint} {uid} "Hello" --max-tokens 16
"""
