"""The gRPC servicers: convert at the boundary, validate, call the manager. Nothing else."""

from __future__ import annotations

import uuid

import grpc

from llmgrpc.server.availability import EngineAvailability
from llmgrpc.server.manager import EngineManager, LaunchRequest
from llmgrpc.server.registry import ModelFamily, ModelSpec, Registry, SpecQuery
from llmgrpc.server.status import grpc_errors
from llmgrpc.server.validation import check_generate, check_launch, check_model_uid
from llmgrpc.server.worker import REQUEST_ID_METADATA
from llmgrpc.v1 import generate_pb2, generate_pb2_grpc, models_pb2, models_pb2_grpc


def family_to_pb(
    family: ModelFamily, specs: list[ModelSpec], reasons: dict[str, str | None]
) -> models_pb2.ModelFamily:
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
                hubs=[hub.to_pb() for hub in spec.hubs],
                engines=[
                    models_pb2.EngineAvailability(
                        name=engine, available=reasons.get(engine) is None, reason=reasons.get(engine) or ""
                    )
                    for engine in spec.engines
                ],
            )
            for spec in specs
        ],
    )


def query_from_pb(request: models_pb2.ListSpecsRequest) -> SpecQuery:
    return SpecQuery(
        model_name=request.model_name,
        model_engine=request.model_engine,
        model_format=request.model_format,
        size_in_billions=request.size_in_billions,
        quantization=request.quantization,
    )


class ModelServicer(models_pb2_grpc.ModelServiceServicer):
    def __init__(self, manager: EngineManager, registry: Registry, availability: EngineAvailability):
        self.manager = manager
        self.registry = registry
        self.availability = availability

    @grpc_errors
    async def ListSpecs(self, request, context):
        found = self.registry.search(query_from_pb(request))
        reasons = await self.availability.reasons()
        return models_pb2.ListSpecsResponse(
            families=[family_to_pb(family, specs, reasons) for family, specs in found]
        )

    @grpc_errors
    async def LaunchModel(self, request, context):
        check_launch(request)
        model = await self.manager.launch(LaunchRequest.from_pb(request))
        return models_pb2.LaunchModelResponse(model=model.to_pb())

    @grpc_errors
    async def ListModels(self, request, context):
        models = [await self.manager.refresh(model) for model in self.manager.list()]
        return models_pb2.ListModelsResponse(models=[model.to_pb() for model in models])

    @grpc_errors
    async def GetModel(self, request, context):
        check_model_uid(request.model_uid)
        model = await self.manager.refresh(self.manager.get(request.model_uid))
        return models_pb2.GetModelResponse(model=model.to_pb())

    @grpc_errors
    async def TerminateModel(self, request, context):
        check_model_uid(request.model_uid)
        model = await self.manager.terminate(request.model_uid)
        return models_pb2.TerminateModelResponse(model=model.to_pb())


class GenerateServicer(generate_pb2_grpc.GenerateServiceServicer):
    def __init__(self, manager: EngineManager):
        self.manager = manager

    @grpc_errors
    async def Generate(self, request: generate_pb2.GenerateRequest, context: grpc.aio.ServicerContext):
        check_generate(request)
        request_id = dict(context.invocation_metadata() or ()).get(REQUEST_ID_METADATA) or uuid.uuid4().hex
        await context.send_initial_metadata(((REQUEST_ID_METADATA, request_id),))
        async for response in self.manager.generate(request, request_id, context.time_remaining()):
            yield response
