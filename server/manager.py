"""The engine manager: launched models, one worker process each, and their lifecycles.

A launch is checked (registry, engine availability, options, memory) before anything is
started, then runs in a worker process; ``launch`` returns once the model is READY, or
raises and leaves nothing behind. A worker that dies later marks its model FAILED and
its health NOT_SERVING; the server and other models carry on. Generate requests pass a
per-model admission gate (a bounded batch and a bounded queue) on their way to the worker.
While a model loads, its worker's progress events (downloading, loading weights, ...) are
kept for GetModel; ``download`` fetches a spec's weights in a worker without launching it.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmgrpc.engines import hubs
from llmgrpc.engines.base import LoadPlan
from llmgrpc.engines.catalogue import engine_info, validate_engine_options
from llmgrpc.engines.errors import (
    AlreadyExists,
    Cancelled,
    FailedPrecondition,
    NotFound,
    Reason,
    ResourceExhausted,
    Unavailable,
)
from llmgrpc.server import resources
from llmgrpc.server.availability import EngineAvailability
from llmgrpc.server.metrics import Metrics
from llmgrpc.server.registry import Registry, Selection, SpecQuery
from llmgrpc.server.settings import Settings
from llmgrpc.server.worker_client import WorkerProcess, worker_environment
from llmgrpc.v1 import generate_pb2, models_pb2

log = logging.getLogger(__name__)


class ModelState(enum.Enum):
    LOADING = models_pb2.MODEL_STATE_LOADING
    READY = models_pb2.MODEL_STATE_READY
    FAILED = models_pb2.MODEL_STATE_FAILED
    TERMINATING = models_pb2.MODEL_STATE_TERMINATING


@dataclass(frozen=True)
class LaunchRequest:
    """A LaunchModel request in domain terms."""

    query: SpecQuery
    model_uid: str = ""
    model_path: str = ""
    device: str = ""
    engine_options: dict[str, Any] = field(default_factory=dict)
    download_hub: str = ""

    @classmethod
    def from_pb(cls, pb: models_pb2.LaunchModelRequest) -> LaunchRequest:
        from google.protobuf.json_format import MessageToDict

        return cls(
            query=SpecQuery.from_pb(pb),
            model_uid=pb.model_uid,
            model_path=pb.model_path,
            device=pb.device,
            engine_options=MessageToDict(pb.engine_options) if pb.HasField("engine_options") else {},
            download_hub=pb.download_hub,
        )


@dataclass(frozen=True)
class DownloadRequest:
    """A DownloadModel request in domain terms."""

    query: SpecQuery
    download_hub: str = ""

    @classmethod
    def from_pb(cls, pb: models_pb2.DownloadModelRequest) -> DownloadRequest:
        return cls(
            query=SpecQuery.from_pb(pb),
            download_hub=pb.download_hub,
        )


def progress_to_pb(event: dict[str, Any]) -> models_pb2.LoadProgress:
    """A worker's progress event ({"phase", "done", "total"}) as the contract shows it."""
    return models_pb2.LoadProgress(
        phase=str(event.get("phase") or "starting"),
        done_bytes=int(event.get("done") or 0),
        total_bytes=int(event.get("total") or 0),
    )


# How long a caller should wait before retrying a full queue, or a model still loading.
QUEUE_RETRY_AFTER_S = 1.0
LOADING_RETRY_AFTER_S = 5.0


class AdmissionGate:
    """At most max_running requests decoding and max_waiting queued; beyond, refuse."""

    def __init__(self, max_running: int, max_waiting: int):
        self.max_running = max_running
        self.max_waiting = max_waiting
        self.running = 0
        self.waiting = 0
        self._slots = asyncio.Semaphore(max_running)

    @contextlib.asynccontextmanager
    async def slot(self, model_uid: str):
        if self._slots.locked() and self.waiting >= self.max_waiting:
            raise ResourceExhausted(
                f"model {model_uid} is busy: {self.running} requests running and {self.waiting} waiting "
                f"(limits {self.max_running} and {self.max_waiting}); retry later",
                reason=Reason.QUEUE_FULL,
                retry_after_s=QUEUE_RETRY_AFTER_S,
                metadata={"model_uid": model_uid},
            )
        self.waiting += 1
        try:
            await self._slots.acquire()
        finally:
            self.waiting -= 1
        self.running += 1
        try:
            yield
        finally:
            self.running -= 1
            self._slots.release()


@dataclass
class LaunchedModel:
    uid: str
    selection: Selection
    device: str
    gate: AdmissionGate
    estimated_bytes: int
    state: ModelState = ModelState.LOADING
    error: str = ""
    worker: WorkerProcess | None = None
    launched_at: float = field(default_factory=time.monotonic)
    load_seconds: float = 0.0
    engine_stats: dict[str, Any] = field(default_factory=dict)
    progress: dict[str, Any] = field(default_factory=dict)
    loading: asyncio.Task | None = None

    def to_pb(self) -> models_pb2.ModelDescription:
        selection, stats = self.selection, self.engine_stats
        pid = self.worker.pid if self.worker else 0
        progress = progress_to_pb(self.progress) if self.state is ModelState.LOADING else None
        return models_pb2.ModelDescription(
            model_uid=self.uid,
            model_name=selection.family.model_name,
            model_engine=selection.engine,
            model_format=selection.spec.model_format,
            size_in_billions=selection.spec.size_in_billions,
            quantization=selection.quantization,
            state=self.state.value,
            device=self.device,
            memory_bytes=resources.process_memory_bytes(pid) if pid else 0,
            gpu_memory_bytes=int(stats.get("gpu_memory_bytes", 0)),
            context_length=int(stats.get("context_length", 0)),
            running_requests=self.gate.running,
            waiting_requests=self.gate.waiting,
            error=self.error,
            worker_pid=pid,
            peak_batch_size=int(stats.get("peak_batch_size", 0)),
            load_seconds=self.load_seconds,
            estimated_memory_bytes=self.estimated_bytes,
            progress=progress,
        )


# health(name, serving): tells the health service whether a model serves.
HealthUpdate = Callable[[str, bool], None]


def health_name(model_uid: str) -> str:
    """The grpc.health.v1 service name of a launched model."""
    return f"model/{model_uid}"


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
        self.registry = registry
        self.availability = availability
        self._health = health
        self.metrics = metrics or Metrics()
        self.tracer = tracer  # spans around worker calls (None: not traced)
        self._models: dict[str, LaunchedModel] = {}

    # Queries.

    def list(self) -> list[LaunchedModel]:
        return list(self._models.values())

    def get(self, model_uid: str) -> LaunchedModel:
        model = self._models.get(model_uid)
        if model is None:
            known = ", ".join(self._models) or "none"
            raise NotFound(
                f"no launched model has uid {model_uid!r}; launched models: {known}",
                reason=Reason.MODEL_NOT_FOUND,
                metadata={"model_uid": model_uid},
            )
        return model

    async def refresh(self, model: LaunchedModel) -> LaunchedModel:
        """Update a READY model's engine numbers from its worker (best effort)."""
        if model.state is ModelState.READY and model.worker is not None:
            with contextlib.suppress(Exception):
                model.engine_stats = await model.worker.stats()
        return model

    # Launch and terminate.

    async def launch(self, request: LaunchRequest) -> LaunchedModel:
        if request.model_uid in self._models:
            raise AlreadyExists(
                f"a model with uid {request.model_uid!r} is already launched; terminate it first",
                reason=Reason.MODEL_UID_TAKEN,
            )
        selection = self.registry.select(request.query, await self._first_available_engine())
        info = engine_info(selection.engine)
        await self.availability.require(info.name)
        validate_engine_options(info, request.engine_options)
        if not request.model_path:
            _check_hubs(selection, request.download_hub)
        device, visible_gpu = await self._place(info.name, request.device or self.settings.device)
        estimated = self._estimate_bytes(selection, request, device)
        resources.check_fits(
            estimated, await self._free_bytes(info.name, device, visible_gpu), _label(selection), device
        )

        uid = request.model_uid or f"{selection.family.model_name}-{uuid.uuid4().hex[:8]}"
        if uid in self._models:  # launched meanwhile, while this one was being checked
            raise AlreadyExists(
                f"a model with uid {uid!r} is already launched; terminate it first",
                reason=Reason.MODEL_UID_TAKEN,
            )
        model = LaunchedModel(
            uid=uid,
            selection=selection,
            device=device,
            gate=AdmissionGate(self.settings.max_running_requests, self.settings.max_waiting_requests),
            estimated_bytes=estimated,
        )
        self._models[uid] = model
        self._health(health_name(uid), False)
        plan = LoadPlan(
            model_uid=uid,
            engine=info.name,
            spec=selection.spec.ref(selection.family.model_name, selection.quantization),
            device="cuda:0" if visible_gpu is not None else "cpu",
            cache_dir=str(self.settings.cache_dir),
            max_batch_size=self.settings.max_running_requests,
            model_path=request.model_path,
            engine_options=request.engine_options,
            download_hub=request.download_hub or hubs.AUTO,
            hub_cache_dir=str(self.settings.hub_cache_dir or ""),
        )
        model.worker = WorkerProcess(
            plan,
            self.availability.python_for(info.name),
            visible_gpu,
            tracer=self.tracer,
            env=worker_environment(self.settings, info.cpu_environment if plan.device == "cpu" else ()),
        )
        model.loading = asyncio.ensure_future(self._load(model))
        try:
            await asyncio.shield(model.loading)
        except asyncio.CancelledError:
            if model.loading.cancelled():  # terminated while loading, not the caller going away
                raise Cancelled(
                    f"model {uid} was terminated while it was loading", reason=Reason.MODEL_TERMINATED
                ) from None
            raise
        return model

    async def terminate(self, model_uid: str) -> LaunchedModel:
        model = self.get(model_uid)
        model.state = ModelState.TERMINATING
        self._health(health_name(model_uid), False)
        if model.loading is not None and not model.loading.done():
            model.loading.cancel()
        if model.worker is not None:
            await model.worker.stop()
        self._models.pop(model_uid, None)
        self._health(health_name(model_uid), False)
        return model

    async def close(self) -> None:
        await asyncio.gather(*(self.terminate(uid) for uid in list(self._models)), return_exceptions=True)

    # Downloads.

    async def download(self, request: DownloadRequest) -> AsyncIterator[dict[str, Any]]:
        """Fetch a spec's weights in a short-lived worker process (this process never imports a hub
        client's heavy dependencies): its progress events, then {"path": ...}. Leaving early stops it."""
        reasons = await self.availability.reasons()

        def runnable_or_first(engines: tuple[str, ...]) -> str:
            # Only the engine's environment is used (its interpreter runs the download).
            return next((engine for engine in engines if reasons.get(engine) is None), engines[0])

        selection = self.registry.select(request.query, runnable_or_first)
        _check_hubs(selection, request.download_hub)
        plan = LoadPlan(
            model_uid=f"download-{uuid.uuid4().hex[:8]}",
            engine=selection.engine,
            spec=selection.spec.ref(selection.family.model_name, selection.quantization),
            device="cpu",
            cache_dir=str(self.settings.cache_dir),
            max_batch_size=1,
            download_hub=request.download_hub or hubs.AUTO,
            hub_cache_dir=str(self.settings.hub_cache_dir or ""),
        )
        worker = WorkerProcess(
            plan,
            self.availability.python_for(selection.engine),
            tracer=self.tracer,
            env=worker_environment(self.settings),
        )
        try:
            await worker.start(self.settings.worker_start_timeout_s)
            async for event in worker.download():
                yield event
        finally:
            await worker.stop()

    # Generation.

    async def generate(
        self, request: generate_pb2.GenerateRequest, request_id: str, timeout: float | None
    ) -> AsyncIterator[generate_pb2.GenerateResponse]:
        model = self.get(request.model_uid)
        self._require_ready(model)
        if not request.HasField("max_tokens"):
            request.max_tokens = self.settings.default_max_tokens
        queued = time.monotonic()
        async with model.gate.slot(model.uid):
            self.metrics.observe_queue_time(model.uid, time.monotonic() - queued)
            self._require_ready(model)
            assert model.worker is not None
            async for response in model.worker.generate(request, request_id, timeout):
                yield response

    # Internals.

    def _require_ready(self, model: LaunchedModel) -> None:
        if model.state is ModelState.READY:
            return
        if model.state is ModelState.FAILED:
            raise FailedPrecondition(
                f"model {model.uid} has FAILED ({model.error}); terminate it and launch it again",
                reason=Reason.MODEL_FAILED,
                metadata={"model_uid": model.uid},
            )
        if model.state is ModelState.TERMINATING:
            raise Unavailable(
                f"model {model.uid} is TERMINATING",
                reason=Reason.MODEL_TERMINATED,
                metadata={"model_uid": model.uid},
            )
        raise Unavailable(
            f"model {model.uid} is {model.state.name}, not READY; retry once it is READY",
            reason=Reason.MODEL_LOADING,
            retry_after_s=LOADING_RETRY_AFTER_S,
            metadata={"model_uid": model.uid},
        )

    async def _load(self, model: LaunchedModel) -> None:
        worker = model.worker
        assert worker is not None
        try:
            await worker.start(self.settings.worker_start_timeout_s)
            model.engine_stats = await worker.load(model.progress.update)
        except BaseException:
            self._models.pop(model.uid, None)
            self._health(health_name(model.uid), False)
            await worker.stop()
            raise
        model.load_seconds = time.monotonic() - model.launched_at
        model.state = ModelState.READY
        self.metrics.observe_model_load(
            model.selection.family.model_name, model.selection.engine, model.load_seconds
        )
        self._health(health_name(model.uid), True)
        log.info("model %s READY on %s in %.1f s", model.uid, model.device, model.load_seconds)
        asyncio.ensure_future(self._watch(model))

    async def _watch(self, model: LaunchedModel) -> None:
        """Mark the model FAILED if its worker exits while the model is meant to be serving."""
        assert model.worker is not None
        await model.worker.wait()
        if model.state is ModelState.READY:
            model.state = ModelState.FAILED
            model.error = model.worker.exit_reason
            self._health(health_name(model.uid), False)
            log.error("model %s FAILED: %s", model.uid, model.error)

    async def _first_available_engine(self) -> Callable[[tuple[str, ...]], str]:
        reasons = await self.availability.reasons()

        def first(engines: tuple[str, ...]) -> str:
            for engine in engines:
                if reasons.get(engine) is None:
                    return engine
            why = "; ".join(f"{engine}: {reasons.get(engine)}" for engine in engines)
            raise FailedPrecondition(
                f"no engine for this spec can run on this server ({why})", reason=Reason.ENGINE_UNAVAILABLE
            )

        return first

    async def _place(self, engine: str, device: str) -> tuple[str, str | None]:
        """The device to report and the GPU index the worker may see (None: the CPU)."""
        if device == "cpu":
            return "cpu", None
        gpus = await self.availability.cuda_devices(engine)
        if device == "auto":
            return ("cuda:0", "0") if gpus else ("cpu", None)
        index = int(device.partition(":")[2] or 0)
        if index >= len(gpus):
            seen = f"{len(gpus)} CUDA GPU(s)" if gpus else "no CUDA GPU"
            raise FailedPrecondition(
                f"device {device} was asked for but the {engine} environment sees {seen}",
                reason=Reason.DEVICE_UNAVAILABLE,
            )
        return f"cuda:{index}", str(index)

    def _estimate_bytes(self, selection: Selection, request: LaunchRequest, device: str) -> int:
        """Weights at the chosen dtype, an overhead factor, and the KV cache of one full context
        when the model's configuration is on disk (local weights, or a generated model)."""
        spec = selection.spec
        local = Path(request.model_path) if request.model_path else None
        if local is None and spec.generator:
            local = Path(self.settings.cache_dir) / spec.generator / spec.model_format
        if local is not None and local.is_dir() and spec.model_file_name_template:
            # A folder of GGUF files: only the quantization's own file is loaded.
            local = local / spec.model_file_name_template.format(quantization=selection.quantization)
        on_disk = resources.weight_bytes_on_disk(local) if local else 0
        dtype = str(request.engine_options.get("dtype", "auto"))
        if dtype == "auto":
            dtype = "float32" if device == "cpu" else "bfloat16"
        weights = on_disk or resources.weight_bytes_from_size(
            spec.size_billions, spec.model_format, selection.quantization, dtype
        )
        estimate = int(weights * self.settings.memory_overhead)
        config_file = local / "config.json" if local and local.is_dir() else None
        if "kv_cache_memory_bytes" in request.engine_options:  # an engine told its KV cache size
            estimate += int(request.engine_options["kv_cache_memory_bytes"])
        elif config_file and config_file.exists():
            config = json.loads(config_file.read_text())
            context = int(
                request.engine_options.get("context_length")
                or min(
                    config.get("max_position_embeddings", 0) or selection.family.context_length,
                    selection.family.context_length,
                )
            )
            estimate += resources.kv_cache_bytes(config, context, dtype)
        return estimate

    async def _free_bytes(self, engine: str, device: str, visible_gpu: str | None) -> int:
        if visible_gpu is None:
            loading = sum(m.estimated_bytes for m in self._models.values() if m.state is ModelState.LOADING)
            return max(resources.free_cpu_bytes() - loading, 0)
        gpus = await self.availability.cuda_devices(engine)
        return int(gpus[int(visible_gpu)]["free_bytes"])


def _check_hubs(selection: Selection, download_hub: str) -> None:
    """Refuse, before any worker starts, a hub download that cannot happen here."""
    spec = selection.spec
    if not spec.generator:
        hubs.hub_order([hub.name for hub in spec.hubs], download_hub, hubs.unavailable_reasons())


def _label(selection: Selection) -> str:
    spec = selection.spec
    return (
        f"{selection.family.model_name} {spec.size_in_billions}B {spec.model_format} "
        f"{selection.quantization} on {selection.engine}"
    )
