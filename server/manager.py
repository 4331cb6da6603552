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
import dataclasses
import enum
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmgrpc.clients.errors import (
    AlreadyExists,
    Cancelled,
    FailedPrecondition,
    LlmgrpcError,
    NotFound,
    Reason,
    ResourceExhausted,
    Unavailable,
)
from llmgrpc.engines.base import LoadPlan
from llmgrpc.engines.catalogue import engine_info, validate_engine_options
from llmgrpc.engines.model_folder import CONFIG_FILE, read_model_config
from llmgrpc.engines.weights import hubs
from llmgrpc.server import resources
from llmgrpc.server.auth import check_engine_options, check_model_path
from llmgrpc.server.availability import EngineAvailability
from llmgrpc.server.metrics import Metrics
from llmgrpc.server.registry import Registry, Selection, SpecQuery
from llmgrpc.server.settings import Settings
from llmgrpc.server.worker_client import WorkerProcess
from llmgrpc.server.worker_environment import worker_environment
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
# How long GetModel and ListModels wait for a worker's numbers before showing the last ones.
STATS_TIMEOUT_S = 1.0


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


# Why a model's calls in flight end when it goes away: the error each of them gets.
Ending = Callable[[str], LlmgrpcError]


def terminated(model_uid: str) -> LlmgrpcError:
    return Unavailable(
        f"model {model_uid} was terminated; launch it again to use it",
        reason=Reason.MODEL_TERMINATED,
        metadata={"model_uid": model_uid},
    )


def shutting_down(model_uid: str) -> LlmgrpcError:
    return Unavailable(
        f"the server is shutting down and stopped model {model_uid}; call another replica",
        reason=Reason.SHUTTING_DOWN,
        metadata={"model_uid": model_uid},
    )


@dataclass
class LaunchedModel:
    """One launch, listed from the moment it is asked for until it is terminated.

    ``selection`` is None while the launch is still being checked (the spec not yet chosen);
    ``ending`` is set once the model is being terminated: what its calls in flight get."""

    uid: str
    query: SpecQuery
    device: str
    gate: AdmissionGate
    selection: Selection | None = None
    estimated_bytes: int = 0
    state: ModelState = ModelState.LOADING
    error: str = ""
    worker: WorkerProcess | None = None
    launched_at: float = field(default_factory=time.monotonic)
    load_seconds: float = 0.0
    engine_stats: dict[str, Any] = field(default_factory=dict)
    progress: dict[str, Any] = field(default_factory=dict)
    loading: asyncio.Task | None = None
    terminating: asyncio.Task | None = None
    ending: Ending | None = None
    unresponsive: bool = False  # READY, but its worker has stopped answering pings

    def to_pb(self) -> models_pb2.ModelDescription:
        selection, stats, query = self.selection, self.engine_stats, self.query
        pid = self.worker.pid if self.worker else 0
        progress = progress_to_pb(self.progress) if self.state is ModelState.LOADING else None
        return models_pb2.ModelDescription(
            model_uid=self.uid,
            model_name=selection.family.model_name if selection else query.model_name,
            model_engine=selection.engine if selection else query.model_engine,
            model_format=selection.spec.model_format if selection else query.model_format,
            size_in_billions=selection.spec.size_in_billions if selection else query.size_in_billions,
            quantization=selection.quantization if selection else query.quantization,
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
        self._background: set[asyncio.Task] = set()  # launches, terminations, watchers

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
        """Update a READY model's engine numbers from its worker (best effort, briefly: a worker
        that does not answer keeps its last numbers, and one known not to answer is not asked)."""
        if model.state is ModelState.READY and model.worker is not None and not model.unresponsive:
            with contextlib.suppress(Exception):
                model.engine_stats = await model.worker.stats(timeout=STATS_TIMEOUT_S)
        return model

    async def refresh_all(self) -> list[LaunchedModel]:
        """Every model, its numbers refreshed from all workers at once."""
        return list(await asyncio.gather(*(self.refresh(model) for model in self.list())))

    # Launch and terminate.

    async def launch(self, request: LaunchRequest) -> LaunchedModel:
        """Launch a model and wait until it is READY. The model is listed (LOADING) at once; a
        launch that fails leaves nothing behind. The launch belongs to the manager, not to its
        caller: a caller that goes away leaves it running; TerminateModel stops it."""
        if request.model_uid in self._models:
            raise self._uid_taken(self._models[request.model_uid])
        uid = request.model_uid or f"{request.query.model_name}-{uuid.uuid4().hex[:8]}"
        model = LaunchedModel(
            uid=uid,
            query=request.query,
            device=request.device or self.settings.device,
            gate=AdmissionGate(self.settings.max_running_requests, self.settings.max_waiting_requests),
        )
        self._models[uid] = model
        self._health(health_name(uid), False)
        model.loading = self._spawn(self._launch(model, request))
        try:
            await asyncio.shield(model.loading)
        except asyncio.CancelledError:
            if model.loading.cancelled() and model.ending is not None:  # terminated while loading
                raise _launch_ended(model.ending(uid)) from None
            raise
        return model

    async def terminate(self, model_uid: str) -> LaunchedModel:
        """Stop a model (loading, serving or failed) and free its uid. Its streams in flight end
        with UNAVAILABLE (MODEL_TERMINATED); a launch waiting on it with CANCELLED. The work is the
        manager's: it completes even when its caller goes away, and concurrent calls share it."""
        return await self._end(self.get(model_uid), terminated)

    async def close(self) -> None:
        """Stop every model; their calls in flight end with UNAVAILABLE (SHUTTING_DOWN)."""
        await asyncio.gather(
            *(self._end(model, shutting_down) for model in list(self._models.values())),
            return_exceptions=True,
        )
        await asyncio.gather(*self._background, return_exceptions=True)

    async def _end(self, model: LaunchedModel, ending: Ending) -> LaunchedModel:
        if model.terminating is None:
            model.ending = ending
            model.terminating = self._spawn(self._terminate(model))
        await asyncio.shield(model.terminating)
        return model

    async def _terminate(self, model: LaunchedModel) -> None:
        model.state = ModelState.TERMINATING
        self._health(health_name(model.uid), False)
        if model.loading is not None and not model.loading.done():
            model.loading.cancel()
            await asyncio.wait({model.loading})
        if model.worker is not None:
            await model.worker.stop()  # its streams in flight end now (see generate)
        self._forget(model)
        log.info("model %s terminated", model.uid)

    def _forget(self, model: LaunchedModel) -> None:
        """Unlist model; never another model launched since under the same uid."""
        if self._models.get(model.uid) is model:
            del self._models[model.uid]
            self._health(health_name(model.uid), False)

    def _uid_taken(self, model: LaunchedModel) -> AlreadyExists:
        if model.state is ModelState.TERMINATING:
            return AlreadyExists(
                f"model {model.uid} is being terminated; launch it again once TerminateModel returns",
                reason=Reason.MODEL_UID_TAKEN,
                metadata={"model_uid": model.uid},
            )
        return AlreadyExists(
            f"a model with uid {model.uid!r} is already launched ({model.state.name}); terminate it first",
            reason=Reason.MODEL_UID_TAKEN,
            metadata={"model_uid": model.uid},
        )

    def _spawn(self, coroutine) -> asyncio.Task:
        """A task the manager owns: kept referenced until done, its failure retrieved (callers that
        wait on it see the failure themselves)."""
        task = asyncio.ensure_future(coroutine)
        self._background.add(task)

        def done(task: asyncio.Task) -> None:
            self._background.discard(task)
            if not task.cancelled():
                task.exception()

        task.add_done_callback(done)
        return task

    async def _launch(self, model: LaunchedModel, request: LaunchRequest) -> None:
        """Check everything a launch needs, then start its worker and load; on any failure (or
        cancellation by TerminateModel) stop the worker and unlist the model."""
        try:
            await self._check_and_place(model, request)
            assert model.worker is not None
            await model.worker.start(self.settings.worker_start_timeout_s)
            model.engine_stats = await model.worker.load(model.progress.update)
        except BaseException:
            if model.worker is not None:
                await model.worker.stop()
            if model.state is not ModelState.TERMINATING:  # Terminate unlists what it terminates
                self._forget(model)
            raise
        model.load_seconds = time.monotonic() - model.launched_at
        model.state = ModelState.READY
        assert model.selection is not None
        self.metrics.observe_model_load(
            model.selection.family.model_name, model.selection.engine, model.load_seconds
        )
        self._health(health_name(model.uid), True)
        log.info("model %s READY on %s in %.1f s", model.uid, model.device, model.load_seconds)
        self._spawn(self._watch(model))

    async def _check_and_place(self, model: LaunchedModel, request: LaunchRequest) -> None:
        """Everything that can refuse a launch, before any worker starts or any byte is fetched:
        the spec, the engine and its options, the caller's rights, the hub, the device, memory.
        File system work runs in a thread: a slow or strange file never blocks the event loop."""
        settings = self.settings
        check_engine_options(request.engine_options, settings.allow_trust_remote_code)
        # The worker gets the resolved path: what was checked is what is loaded.
        model_path = await asyncio.to_thread(
            check_model_path, request.model_path, settings.allowed_model_dirs
        )
        request = dataclasses.replace(request, model_path=model_path)
        selection = self.registry.select(request.query, await self._first_available_engine())
        info = engine_info(selection.engine)
        await self.availability.require(info.name)
        validate_engine_options(info, request.engine_options)
        if not request.model_path:
            _check_hubs(selection, request.download_hub)
        device, visible_gpu = await self._place(info.name, model.device)
        model.selection, model.device = selection, device
        estimated = await asyncio.to_thread(self._estimate_bytes, selection, request, device)
        # No await between reading what is free and counting this launch in: concurrent
        # launches each see the others' estimates (see _free_bytes).
        free = await self._free_bytes(info.name, device, visible_gpu)
        resources.check_fits(estimated, free, _label(selection), device)
        model.estimated_bytes = estimated
        plan = LoadPlan(
            model_uid=model.uid,
            engine=info.name,
            spec=selection.spec.ref(selection.family.model_name, selection.quantization),
            device="cuda:0" if visible_gpu is not None else "cpu",
            cache_dir=str(settings.cache_dir),
            max_batch_size=settings.max_running_requests,
            model_path=request.model_path,
            engine_options=request.engine_options,
            download_hub=request.download_hub or hubs.AUTO,
            hub_cache_dir=str(settings.hub_cache_dir or ""),
        )
        model.worker = WorkerProcess(
            plan,
            self.availability.python_for(info.name),
            visible_gpu,
            tracer=self.tracer,
            env=worker_environment(
                settings,
                info.cpu_environment if plan.device == "cpu" else (),
                hub_credentials=_may_download(plan),
            ),
        )

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
            env=worker_environment(self.settings, hub_credentials=True),
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
        # The caller's deadline as a moment (wall clock: the worker is another process), so that
        # time spent waiting for admission counts against it.
        deadline = time.time() + timeout if timeout is not None else None
        model = self.get(request.model_uid)
        self._require_ready(model)
        if not request.HasField("max_tokens"):  # the caller's message stays as it was sent
            resolved = generate_pb2.GenerateRequest()
            resolved.CopyFrom(request)
            resolved.max_tokens = self.settings.default_max_tokens
            request = resolved
        queued = time.monotonic()
        async with model.gate.slot(model.uid):
            self.metrics.observe_queue_time(model.uid, time.monotonic() - queued)
            self._require_ready(model)
            assert model.worker is not None
            try:
                async for response in model.worker.generate(request, request_id, deadline):
                    yield response
            except LlmgrpcError:
                if model.ending is not None:  # the stream broke because the model is going away
                    raise model.ending(model.uid) from None
                raise

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
        if model.ending is not None:
            raise model.ending(model.uid)
        raise Unavailable(
            f"model {model.uid} is {model.state.name}, not READY; retry once it is READY",
            reason=Reason.MODEL_LOADING,
            retry_after_s=LOADING_RETRY_AFTER_S,
            metadata={"model_uid": model.uid},
        )

    async def _watch(self, model: LaunchedModel) -> None:
        """While the model is READY, ping its worker every worker_ping_interval_s: one that does
        not answer within worker_ping_timeout_s (frozen, swapping) makes the model's health
        NOT_SERVING until it answers again; one that exits marks the model FAILED, listed with
        the reason until it is terminated."""
        worker, settings = model.worker, self.settings
        assert worker is not None
        exited = asyncio.ensure_future(worker.wait())
        try:
            while model.state is ModelState.READY:
                await asyncio.wait({exited}, timeout=settings.worker_ping_interval_s)
                if exited.done() or model.state is not ModelState.READY:
                    break
                try:
                    model.engine_stats = await worker.stats(timeout=settings.worker_ping_timeout_s)
                except Exception:
                    if not model.unresponsive and model.state is ModelState.READY and not exited.done():
                        model.unresponsive = True
                        model.error = (
                            f"the worker process did not answer within {settings.worker_ping_timeout_s:g} s"
                        )
                        self._health(health_name(model.uid), False)
                        log.warning("model %s: %s", model.uid, model.error)
                    continue
                if model.unresponsive and model.state is ModelState.READY:
                    model.unresponsive, model.error = False, ""
                    self._health(health_name(model.uid), True)
                    log.info("model %s: its worker answers again", model.uid)
            if exited.done() and model.state is ModelState.READY:
                model.state = ModelState.FAILED
                model.error = worker.exit_reason
                self._health(health_name(model.uid), False)
                log.error("model %s FAILED: %s", model.uid, model.error)
        finally:
            exited.cancel()

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
        # A folder of Hugging Face weights: the caller's own must have a sound config.json (a
        # generated model's has one once it is generated).
        has_config = (
            local is not None
            and local.is_dir()
            and (bool(request.model_path) or (local / CONFIG_FILE).is_file())
        )
        if "kv_cache_memory_bytes" in request.engine_options:  # an engine told its KV cache size
            estimate += int(request.engine_options["kv_cache_memory_bytes"])
        elif has_config:
            assert local is not None
            config = read_model_config(local)
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


def _may_download(plan: LoadPlan) -> bool:
    """Whether a worker may fetch weights from a hub (and so needs the hub tokens)."""
    return not plan.model_path and not plan.spec.generator


def _launch_ended(error: LlmgrpcError) -> LlmgrpcError:
    """What a caller waiting on a launch gets when the model is terminated before it is READY."""
    if error.reason == Reason.MODEL_TERMINATED:
        return Cancelled(
            f"model {error.metadata.get('model_uid')} was terminated while it was loading",
            reason=Reason.MODEL_TERMINATED,
            metadata=error.metadata,
        )
    return error


def _label(selection: Selection) -> str:
    spec = selection.spec
    return (
        f"{selection.family.model_name} {spec.size_in_billions}B {spec.model_format} "
        f"{selection.quantization} on {selection.engine}"
    )
