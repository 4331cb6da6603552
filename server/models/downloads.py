"""Weight downloads without a launch: a short-lived worker fetches a spec's weights into the hub's
cache (this process never imports a hub client's heavy dependencies)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

from llmgrpc.engines.base import LoadPlan
from llmgrpc.engines.weights import hubs
from llmgrpc.server.models.admission import Admission
from llmgrpc.server.models.requests import DownloadRequest
from llmgrpc.server.worker_client import WorkerProcess
from llmgrpc.server.worker_environment import worker_environment
from llmgrpc.worker.v1 import worker_pb2


async def download(
    admission: Admission, request: DownloadRequest
) -> AsyncIterator[worker_pb2.DownloadResponse]:
    """The download's progress, then the model_path. Leaving early stops its worker."""
    settings, availability = admission.settings, admission.availability
    reasons = await availability.reasons()

    def runnable_or_first(engines: tuple[str, ...]) -> str:
        # Only the engine's environment is used (its interpreter runs the download).
        return next((engine for engine in engines if reasons.get(engine) is None), engines[0])

    selection = admission.registry.select(request.query, runnable_or_first)
    await admission.check_hubs(selection, request.download_hub)
    plan = LoadPlan(
        model_uid=f"download-{uuid.uuid4().hex[:8]}",
        engine=selection.engine,
        spec=selection.spec.ref(selection.family.model_name, selection.quantization),
        device="cpu",
        cache_dir=str(settings.cache_dir),
        max_batch_size=1,
        download_hub=request.download_hub or hubs.AUTO,
        hub_cache_dir=str(settings.hub_cache_dir or ""),
    )
    worker = WorkerProcess(
        plan,
        availability.python_for(selection.engine),
        tracer=admission.tracer,
        env=worker_environment(settings, hub_credentials=True),
    )
    try:
        await worker.start(settings.worker_start_timeout_s)
        async for event in worker.download():
            yield event
    finally:
        await worker.stop()
