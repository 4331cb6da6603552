"""The gRPC servicers: convert at the boundary, validate, call the manager. Nothing else."""

from __future__ import annotations

import grpc

from llmgrpc.engines.catalogue import engines
from llmgrpc.engines.lora import LoraModule
from llmgrpc.server.availability import EngineAvailability
from llmgrpc.server.manager import DownloadRequest, EngineManager, LaunchRequest
from llmgrpc.server.registry import ModelFamily, ModelSpec, Registry, SpecQuery
from llmgrpc.server.settings import Settings
from llmgrpc.server.validation import (
    check_detokenize,
    check_download,
    check_generate,
    check_launch,
    check_load_adapter,
    check_model_uid,
    check_tokenize,
    check_unload_adapter,
)
from llmgrpc.v1 import generate_pb2, generate_pb2_grpc, models_pb2, models_pb2_grpc


def family_to_pb(
    family: ModelFamily,
    specs: list[ModelSpec],
    reasons: dict[str, str | None],
    hub_reasons: dict[str, dict[str, str | None]] | None = None,
) -> models_pb2.ModelFamily:
    """reasons: each engine's reason it cannot run; hub_reasons: each engine's environment's hub reasons."""
    hub_reasons = hub_reasons or {}
    support_notes = {info.name: info.support_note for info in engines()}
    return models_pb2.ModelFamily(
        model_name=family.model_name,
        description=family.description,
        context_length=family.context_length,
        languages=family.languages,
        abilities=family.abilities,
        specs=[
            models_pb2.ModelSpec(
                model_format=spec.model_format,
                size_in_billions=spec.size_in_billions,
                quantizations=spec.quantizations,
                model_id=spec.model_id,
                hubs=[
                    hub.to_pb(hub_reasons.get(serving_engine(spec, reasons), {}).get(hub.name))
                    for hub in spec.hubs
                ],
                engines=[
                    models_pb2.EngineAvailability(
                        name=engine,
                        available=reasons.get(engine) is None,
                        reason=reasons.get(engine) or "",
                        support_note=support_notes.get(engine, ""),
                    )
                    for engine in spec.engines
                ],
            )
            for spec in specs
        ],
    )


def serving_engine(spec: ModelSpec, reasons: dict[str, str | None]) -> str | None:
    """The engine whose workers would fetch spec's weights: the first that can run here, else the first."""
    return next(
        (engine for engine in spec.engines if reasons.get(engine) is None), next(iter(spec.engines), None)
    )


class ModelServicer(models_pb2_grpc.ModelServiceServicer):
    def __init__(
        self, manager: EngineManager, registry: Registry, availability: EngineAvailability, settings: Settings
    ):
        self.manager = manager
        self.registry = registry
        self.availability = availability
        self.settings = settings

    async def ListSpecs(self, request, context):
        found = self.registry.search(SpecQuery.from_pb(request))
        reasons = await self.availability.reasons()
        # Workers download in their engine's environment: its hub clients count, not the server's.
        hub_reasons = {info.name: await self.availability.hub_reasons(info.name) for info in engines()}
        return models_pb2.ListSpecsResponse(
            families=[family_to_pb(family, specs, reasons, hub_reasons) for family, specs in found]
        )

    async def LaunchModel(self, request, context):
        check_launch(request)
        model = await self.manager.launch(LaunchRequest.from_pb(request))
        return models_pb2.LaunchModelResponse(model=model.to_pb())

    async def ListModels(self, request, context):
        models = await self.manager.refresh_all()
        return models_pb2.ListModelsResponse(models=[model.to_pb() for model in models])

    async def GetModel(self, request, context):
        check_model_uid(request.model_uid)
        model = await self.manager.refresh(self.manager.get(request.model_uid))
        return models_pb2.GetModelResponse(model=model.to_pb())

    async def TerminateModel(self, request, context):
        check_model_uid(request.model_uid)
        model = await self.manager.terminate(request.model_uid)
        return models_pb2.TerminateModelResponse(model=model.to_pb())

    async def WatchModel(self, request, context):
        check_model_uid(request.model_uid)
        async for model in self.manager.watch(request.model_uid):
            yield models_pb2.WatchModelResponse(model=model)

    async def LoadAdapter(self, request, context):
        check_load_adapter(request)
        adapter = await self.manager.load_adapter(request.model_uid, LoraModule.from_pb(request.adapter))
        return models_pb2.LoadAdapterResponse(adapter=adapter)

    async def UnloadAdapter(self, request, context):
        check_unload_adapter(request)
        adapter = await self.manager.unload_adapter(request.model_uid, request.name)
        return models_pb2.UnloadAdapterResponse(adapter=adapter)

    async def ListAdapters(self, request, context):
        check_model_uid(request.model_uid)
        return models_pb2.ListAdaptersResponse(adapters=await self.manager.list_adapters(request.model_uid))

    async def DownloadModel(self, request, context):
        check_download(request)
        async for event in self.manager.download(DownloadRequest.from_pb(request)):
            if event.HasField("progress"):
                yield models_pb2.DownloadModelResponse(progress=event.progress)
            else:
                yield models_pb2.DownloadModelResponse(model_path=event.model_path)


class GenerateServicer(generate_pb2_grpc.GenerateServiceServicer):
    def __init__(self, manager: EngineManager):
        self.manager = manager

    async def Generate(self, request: generate_pb2.GenerateRequest, context: grpc.aio.ServicerContext):
        check_generate(request)
        async for response in self.manager.generate(request, context.time_remaining()):
            yield response

    async def Tokenize(self, request: generate_pb2.TokenizeRequest, context: grpc.aio.ServicerContext):
        check_tokenize(request)
        return await self.manager.call_model(request, context.time_remaining())

    async def Detokenize(self, request: generate_pb2.DetokenizeRequest, context: grpc.aio.ServicerContext):
        check_detokenize(request)
        return await self.manager.call_model(request, context.time_remaining())
