"""The engine manager: launched models, one worker process per replica, and their lifecycles.

A launch is checked (registry, engine availability, options, memory) before anything is
started, then runs in worker processes, one per replica (one unless ``replica`` says more);
``launch`` returns once every replica is READY, or raises and leaves nothing behind. The
worker of a single-replica model that dies later marks its model FAILED and its health
NOT_SERVING; a replica of several whose worker dies is restarted, with a growing backoff,
while the others serve. The server and other models carry on. Generate requests pass a
per-model admission gate (a bounded batch and a bounded queue) and go to the READY replica
with the fewest requests in flight.
While a model loads, its worker's progress events (downloading, loading weights, ...) are
kept for GetModel; ``download`` fetches a spec's weights in a worker without launching it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
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
    FieldViolation,
    InvalidArgument,
    LlmgrpcError,
    NotFound,
    Reason,
    Unavailable,
)
from llmgrpc.engines.base import LoadPlan
from llmgrpc.engines.catalogue import engine_info, validate_engine_options
from llmgrpc.engines.chat import attach_tool_calls
from llmgrpc.engines.model_folder import CONFIG_FILE, read_model_config
from llmgrpc.engines.weights import hubs
from llmgrpc.server import placement, resources
from llmgrpc.server.auth import check_engine_options, check_model_path
from llmgrpc.server.availability import EngineAvailability
from llmgrpc.server.launched import (
    SETTLED,
    AdmissionGate,
    Condition,
    Ending,
    HealthUpdate,
    LaunchedModel,
    ModelState,
    Replica,
    Why,
    health_name,
    shutting_down,
    terminated,
)
from llmgrpc.server.metrics import Metrics
from llmgrpc.server.registry import Registry, Selection, SpecQuery
from llmgrpc.server.settings import Settings
from llmgrpc.server.worker_client import WorkerProcess
from llmgrpc.server.worker_environment import worker_environment
from llmgrpc.v1 import generate_pb2, models_pb2
from llmgrpc.worker.v1 import worker_pb2

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LaunchRequest:
    """A LaunchModel request in domain terms."""

    query: SpecQuery
    model_uid: str = ""
    model_path: str = ""
    device: str = ""
    engine_options: dict[str, Any] = field(default_factory=dict)
    download_hub: str = ""
    wait: bool = True  # return once READY; False: at once, LOADING
    idle_unload_s: float | None = None  # None: the server's setting; 0: never
    n_gpu: str = ""  # "": one GPU on a GPU device; "auto": the fewest that fit; or a count
    gpu_idx: tuple[int, ...] = ()  # every replica's GPUs, replica after replica
    replica: int = 1  # worker processes serving this uid

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
            wait=pb.wait if pb.HasField("wait") else True,
            idle_unload_s=pb.idle_unload_s if pb.HasField("idle_unload_s") else None,
            n_gpu=pb.n_gpu,
            gpu_idx=tuple(pb.gpu_idx),
            replica=pb.replica if pb.HasField("replica") else 1,
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


# The key of the CPU's reservations among the GPU indices (see _loading_reservations).
CPU = "cpu"
# How long a caller should wait before retrying a model still loading.
LOADING_RETRY_AFTER_S = 5.0
# How long before a caller's deadline a Generate waiting for a reload gives up, to answer in time.
ANSWER_MARGIN_S = 0.1
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

    # Launch and terminate.

    async def launch(self, request: LaunchRequest) -> LaunchedModel:
        """Launch a model: listed LOADING at once, then checked, started and loaded. With
        request.wait, return once it is READY; a caller that goes away meanwhile stops the launch
        and leaves nothing behind. Without, return at once (WatchModel follows the load). A load
        that fails after the worker started leaves the model FAILED, listed with the reason."""
        if request.model_uid in self._models:
            raise self._uid_taken(self._models[request.model_uid])
        uid = request.model_uid or f"{request.query.model_name}-{uuid.uuid4().hex[:8]}"
        idle_unload_s = request.idle_unload_s
        if idle_unload_s is None:
            idle_unload_s = self.settings.idle_unload_s or 0.0
        replicas = request.replica
        # Each replica decodes a batch of its own: the gate admits as many as they decode together.
        model = LaunchedModel(
            uid=uid,
            query=request.query,
            device=request.device or self.settings.device,
            gate=AdmissionGate(
                self.settings.max_running_requests * replicas, self.settings.max_waiting_requests * replicas
            ),
            replicas=[Replica(index) for index in range(replicas)],
            idle_unload_s=idle_unload_s,
        )
        self._models[uid] = model
        self._health(health_name(uid), False)
        model.loading = self._spawn(self._launch(model, request))
        if not request.wait:
            return model
        try:
            await asyncio.shield(model.loading)
        except asyncio.CancelledError:
            if model.loading.cancelled() and model.ending is not None:  # terminated while loading
                raise _launch_ended(model.ending(uid)) from None
            if not model.loading.done():  # the caller went away: so does its launch
                self._spawn(self._end(model, terminated, Why.LAUNCH_ABANDONED))
            raise
        return model

    async def terminate(self, model_uid: str) -> LaunchedModel:
        """Stop a model (loading, serving, unloaded or failed) and free its uid. Its streams in
        flight end with UNAVAILABLE (MODEL_TERMINATED); a launch waiting on it with CANCELLED. The
        work is the manager's: it completes even when its caller goes away, and concurrent calls
        share it."""
        return await self._end(self.get(model_uid), terminated)

    async def close(self) -> None:
        """Stop every model; their calls in flight end with UNAVAILABLE (SHUTTING_DOWN)."""
        await asyncio.gather(
            *(self._end(model, shutting_down) for model in list(self._models.values())),
            return_exceptions=True,
        )
        await asyncio.gather(*self._background, return_exceptions=True)

    async def watch(self, model_uid: str) -> AsyncIterator[models_pb2.ModelDescription]:
        """The model as it is, then as it is after each change of state or of load progress,
        until it settles (READY, FAILED, UNLOADED or TERMINATED)."""
        model = self.get(model_uid)
        changes: asyncio.Queue[models_pb2.ModelDescription] = asyncio.Queue()
        model.watchers.add(changes)
        try:
            description = model.to_pb()
            yield description
            while ModelState(description.state) not in SETTLED:
                description = await changes.get()
                yield description
        finally:
            model.watchers.discard(changes)

    async def _end(
        self, model: LaunchedModel, ending: Ending, why: str = Why.TERMINATE_REQUESTED
    ) -> LaunchedModel:
        if model.terminating is None:
            model.ending = ending
            model.terminating = self._spawn(self._terminate(model, why))
        await asyncio.shield(model.terminating)
        return model

    async def _terminate(self, model: LaunchedModel, why: str) -> None:
        self._transition(model, ModelState.TERMINATING, why)
        if model.loading is not None and not model.loading.done():
            model.loading.cancel()
            await asyncio.wait({model.loading})
        await self._stop_restarts(model)
        if model.unloading is not None:
            await asyncio.wait({model.unloading})
        # Their streams in flight end now (see generate).
        await asyncio.gather(*(replica.worker.stop() for replica in model.replicas if replica.worker))
        for replica in model.replicas:
            replica.condition = Condition(ModelState.TERMINATED, Why.TERMINATED)
        self._transition(model, ModelState.TERMINATED, Why.TERMINATED)
        self._forget(model)
        log.info("model %s terminated", model.uid)

    def _transition(self, model: LaunchedModel, state: ModelState, why: str, message: str = "") -> None:
        """Move model to state (its health follows: SERVING only when READY with a replica that
        answers) and tell its watchers."""
        model.condition = Condition(state, why, message)
        if state is ModelState.FAILED:
            model.error = message
        self._health(health_name(model.uid), model.serves)
        self._tell_watchers(model)

    def _replica_transition(
        self, model: LaunchedModel, replica: Replica, state: ModelState, why: str, message: str = ""
    ) -> None:
        """Move one replica of a model to state, and the model with it: READY while one replica
        is READY; LOADING (Restarting) while none is and one is being restarted."""
        replica.condition = Condition(state, why, message)
        if state is ModelState.FAILED:
            replica.error = message
        ready = any(other.state is ModelState.READY for other in model.replicas)
        if model.state is ModelState.READY and not ready:
            self._transition(model, ModelState.LOADING, Why.RESTARTING, f"no replica is READY: {message}")
        elif model.state is ModelState.LOADING and model.condition.reason == Why.RESTARTING and ready:
            self._transition(model, ModelState.READY, Why.LOADED, f"replica {replica.index} is READY again")
            if model.idle_unload_s > 0:  # the idle clock stopped while the model was not READY
                self._spawn(self._unload_when_idle(model))
        else:
            self._health(health_name(model.uid), model.serves)
            self._tell_watchers(model)

    def _tell_watchers(self, model: LaunchedModel) -> None:
        if model.watchers:
            description = model.to_pb()
            for changes in model.watchers:
                changes.put_nowait(description)

    def _on_progress(self, model: LaunchedModel, progress: models_pb2.LoadProgress) -> None:
        model.progress.CopyFrom(progress)
        self._tell_watchers(model)

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
        """Check everything a launch needs, then start its worker and load. A launch refused by
        its checks is unlisted; one whose worker fails to load is FAILED (listed until terminated);
        one cancelled by TerminateModel stops its worker and is unlisted by the terminate."""
        try:
            await self._check_and_place(model, request)
        except BaseException:
            if model.state is not ModelState.TERMINATING:  # Terminate unlists what it terminates
                self._forget(model)
            raise
        await self._load(model)

    async def _load(self, model: LaunchedModel) -> None:
        """Start the model's workers, one per replica, and load them: READY once all are, or
        FAILED with the reason as soon as one fails (the others are stopped). The first loads
        alone: it fetches (or generates) the weights once, and the others find them cached."""
        model.progress.Clear()
        model.error = ""
        started = time.monotonic()
        first, *others = model.replicas
        loads: list[asyncio.Future] = []
        try:
            loads.append(asyncio.ensure_future(self._load_replica(model, first)))
            await loads[0]
            loads += [asyncio.ensure_future(self._load_replica(model, replica)) for replica in others]
            await asyncio.gather(*loads)
        except BaseException as error:
            for load in loads:
                load.cancel()
            await asyncio.wait(loads)  # each stops its own worker
            if model.state is not ModelState.TERMINATING:
                failure = _failure(error)
                for replica in model.replicas:
                    if replica.state is ModelState.LOADING:  # stopped because another failed
                        replica.condition = Condition(ModelState.FAILED, Why.LOAD_FAILED, failure)
                self._transition(model, ModelState.FAILED, Why.LOAD_FAILED, failure)
                log.error("model %s FAILED to load: %s", model.uid, failure)
            raise
        model.load_seconds = time.monotonic() - started
        model.last_active = time.monotonic()
        self._transition(model, ModelState.READY, Why.LOADED)
        assert model.selection is not None
        self.metrics.observe_model_load(
            model.selection.family.model_name, model.selection.engine, model.load_seconds
        )
        log.info("model %s READY on %s in %.1f s", model.uid, model.device, model.load_seconds)
        for replica in model.replicas:
            self._spawn(self._watch(model, replica))
        if model.idle_unload_s > 0:
            self._spawn(self._unload_when_idle(model))

    async def _load_replica(self, model: LaunchedModel, replica: Replica) -> None:
        """Start one replica's worker and load it: READY, or FAILED with the reason (raised)."""
        assert replica.new_worker is not None
        replica.worker = worker = replica.new_worker()
        replica.unresponsive, replica.error = False, ""
        if replica.state is not ModelState.LOADING:
            self._replica_transition(model, replica, ModelState.LOADING, Why.RELOADING)
        try:
            await worker.start(self.settings.worker_start_timeout_s)
            replica.engine_stats = await worker.load(lambda event: self._on_progress(model, event))
        except BaseException as error:
            await worker.stop()
            if not isinstance(error, asyncio.CancelledError):  # cancelled: whoever cancelled says
                failure = _failure(error)
                replica.condition = Condition(ModelState.FAILED, Why.LOAD_FAILED, failure)
                replica.error = failure
            raise
        replica.ready_since = time.monotonic()
        self._replica_transition(model, replica, ModelState.READY, Why.LOADED)

    # Replicas whose worker died.

    def _replica_died(self, model: LaunchedModel, replica: Replica, worker: WorkerProcess) -> None:
        """A READY replica's worker exited: with no other replica the model is FAILED (listed
        with the reason until terminated); among several, the replica is restarted after a
        backoff that doubles with each death in a row while the others serve."""
        if len(model.replicas) == 1:
            replica.condition = Condition(ModelState.FAILED, Why.WORKER_EXITED, worker.exit_reason)
            self._transition(model, ModelState.FAILED, Why.WORKER_EXITED, worker.exit_reason)
            log.error("model %s FAILED: %s", model.uid, model.error)
            return
        settings = self.settings
        if time.monotonic() - replica.ready_since >= settings.replica_restart_backoff_max_s:
            replica.failures_in_row = 0  # it served a good while: a new run of failures
        message = f"{worker.exit_reason}; restarting it"
        self._replica_transition(model, replica, ModelState.FAILED, Why.WORKER_EXITED, message)
        log.error("model %s replica %d: %s", model.uid, replica.index, message)
        replica.restarting = self._spawn(self._restart(model, replica, worker))

    async def _restart(self, model: LaunchedModel, replica: Replica, dead: WorkerProcess) -> None:
        settings = self.settings
        await dead.stop()  # its channel, socket folder and what its engine started go too
        while model.state in (ModelState.READY, ModelState.LOADING) and model.ending is None:
            delay = min(
                settings.replica_restart_backoff_s * 2**replica.failures_in_row,
                settings.replica_restart_backoff_max_s,
            )
            replica.failures_in_row += 1
            await asyncio.sleep(delay)
            if model.state not in (ModelState.READY, ModelState.LOADING) or model.ending is not None:
                return
            replica.restarts += 1
            self._replica_transition(
                model, replica, ModelState.LOADING, Why.RESTARTING, f"restart {replica.restarts}"
            )
            try:
                await self._load_replica(model, replica)
            except Exception as error:  # FAILED again: wait longer, then try again
                self._replica_transition(model, replica, ModelState.FAILED, Why.LOAD_FAILED, _failure(error))
                log.error("model %s replica %d failed to restart: %s", model.uid, replica.index, error)
                continue
            log.info("model %s replica %d READY again", model.uid, replica.index)
            self._spawn(self._watch(model, replica))
            return

    def _cancel_restarts(self, model: LaunchedModel) -> list[asyncio.Task]:
        """Cancel the restarts under way (a restart loading stops its worker): what to wait for."""
        restarting = [r.restarting for r in model.replicas if r.restarting and not r.restarting.done()]
        for task in restarting:
            task.cancel()
        return restarting

    async def _stop_restarts(self, model: LaunchedModel) -> None:
        restarting = self._cancel_restarts(model)
        if restarting:
            await asyncio.wait(restarting)

    # Idle unload and reload.

    async def _unload_when_idle(self, model: LaunchedModel) -> None:
        """While READY, unload the model once it has had no request in flight for idle_unload_s
        (counted from the end of its last stream, so a live stream is never cut)."""
        while model.state is ModelState.READY:
            idle_for = time.monotonic() - model.last_active if model.in_flight == 0 else 0.0
            if idle_for >= model.idle_unload_s:
                self._unload(model)
                return
            await asyncio.sleep(model.idle_unload_s - idle_for)

    def _unload(self, model: LaunchedModel) -> None:
        message = f"no request for {model.idle_unload_s:g} s; the next Generate loads it again"
        workers = []
        for replica in model.replicas:
            if replica.worker is not None:
                workers.append(replica.worker)
            replica.worker = None
            replica.condition = Condition(ModelState.UNLOADED, Why.IDLE_UNLOADED, message)
            replica.engine_stats = worker_pb2.EngineStats()
        self._transition(model, ModelState.UNLOADED, Why.IDLE_UNLOADED, message)
        model.unloading = self._spawn(self._stop_all(self._cancel_restarts(model), workers))
        log.info("model %s UNLOADED after %g s without requests", model.uid, model.idle_unload_s)

    async def _stop_all(self, restarting: list[asyncio.Task], workers: list[WorkerProcess]) -> None:
        if restarting:
            await asyncio.wait(restarting)
        await asyncio.gather(*(worker.stop() for worker in workers))

    async def _reload(self, model: LaunchedModel) -> None:
        if model.unloading is not None:
            await asyncio.wait({model.unloading})  # the old worker is gone before the new starts
            model.unloading = None
        await self._load(model)

    async def _ready_within(self, model: LaunchedModel, deadline: float | None) -> None:
        """For a Generate: an UNLOADED model is loaded again (one reload, shared by every caller),
        and waited for within the caller's own deadline."""
        if model.state is ModelState.UNLOADED:
            self._transition(model, ModelState.LOADING, Why.RELOADING, "a Generate arrived")
            model.loading = self._spawn(self._reload(model))
        if model.state is not ModelState.LOADING or model.condition.reason != Why.RELOADING:
            return
        assert model.loading is not None
        # Give up a little before the deadline, so the caller hears why (and when to retry).
        remaining = max(deadline - time.time() - ANSWER_MARGIN_S, 0.0) if deadline is not None else None
        done, _ = await asyncio.wait({model.loading}, timeout=remaining)
        if not done:
            raise Unavailable(
                f"model {model.uid} is loading again after an idle unload and was not READY within "
                "the call's deadline; retry",
                reason=Reason.MODEL_LOADING,
                retry_after_s=LOADING_RETRY_AFTER_S,
                metadata={"model_uid": model.uid},
            )

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
            await self._check_hubs(selection, request.download_hub)
        words = placement.GpuWords(model.device, request.n_gpu, request.gpu_idx)
        inventory = await self._gpu_inventory(info.name, words)
        on_gpus = placement.uses_gpus(words, inventory, info.name)
        model.selection = selection
        need = await asyncio.to_thread(self._estimate_need, selection, request, on_gpus)
        # No await from here until this launch is counted in: concurrent launches each see
        # the others' reservations (see _loading_reservations).
        if on_gpus:
            placed = placement.place_replicas(
                info,
                words,
                request.engine_options,
                need,
                inventory,
                self._loading_reservations(),
                _label(selection),
                request.replica,
            )
        else:
            free = max(resources.free_cpu_bytes() - self._loading_reservations().get(CPU, 0), 0)
            what = f"{request.replica} replicas of " if request.replica > 1 else ""
            resources.check_fits(need.total_bytes * request.replica, free, what + _label(selection), "cpu")
            placed = [placement.Placement(engine_options=request.engine_options)] * request.replica
        python = self.availability.python_for(info.name)
        for replica, place in zip(model.replicas, placed, strict=True):
            replica.device = place.device
            replica.gpu_reserved_bytes = dict(place.reserved_bytes)
            replica.estimated_bytes = sum(place.reserved_bytes.values()) or need.total_bytes
            plan = LoadPlan(
                model_uid=model.uid,
                engine=info.name,
                spec=selection.spec.ref(selection.family.model_name, selection.quantization),
                device="cuda:0" if place.gpus else "cpu",  # the worker sees its GPUs numbered from 0
                gpu_count=len(place.gpus),
                cache_dir=str(settings.cache_dir),
                max_batch_size=settings.max_running_requests,
                model_path=request.model_path,
                engine_options=dict(place.engine_options),
                download_hub=request.download_hub or hubs.AUTO,
                hub_cache_dir=str(settings.hub_cache_dir or ""),
            )
            env = worker_environment(
                settings,
                info.cpu_environment if plan.device == "cpu" else (),
                hub_credentials=_may_download(plan),
            )
            replica.new_worker = functools.partial(
                WorkerProcess, plan, python, place.visible_devices, tracer=self.tracer, env=env
            )
        model.device = model.replicas[0].device
        model.estimated_bytes = sum(replica.estimated_bytes for replica in model.replicas)

    # Downloads.

    async def download(self, request: DownloadRequest) -> AsyncIterator[worker_pb2.DownloadResponse]:
        """Fetch a spec's weights in a short-lived worker process (this process never imports a hub
        client's heavy dependencies): its progress, then the model_path. Leaving early stops it."""
        reasons = await self.availability.reasons()

        def runnable_or_first(engines: tuple[str, ...]) -> str:
            # Only the engine's environment is used (its interpreter runs the download).
            return next((engine for engine in engines if reasons.get(engine) is None), engines[0])

        selection = self.registry.select(request.query, runnable_or_first)
        await self._check_hubs(selection, request.download_hub)
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
        await self._ready_within(model, deadline)
        self._require_ready(model)
        if request.messages:
            _check_chat_abilities(model, request)
        wants_tool_calls = bool(request.tools) and request.tool_choice != "none"
        answer: list[str] = []
        if not request.HasField("max_tokens"):  # the caller's message stays as it was sent
            resolved = generate_pb2.GenerateRequest()
            resolved.CopyFrom(request)
            resolved.max_tokens = self.settings.default_max_tokens
            request = resolved
        queued = time.monotonic()
        async with model.gate.slot(model.uid, request.priority):
            self.metrics.observe_queue_time(model.uid, time.monotonic() - queued)
            replica = self._ready_replica(model)
            assert replica.worker is not None
            replica.in_flight += 1
            try:
                async for response in replica.worker.generate(request, request_id, deadline):
                    if wants_tool_calls:  # a whole answer of calls becomes tool_calls
                        answer.append(response.text)
                        if response.finish_reason == generate_pb2.FINISH_REASON_STOP:
                            attach_tool_calls(response, "".join(answer), request.tools)
                    yield response
            except LlmgrpcError:
                if model.ending is not None:  # the stream broke because the model is going away
                    raise model.ending(model.uid) from None
                raise
            finally:
                replica.in_flight -= 1
                model.last_active = time.monotonic()

    async def tokenize(
        self, request: generate_pb2.TokenizeRequest, timeout: float | None
    ) -> generate_pb2.TokenizeResponse:
        model = await self._ready_for_call(request.model_uid, timeout)
        worker = self._ready_replica(model).worker
        assert worker is not None
        return await worker.tokenize(request, timeout)

    async def detokenize(
        self, request: generate_pb2.DetokenizeRequest, timeout: float | None
    ) -> generate_pb2.DetokenizeResponse:
        model = await self._ready_for_call(request.model_uid, timeout)
        worker = self._ready_replica(model).worker
        assert worker is not None
        return await worker.detokenize(request, timeout)

    # Internals.

    async def _ready_for_call(self, model_uid: str, timeout: float | None) -> LaunchedModel:
        """A READY model for a call that does not decode (it takes no admission slot)."""
        model = self.get(model_uid)
        await self._ready_within(model, time.time() + timeout if timeout is not None else None)
        self._require_ready(model)
        model.last_active = time.monotonic()
        return model

    def _ready_replica(self, model: LaunchedModel) -> Replica:
        """The replica a call goes to (see LaunchedModel.pick_replica); the model must be READY."""
        self._require_ready(model)
        replica = model.pick_replica()
        assert replica is not None, "a READY model has a READY replica"
        return replica

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

    async def _watch(self, model: LaunchedModel, replica: Replica) -> None:
        """While the replica is READY, ping its worker every worker_ping_interval_s: one that does
        not answer within worker_ping_timeout_s (frozen, swapping) stops taking requests, and
        makes the model's health NOT_SERVING when no other replica answers, until it answers
        again; one that exits is handled by _replica_died."""
        worker, settings = replica.worker, self.settings
        assert worker is not None
        exited = asyncio.ensure_future(worker.wait())

        def watched() -> bool:
            return replica.state is ModelState.READY and replica.worker is worker

        try:
            while watched():
                await asyncio.wait({exited}, timeout=settings.worker_ping_interval_s)
                if exited.done() or not watched():
                    break
                try:
                    replica.engine_stats = await worker.stats(timeout=settings.worker_ping_timeout_s)
                except Exception:
                    if not replica.unresponsive and watched() and not exited.done():
                        replica.unresponsive = True
                        replica.error = (
                            f"the worker process did not answer within {settings.worker_ping_timeout_s:g} s"
                        )
                        self._health(health_name(model.uid), model.serves)
                        log.warning("model %s replica %d: %s", model.uid, replica.index, replica.error)
                    continue
                if replica.unresponsive and watched():
                    replica.unresponsive, replica.error = False, ""
                    self._health(health_name(model.uid), model.serves)
                    log.info("model %s replica %d: its worker answers again", model.uid, replica.index)
            if exited.done() and watched() and model.state is ModelState.READY:
                self._replica_died(model, replica, worker)
        finally:
            exited.cancel()

    async def _check_hubs(self, selection: Selection, download_hub: str) -> None:
        """Refuse, before any worker starts, a hub download that cannot happen in the environment
        of the engine whose worker would fetch it."""
        spec = selection.spec
        if not spec.generator:
            reasons = await self.availability.hub_reasons(selection.engine)
            hubs.hub_order([hub.name for hub in spec.hubs], download_hub, reasons)

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

    async def _gpu_inventory(self, engine: str, words: placement.GpuWords) -> list[placement.Gpu]:
        """The GPUs engine's environment sees, free memory read now (none asked for on the CPU)."""
        if words.device == "cpu":
            return []
        return [placement.Gpu.from_report(gpu) for gpu in await self.availability.cuda_devices(engine)]

    def _loading_reservations(self) -> dict[int | str, int]:
        """What models still LOADING will take, per GPU index (and CPU): not yet allocated, so
        not yet missing from what the devices report free."""
        reserved: dict[int | str, int] = {}
        for other in self._models.values():
            for replica in other.replicas:
                if replica.state is not ModelState.LOADING or other.state is ModelState.TERMINATING:
                    continue
                if replica.gpu_reserved_bytes:
                    for index, taken in replica.gpu_reserved_bytes.items():
                        reserved[index] = reserved.get(index, 0) + taken
                else:
                    reserved[CPU] = reserved.get(CPU, 0) + replica.estimated_bytes
        return reserved

    def _estimate_need(
        self, selection: Selection, request: LaunchRequest, on_gpus: bool
    ) -> placement.ModelNeed:
        """Weights at the chosen dtype, an overhead factor, and the KV cache of one full context
        when the model's configuration is on disk (local weights, or a generated model)."""
        device = "cuda" if on_gpus else "cpu"
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
        need = placement.ModelNeed(weights, overhead=self.settings.memory_overhead)
        # A folder of Hugging Face weights: the caller's own must have a sound config.json (a
        # generated model's has one once it is generated).
        has_config = (
            local is not None
            and local.is_dir()
            and (bool(request.model_path) or (local / CONFIG_FILE).is_file())
        )
        if "kv_cache_memory_bytes" in request.engine_options:  # an engine told its KV cache size
            return dataclasses.replace(need, kv_bytes=int(request.engine_options["kv_cache_memory_bytes"]))
        if not has_config:
            return need
        assert local is not None
        config = read_model_config(local)
        context = int(
            request.engine_options.get("context_length")
            or request.engine_options.get("max_model_len")
            or min(
                config.get("max_position_embeddings", 0) or selection.family.context_length,
                selection.family.context_length,
            )
        )
        return dataclasses.replace(
            need,
            kv_bytes=resources.kv_cache_bytes(config, context, dtype),
            attention_heads=int(config.get("num_attention_heads") or 0),
        )


def _check_chat_abilities(model: LaunchedModel, request: generate_pb2.GenerateRequest) -> None:
    """Messages need a model with the chat ability, tools one with the tools ability."""
    assert model.selection is not None
    family = model.selection.family
    needed = {"messages": "chat", "tools": "tools"}
    for field_name, ability in needed.items():
        if getattr(request, field_name) and ability not in family.abilities:
            abilities = ", ".join(family.abilities) or "none"
            raise InvalidArgument(
                f"model {model.uid} is a {family.model_name} model, whose abilities are {abilities}: it "
                f"cannot take {field_name} (that needs the {ability} ability, e.g. llama-3.1-instruct)",
                [FieldViolation(field_name, f"model {model.uid} has no {ability} ability ({abilities})")],
                reason=Reason.INVALID_FIELD,
                metadata={"model_uid": model.uid},
            )


def _may_download(plan: LoadPlan) -> bool:
    """Whether a worker may fetch weights from a hub (and so needs the hub tokens)."""
    return not plan.model_path and not plan.spec.generator


def _failure(error: BaseException) -> str:
    """Why a load failed, for people."""
    return str(error) if isinstance(error, LlmgrpcError) else f"{type(error).__name__}: {error}"


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
