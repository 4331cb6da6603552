"""Assembling the server: services, health, reflection; start, serve, drain and stop."""

from __future__ import annotations

import asyncio
import logging
import signal
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from opentelemetry import trace

from llmgrpc.engines.catalogue import load_plugins
from llmgrpc.kserve.v2 import grpc_service_pb2_grpc
from llmgrpc.server import engine_api, kserve, tgis, tracing
from llmgrpc.server.auth import TokenTable, read_tokens_file
from llmgrpc.server.availability import EngineAvailability
from llmgrpc.server.interceptor import ServerInterceptor
from llmgrpc.server.manager import EngineManager, LaunchRequest
from llmgrpc.server.metrics import Metrics
from llmgrpc.server.models_file import ModelsFileError, launch_requests
from llmgrpc.server.reflection import enable_reflection
from llmgrpc.server.registry import Registry
from llmgrpc.server.servicers import GenerateServicer, ModelServicer
from llmgrpc.server.settings import Settings
from llmgrpc.tgis.v1 import generation_pb2_grpc
from llmgrpc.v1 import generate_pb2, generate_pb2_grpc, models_pb2, models_pb2_grpc

log = logging.getLogger("llmgrpc")

SERVICE_NAMES = (
    models_pb2.DESCRIPTOR.services_by_name["ModelService"].full_name,
    generate_pb2.DESCRIPTOR.services_by_name["GenerateService"].full_name,
    kserve.SERVICE_NAME,  # the standard inference protocols, beside llmgrpc.v1
    tgis.SERVICE_NAME,
    engine_api.SERVICE_NAME,  # vLLM's engine contract, for model gateways
)
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
# After the grace, how long calls get to send the status their model's stopping gave them.
STATUS_SEND_GRACE_S = 2.0


class LlmgrpcServer:
    """A gRPC server with its engine manager; stopping it drains calls, then stops every worker."""

    def __init__(
        self,
        grpc_server: grpc.aio.Server,
        manager: EngineManager,
        health_servicer,
        settings: Settings,
        *,
        interceptor: ServerInterceptor,
        metrics: Metrics,
        tracer_provider: trace.TracerProvider,
        health_server: tuple[grpc.aio.Server, int] | None = None,
        engine_api_listeners: dict[str, tuple[grpc.aio.Server, int]] | None = None,
    ):
        self.grpc_server = grpc_server
        self.manager = manager
        self.health = health_servicer
        self.settings = settings
        self.interceptor = interceptor
        self.metrics = metrics
        self.tracer_provider = tracer_provider
        self._health_server = health_server[0] if health_server else None
        self.health_port = health_server[1] if health_server else None
        self.metrics_port: int | None = None
        self._engine_api_listeners = engine_api_listeners or {}
        # Each model's own listener of the vLLM engine contract: model uid -> its bound port.
        self.engine_api_ports = {uid: port for uid, (_, port) in self._engine_api_listeners.items()}
        self.owns_tracer_provider = False  # made from the settings: this server flushes it when stopping
        self.ready = False  # the services take calls (their health SERVING; KServe's ServerReady)

    async def start(self, ready: bool = True) -> None:
        """Serve. ready=False: liveness is SERVING but the services wait for mark_ready()."""
        await self.grpc_server.start()
        for listener, _ in self._engine_api_listeners.values():
            await listener.start()
        if self._health_server is not None:
            await self._health_server.start()
        if self.settings.metrics_port is not None:
            self.metrics_port = self.metrics.serve_http(self.settings.host, self.settings.metrics_port)
        self.manager.availability.start()
        await self.health.set("", SERVING)
        for name in SERVICE_NAMES:
            await self.health.set(name, SERVING if ready else NOT_SERVING)
        self.ready = ready

    async def mark_ready(self) -> None:
        self.ready = True
        for name in SERVICE_NAMES:
            await self.health.set(name, SERVING)

    async def stop(self, grace: float | None = None) -> None:
        """Drain: health NOT_SERVING and new calls refused (UNAVAILABLE) at once; calls in flight
        get up to grace seconds to finish, then are cancelled; then every worker stops."""
        grace = self.settings.shutdown_grace_s if grace is None else grace
        self.interceptor.draining = True
        self.ready = False
        await self.health.enter_graceful_shutdown()
        if not await self.interceptor.wait_idle(grace):
            log.warning(
                "%d calls still running after %.0f s of grace: cancelling them",
                self.interceptor.in_flight,
                grace,
            )
        # Calls still in flight end with UNAVAILABLE (SHUTTING_DOWN) as their models stop; then
        # only health and reflection calls (Watch streams never end) are left: no need to wait.
        await self.manager.close()
        await self.interceptor.wait_idle(STATUS_SEND_GRACE_S)
        await self.grpc_server.stop(0)
        for listener, _ in self._engine_api_listeners.values():
            await listener.stop(0)
        if self._health_server is not None:
            await self._health_server.stop(0)
        await self.manager.availability.close()
        self.metrics.stop_http()
        if self.owns_tracer_provider:
            tracing.shutdown(self.tracer_provider)

    async def wait_for_termination(self) -> None:
        await self.grpc_server.wait_for_termination()


def _read(path) -> bytes:
    return Path(path).read_bytes()


async def create_server(
    address: str, settings: Settings | None = None, *, tracer_provider: trace.TracerProvider | None = None
) -> tuple[LlmgrpcServer, int]:
    """Build the server bound to address ("host:port"; port 0 picks a free one). Not started.

    tracer_provider: where spans go (default: made from settings.trace_exporter).
    """
    settings = settings or Settings()
    load_plugins(settings.engine_plugins)  # before the registry: its families may name them
    registry = Registry.load([settings.families_dir] if settings.families_dir else [])
    availability = EngineAvailability(settings)
    health_servicer = health.aio.HealthServicer()
    loop = asyncio.get_running_loop()

    def set_health(name: str, serving: bool) -> None:
        status = SERVING if serving else NOT_SERVING
        loop.create_task(health_servicer.set(name, status))

    tokens = dict(settings.auth_tokens)
    if settings.auth_tokens_file is not None:
        tokens.update(read_tokens_file(settings.auth_tokens_file))
    metrics = Metrics()
    provider = tracer_provider or tracing.tracer_provider(settings.trace_exporter, "llmgrpc")
    tracer = provider.get_tracer(tracing.TRACER_NAME)
    manager = EngineManager(settings, registry, availability, set_health, metrics=metrics, tracer=tracer)
    metrics.watch(manager)
    interceptor = ServerInterceptor(
        TokenTable(tokens), metrics, tracer, stream_unread_timeout_s=settings.stream_unread_timeout_s
    )
    options = settings.grpc_options()
    server = grpc.aio.server(interceptors=[interceptor], options=options)
    models_pb2_grpc.add_ModelServiceServicer_to_server(
        ModelServicer(manager, registry, availability, settings), server
    )
    generate_pb2_grpc.add_GenerateServiceServicer_to_server(GenerateServicer(manager), server)
    grpc_service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(
        kserve.KServeServicer(
            manager,
            metrics,
            server_ready=lambda: llmgrpc_server.ready,
            max_stream_pending=settings.max_stream_pending,
        ),
        server,
    )
    generation_pb2_grpc.add_GenerationServiceServicer_to_server(tgis.TgisServicer(manager), server)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    enable_reflection((*SERVICE_NAMES, health.SERVICE_NAME), server)
    credentials = None
    if settings.tls_cert_file is not None and settings.tls_key_file is not None:
        client_ca = _read(settings.tls_client_ca_file) if settings.tls_client_ca_file else None
        credentials = grpc.ssl_server_credentials(
            [(_read(settings.tls_key_file), _read(settings.tls_cert_file))],
            root_certificates=client_ca,
            require_client_auth=client_ca is not None,
        )
        port = server.add_secure_port(address, credentials)
    else:
        port = server.add_insecure_port(address)
    engine_api_listeners = engine_api.serve_on(
        server,
        settings,
        manager,
        interceptor,
        listener=lambda: grpc.aio.server(interceptors=[interceptor], options=options),
        credentials=credentials,
    )
    health_server = None
    if settings.health_port is not None:
        # Kubernetes' gRPC probes speak neither TLS nor tokens: health alone, in plaintext, on its own port.
        health_only = grpc.aio.server(options=options)
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, health_only)
        health_server = (
            health_only,
            health_only.add_insecure_port(f"{settings.host}:{settings.health_port}"),
        )
    llmgrpc_server = LlmgrpcServer(
        server,
        manager,
        health_servicer,
        settings,
        interceptor=interceptor,
        metrics=metrics,
        tracer_provider=provider,
        health_server=health_server,
        engine_api_listeners=engine_api_listeners,
    )
    llmgrpc_server.owns_tracer_provider = tracer_provider is None
    return llmgrpc_server, port


async def serve(settings: Settings) -> None:
    """Run until SIGTERM or SIGINT, launching the models file's models and settings.launch
    first; then drain and stop.

    The services report NOT_SERVING until every one of those models is READY, so a readiness
    probe keeps traffic away until the replica can answer it. A launch that fails stops the
    server with SystemExit naming the model and the reason (a replica missing one is not ready).
    """
    try:
        launches = launch_requests(settings.models_file, settings.launch)
    except ModelsFileError as error:
        raise SystemExit(f"llmgrpc: {error}") from None
    # The models file's engine_api_port words open those models' own engine-contract listeners.
    ports = {launch.model_uid: launch.engine_api_port for launch in launches if launch.engine_api_port}
    if ports:
        settings = settings.model_copy(update={"engine_api_ports": {**ports, **settings.engine_api_ports}})
    server, port = await create_server(settings.address, settings)
    await server.start(ready=False)
    endpoint = f"{settings.host}:{port}"
    log.info("llmgrpc listening on %s", endpoint)
    for uid, engine_api_port in server.engine_api_ports.items():
        log.info("vLLM engine contract for model %s on %s:%d", uid, settings.host, engine_api_port)
    if server.health_port is not None:
        log.info("health (plaintext) on %s:%d", settings.host, server.health_port)
    if server.metrics_port is not None:
        log.info("metrics on http://%s:%d/metrics", settings.host, server.metrics_port)
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping.set)

    async def launch(request: LaunchRequest) -> None:
        log.info("launching %s (%s) ...", request.model_uid, request.query.model_name)
        try:
            model = await server.manager.launch(request)
        except Exception as error:
            raise RuntimeError(f"launching {request.model_uid} failed: {error}") from error
        log.info("model %s READY (%s on %s)", model.uid, model.selection.engine, model.device)

    async def launch_all() -> None:
        # Concurrently; the first failure cancels the others (their launches leave nothing behind).
        tasks = [asyncio.ensure_future(launch(request)) for request in launches]
        try:
            for finished in asyncio.as_completed(tasks):
                await finished
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    launching = asyncio.ensure_future(launch_all())
    signalled = asyncio.ensure_future(stopping.wait())
    await asyncio.wait({launching, signalled}, return_when=asyncio.FIRST_COMPLETED)
    uids = [request.model_uid for request in launches]
    if launching.done() and launching.exception() is None:
        await server.mark_ready()
        print(ready_banner(endpoint, uids), flush=True)
        await signalled
    else:
        launching.cancel()  # stopped while launching, or a launch failed: stop either way
        signalled.cancel()
    log.info("shutting down: draining calls for up to %.0f s", settings.shutdown_grace_s)
    await server.stop()
    log.info("stopped")
    if not launching.cancelled() and launching.exception() is not None:
        raise SystemExit(f"llmgrpc: {launching.exception()}") from launching.exception()


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
