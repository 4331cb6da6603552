"""The engine manager: the one facade the servicers use over the launched models.

Each concern has a module of its own under ``llmgrpc.server.models``: the table of launched
models (``table``), the checks and placement that admit a launch (``admission``), every
transition of a model's life (``lifecycle``), the calls routed to a READY replica through the
admission gate (``routing``), LoRA adapters (``adapters``) and downloads without a launch
(``downloads``). This class wires them together and says nothing of its own beyond the engine
numbers it refreshes for GetModel.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from google.protobuf.message import Message

from llmgrpc.engines.lora import LoraModule
from llmgrpc.server.availability import EngineAvailability
from llmgrpc.server.launched import HealthUpdate, LaunchedModel, ModelState, Replica
from llmgrpc.server.metrics import Metrics
from llmgrpc.server.models import adapters, downloads
from llmgrpc.server.models.admission import Admission
from llmgrpc.server.models.lifecycle import Lifecycle
from llmgrpc.server.models.requests import DownloadRequest, LaunchRequest
from llmgrpc.server.models.routing import Routing
from llmgrpc.server.models.table import ModelTable
from llmgrpc.server.registry import Registry
from llmgrpc.server.settings import Settings
from llmgrpc.v1 import generate_pb2, models_pb2
from llmgrpc.worker.v1 import worker_pb2

__all__ = ["DownloadRequest", "EngineManager", "LaunchRequest"]

# How long GetModel and ListModels wait for a worker's numbers before showing the last ones.
STATS_TIMEOUT_S = 1.0


class EngineManager:
    def __init__(
        self,
        settings: Settings,
        registry: Registry,
        availability: EngineAvailability,
        health: HealthUpdate,
        *,
        metrics: Metrics | None = None,
        tracer=None,
    ):
        self.settings = settings
        self.availability = availability
        self.metrics = metrics or Metrics()
        self.table = ModelTable(health)
        self.admission = Admission(settings, registry, availability, self.table, tracer)
        self.lifecycle = Lifecycle(settings, self.table, self.admission, self.metrics)
        self.routing = Routing(self.table, self.lifecycle, self.metrics)

    # Queries.

    def list(self) -> list[LaunchedModel]:
        return self.table.list()

    def get(self, model_uid: str) -> LaunchedModel:
        return self.table.get(model_uid)

    async def refresh(self, model: LaunchedModel) -> LaunchedModel:
        """Update a READY model's engine numbers from its workers (best effort, briefly: a worker
        that does not answer keeps its last numbers, and one known not to answer is not asked)."""
        if model.state is ModelState.READY:
            await asyncio.gather(*(self._refresh_replica(replica) for replica in model.replicas))
        return model

    async def _refresh_replica(self, replica: Replica) -> None:
        if replica.serves and replica.worker is not None:
            # Left behind, not awaited, past its time: with both replicas' workers killed, a stats
            # call was seen to hang (the restart closing the dead worker's channel under it) past
            # its own deadline and past a cancel, which would hold GetModel forever.
            call = asyncio.ensure_future(replica.worker.stats(timeout=STATS_TIMEOUT_S))
            call.add_done_callback(lambda done: done.cancelled() or done.exception())
            finished, _ = await asyncio.wait({call}, timeout=STATS_TIMEOUT_S)
            if call in finished and not call.cancelled() and call.exception() is None:
                replica.engine_stats = call.result()
            else:
                call.cancel()

    async def refresh_all(self) -> list[LaunchedModel]:
        """Every model, its numbers refreshed from all workers at once."""
        return list(await asyncio.gather(*(self.refresh(model) for model in self.list())))

    # The lifecycle (llmgrpc.server.models.lifecycle).

    async def launch(self, request: LaunchRequest) -> LaunchedModel:
        return await self.lifecycle.launch(request)

    async def terminate(self, model_uid: str) -> LaunchedModel:
        return await self.lifecycle.terminate(model_uid)

    async def close(self) -> None:
        await self.lifecycle.close()

    def watch(self, model_uid: str) -> AsyncIterator[models_pb2.ModelDescription]:
        return self.lifecycle.watch(model_uid)

    def download(self, request: DownloadRequest) -> AsyncIterator[worker_pb2.DownloadResponse]:
        return downloads.download(self.admission, request)

    # LoRA adapters (llmgrpc.server.models.adapters).

    async def load_adapter(self, model_uid: str, module: LoraModule) -> models_pb2.AdapterDescription:
        model = self.table.get(model_uid)
        adapter = await adapters.load_adapter(model, await self.admission.check_adapter(module))
        await self.refresh(model)
        return adapter.to_pb(adapter.module.name in model.replicas[0].engine_stats.resident_adapters)

    async def unload_adapter(self, model_uid: str, name: str) -> models_pb2.AdapterDescription:
        adapter = await adapters.unload_adapter(self.table.get(model_uid), name)
        return adapter.to_pb(resident=False)

    async def list_adapters(self, model_uid: str) -> list[models_pb2.AdapterDescription]:
        model = await self.refresh(self.table.get(model_uid))
        return model.adapters.to_pb(set(model.replicas[0].engine_stats.resident_adapters))

    # Calls routed to a replica (llmgrpc.server.models.routing).

    def generate(
        self, request: generate_pb2.GenerateRequest, timeout: float | None
    ) -> AsyncIterator[generate_pb2.GenerateResponse]:
        """request's stream, under the request id of the call being served (logs.request_id)."""
        return self.routing.generate(request, timeout)

    async def call_model(self, request: Message, timeout: float | None) -> Message:
        """A public call the model named by request.model_uid answers (Tokenize, Detokenize)."""
        return await self.routing.call_model(request, timeout)

    async def describe(self, model_uid: str, timeout: float | None) -> worker_pb2.DescribeResponse:
        return await self.routing.describe(model_uid, timeout)

    async def kv_events(self, model_uid: str, start_sequence_number: int) -> list[AsyncIterator[bytes]]:
        return await self.routing.kv_events(model_uid, start_sequence_number)
