"""vLLM's engine contract (``vllm.grpc.engine.VllmEngine``), so model gateways route to llmgrpc.

Owner: the vLLM engine contract. The Shepherd Model Gateway (``smg``), llm-d's router and
the Gateway API Inference Extension speak to their workers over this contract; served here,
they put OpenAI's API, chat templates, tool-call parsing and cache-aware routing across
hosts in front of llmgrpc. Every call goes through the server's one interceptor (roles,
request ids, drain, metrics, tracing) and Generate through the same
``EngineManager.generate`` as llmgrpc.v1's, so admission, cancellation and metrics are the
same.

The contract is taken from the ``smg-grpc-proto`` package (its ``vllm_engine.proto`` and
``common.proto``) rather than copied into protos/ as KServe v2 and TGIS are: it is the
gateway's own contract, versioned and published with the gateway, which adds fields at
nearly every release; depending on the pinned package keeps llmgrpc's wire exactly the one
the gateway it is tested with speaks. A copy could not even be imported beside the package
(vLLM's and SGLang's servicers install it): both would define ``vllm.grpc.engine`` in the
one protobuf descriptor pool.

What each RPC answers (see ``engine_api_state`` for routing and health):
Generate (tokenized or text input, ``n`` samples tagged by index, chunks then a
GenerateComplete per sample), Abort (cancels the calls of those request ids: the engine
drops them at its next step), HealthCheck, GetModelInfo, GetServerInfo, GetLoads and
GetTokenizer from the launched model, SubscribeKvEvents from its engine's prefix cache;
Embed, FlushCache and the profiler RPCs answer UNIMPLEMENTED saying why.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from smg_grpc_proto.generated import common_pb2
from smg_grpc_proto.generated import vllm_engine_pb2 as pb
from smg_grpc_proto.generated import vllm_engine_pb2_grpc as pb_grpc

from llmgrpc.clients.errors import Cancelled, LlmgrpcError, Unimplemented
from llmgrpc.server import logs
from llmgrpc.server.engine_api_convert import EngineGeneration, chunk_to_pb, complete_to_pb
from llmgrpc.server.engine_api_state import Aborts, Route, health, loads, model_info, server_info
from llmgrpc.server.interceptor import ServerInterceptor
from llmgrpc.server.launched import LaunchedModel
from llmgrpc.server.manager import EngineManager
from llmgrpc.server.settings import Settings
from llmgrpc.server.tokenizer_archive import chunks, zip_folder
from llmgrpc.v1 import generate_pb2

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["VllmEngine"].full_name


@dataclass
class _Sample:
    """One sample's output so far."""

    generated: int = 0
    output_ids: list[int] = field(default_factory=list)
    logprobs: list[generate_pb2.TokenLogprob] = field(default_factory=list)


async def _merged(streams: list[AsyncIterator]) -> AsyncIterator[tuple[int, object]]:
    """(index, message) of several streams as they come; leaving closes every stream."""
    if len(streams) == 1:
        async with contextlib.aclosing(streams[0]) as only:
            async for message in only:
                yield 0, message
        return
    queue: asyncio.Queue = asyncio.Queue()
    end = object()

    async def pump(index: int, stream: AsyncIterator) -> None:
        try:
            async with contextlib.aclosing(stream) as messages:
                async for message in messages:
                    queue.put_nowait((index, message, None))
            queue.put_nowait((index, end, None))
        except Exception as error:
            queue.put_nowait((index, None, error))

    tasks = [asyncio.ensure_future(pump(index, stream)) for index, stream in enumerate(streams)]
    try:
        running = len(tasks)
        while running:
            index, message, error = await queue.get()
            if error is not None:
                raise error
            if message is end:
                running -= 1
                continue
            yield index, message
    finally:  # one failed, or the caller left: the others stop too
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


@dataclass(eq=False)
class EngineApiServicer(pb_grpc.VllmEngineServicer):
    """vllm.grpc.engine.VllmEngine for the model its route names; each RPC converts at the
    boundary and reads the manager."""

    manager: EngineManager
    route: Route
    draining: Callable[[], bool] = field(kw_only=True)
    aborts: Aborts = field(kw_only=True)
    started: float = field(default_factory=time.monotonic, init=False)
    last_receive: float = field(default=0.0, init=False)
    # The model's info and tokenizer folder, by (uid, launched_at): see _describe.
    _infos: dict[tuple[str, float], pb.GetModelInfoResponse] = field(default_factory=dict, init=False)
    _tokenizer_dirs: dict[tuple[str, float], str] = field(default_factory=dict, init=False)

    async def _describe(self, model: LaunchedModel, context) -> tuple[pb.GetModelInfoResponse, str]:
        """The model's info and tokenizer folder, asked of its worker once per launch (an UNLOADED
        model's come from its last load; one never described loads for it)."""
        key = (model.uid, model.launched_at)
        if key not in self._infos:
            description = await self.manager.describe(model.uid, context.time_remaining())
            await self.manager.refresh(model)
            self._infos[key] = model_info(model, description)
            self._tokenizer_dirs[key] = description.tokenizer_dir
        return self._infos[key], self._tokenizer_dirs[key]

    async def Generate(self, request: pb.GenerateRequest, context):
        self.last_receive = time.time()
        model = self.route.model(self.manager)
        generation = EngineGeneration.from_pb(request, model.uid, int(model.engine_stats.context_length))
        with self.aborts.watch(generation.request_id) as call:
            try:
                async for response in self._generate(generation, context):
                    call.sending = True
                    yield response
                    call.sending = False
                    call.check()
            except asyncio.CancelledError:
                if not call.aborted:
                    raise  # the caller left
                if hasattr(call.task, "uncancel"):  # Python 3.11 on
                    call.task.uncancel()
                raise Cancelled(f"request {generation.request_id} was aborted by Abort") from None

    async def _generate(self, generation: EngineGeneration, context) -> AsyncIterator[pb.GenerateResponse]:
        several = len(generation.samples) > 1
        streams = [
            self._sample(sample, index if several else None, context)
            for index, sample in enumerate(generation.samples)
        ]
        samples = [_Sample() for _ in streams]
        async for index, response in _merged(streams):
            assert isinstance(response, generate_pb2.GenerateResponse)
            sample = samples[index]
            sample.generated += len(response.token_ids)
            if generation.stream:
                if response.token_ids:
                    yield chunk_to_pb(response, index, generation.prompt_tokens, sample.generated)
            else:
                sample.output_ids.extend(response.token_ids)
                sample.logprobs.extend(response.logprobs)
            if response.finish_reason:
                yield complete_to_pb(response, index, sample.output_ids, sample.logprobs)

    async def _sample(
        self, sample: generate_pb2.GenerateRequest, index: int | None, context
    ) -> AsyncIterator[generate_pb2.GenerateResponse]:
        """One sample's stream. Of several, each runs in a task of its own (_merged), under the
        call's request id and its index."""
        if index is not None:
            logs.adopt_part_id(index)
        async for response in self.manager.generate(sample, context.time_remaining()):
            yield response

    async def Abort(self, request: pb.AbortRequest, context):
        self.aborts.abort(list(request.request_ids))
        return pb.AbortResponse()

    async def HealthCheck(self, request: pb.HealthCheckRequest, context):
        try:
            model = self.route.model(self.manager)
        except LlmgrpcError as error:
            return pb.HealthCheckResponse(healthy=False, message=str(error))
        healthy, message = health(model, self.draining())
        return pb.HealthCheckResponse(healthy=healthy, message=message)

    async def GetModelInfo(self, request: pb.GetModelInfoRequest, context):
        info, _ = await self._describe(self.route.model(self.manager), context)
        return info

    async def GetServerInfo(self, request: pb.GetServerInfoRequest, context):
        model = self.route.model(self.manager)
        return server_info(model, self.started, self.last_receive, self.draining())

    async def GetLoads(self, request: pb.GetLoadsRequest, context):
        model = await self.manager.refresh(self.route.model(self.manager))
        return loads(model, kv_cache_usage=model.engine_stats.kv_cache_usage)

    async def GetTokenizer(self, request, context):
        _, folder = await self._describe(self.route.model(self.manager), context)
        data = await asyncio.to_thread(zip_folder, Path(folder))
        for chunk in chunks(data):
            yield chunk

    async def SubscribeKvEvents(self, request: common_pb2.SubscribeKvEventsRequest, context):
        model = self.route.model(self.manager)
        streams = await self.manager.kv_events(model.uid, request.start_sequence_number)
        several = len(streams) > 1
        async for index, data in _merged(streams):
            batch = common_pb2.KvEventBatch.FromString(data)
            if several:  # each replica is a cache of its own, as a data-parallel rank is
                batch.dp_rank = index
            yield batch

    async def FlushCache(self, request, context):
        raise Unimplemented(
            "FlushCache: llmgrpc's prefix caches empty themselves, least recently used first; "
            "terminate or unload the model to drop its cache at once"
        )

    async def Embed(self, request: pb.EmbedRequest, context):
        raise Unimplemented("Embed: llmgrpc serves generative models only; it computes no embeddings")

    async def StartProfile(self, request, context):
        raise Unimplemented("StartProfile: llmgrpc's engines have no profiler to start over this contract")

    async def StopProfile(self, request, context):
        raise Unimplemented("StopProfile: llmgrpc's engines have no profiler to stop over this contract")


def serve_on(
    server: grpc.aio.Server,
    settings: Settings,
    manager: EngineManager,
    interceptor: ServerInterceptor,
    *,
    listener: Callable[[], grpc.aio.Server],
    credentials: grpc.ServerCredentials | None,
) -> dict[str, tuple[grpc.aio.Server, int]]:
    """Serve the contract on the main server (for its one model without a listener of its own)
    and on a listener of each model of settings.engine_api_ports (made by listener, bound on the
    server's host, TLS as the main port): model uid -> (listener, its bound port). Not started."""
    aborts = Aborts()

    def servicer(route: Route) -> EngineApiServicer:
        draining = lambda: interceptor.draining  # noqa: E731
        return EngineApiServicer(manager, route, draining=draining, aborts=aborts)

    own = frozenset(settings.engine_api_ports)
    pb_grpc.add_VllmEngineServicer_to_server(servicer(Route(None, own)), server)
    listeners = {}
    for uid, port in settings.engine_api_ports.items():
        own_server = listener()
        pb_grpc.add_VllmEngineServicer_to_server(servicer(Route(uid)), own_server)
        address = f"{settings.host}:{port}"
        if credentials is not None:
            bound = own_server.add_secure_port(address, credentials)
        else:
            bound = own_server.add_insecure_port(address)
        listeners[uid] = (own_server, bound)
    return listeners
