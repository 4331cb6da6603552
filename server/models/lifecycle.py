"""A launched model's life: launch, load, watch, idle unload and reload, replica restarts,
terminate. Every transition of a model and of its replicas happens here.

A launch is admitted (``admission``) before anything starts, then runs in worker processes, one
per replica; ``launch`` returns once every replica is READY, or raises and leaves nothing
behind. The worker of a single-replica model that dies later marks its model FAILED and its
health NOT_SERVING; a replica of several whose worker dies is restarted, with a growing backoff,
while the others serve. While a model loads, its workers' progress events are kept for GetModel
and told to WatchModel's watchers.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator

from llmgrpc.clients.errors import Cancelled, LlmgrpcError, Reason, Unavailable
from llmgrpc.server.launched import (
    SETTLED,
    AdmissionGate,
    Condition,
    Ending,
    LaunchedModel,
    ModelState,
    Replica,
    Why,
    health_name,
    shutting_down,
    terminated,
)
from llmgrpc.server.metrics import Metrics
from llmgrpc.server.models.adapters import ModelAdapters
from llmgrpc.server.models.admission import Admission
from llmgrpc.server.models.requests import LaunchRequest
from llmgrpc.server.models.table import ModelTable
from llmgrpc.server.settings import Settings
from llmgrpc.server.worker_client import WorkerProcess
from llmgrpc.v1 import models_pb2
from llmgrpc.worker.v1 import worker_pb2

log = logging.getLogger(__name__)

# How long a caller should wait before retrying a model still loading.
LOADING_RETRY_AFTER_S = 5.0
# How long before a caller's deadline a Generate waiting for a reload gives up, to answer in time.
ANSWER_MARGIN_S = 0.1


class Lifecycle:
    def __init__(self, settings: Settings, table: ModelTable, admission: Admission, metrics: Metrics):
        self.settings = settings
        self.table = table
        self.admission = admission
        self.metrics = metrics

    async def launch(self, request: LaunchRequest) -> LaunchedModel:
        """Launch a model: listed LOADING at once, then checked, started and loaded. With
        request.wait, return once it is READY; a caller that goes away meanwhile stops the launch
        and leaves nothing behind. Without, return at once (WatchModel follows the load). A load
        that fails after the worker started leaves the model FAILED, listed with the reason."""
        self.table.check_free(request.model_uid)
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
                self.settings.max_running_requests * replicas,
                self.settings.max_waiting_requests * replicas,
                ageing_per_s=self.settings.priority_ageing_per_s,
            ),
            replicas=[Replica(index) for index in range(replicas)],
            idle_unload_s=idle_unload_s,
            adapters=ModelAdapters.at_launch(request.lora_modules, request.max_loras, request.max_lora_rank),
        )
        self.table.add(model)
        model.loading = self.table.spawn(self._launch(model, request))
        if not request.wait:
            return model
        try:
            await asyncio.shield(model.loading)
        except asyncio.CancelledError:
            if model.loading.cancelled() and model.ending is not None:  # terminated while loading
                raise _launch_ended(model.ending(uid)) from None
            if not model.loading.done():  # the caller went away: so does its launch
                self.table.spawn(self._end(model, terminated, Why.LAUNCH_ABANDONED))
            raise
        return model

    async def terminate(self, model_uid: str) -> LaunchedModel:
        """Stop a model (loading, serving, unloaded or failed) and free its uid. Its streams in
        flight end with UNAVAILABLE (MODEL_TERMINATED); a launch waiting on it with CANCELLED. The
        work is the manager's: it completes even when its caller goes away, and concurrent calls
        share it."""
        return await self._end(self.table.get(model_uid), terminated)

    async def close(self) -> None:
        """Stop every model; their calls in flight end with UNAVAILABLE (SHUTTING_DOWN)."""
        await asyncio.gather(
            *(self._end(model, shutting_down) for model in self.table.list()),
            return_exceptions=True,
        )
        await self.table.wait_background()

    async def watch(self, model_uid: str) -> AsyncIterator[models_pb2.ModelDescription]:
        """The model as it is, then as it is after each change of state or of load progress,
        until it settles (READY, FAILED, UNLOADED or TERMINATED). A watcher that reads slowly
        gets the latest description, those in between left out: its memory stays one message."""
        model = self.table.get(model_uid)
        changes: asyncio.Queue[models_pb2.ModelDescription] = asyncio.Queue(maxsize=1)
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
            model.terminating = self.table.spawn(self._terminate(model, why))
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
        self.table.forget(model)
        log.info("model %s terminated", model.uid)

    def _transition(self, model: LaunchedModel, state: ModelState, why: str, message: str = "") -> None:
        """Move model to state (its health follows: SERVING only when READY with a replica that
        answers) and tell its watchers."""
        model.condition = Condition(state, why, message)
        if state is ModelState.FAILED:
            model.error = message
        self.table.health(health_name(model.uid), model.serves)
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
                self.table.spawn(self._unload_when_idle(model))
        else:
            self.table.health(health_name(model.uid), model.serves)
            self._tell_watchers(model)

    def _tell_watchers(self, model: LaunchedModel) -> None:
        if model.watchers:
            description = model.to_pb()
            for changes in model.watchers:
                if changes.full():  # not yet read: the newer description replaces it
                    changes.get_nowait()
                changes.put_nowait(description)

    def _on_progress(self, model: LaunchedModel, progress: models_pb2.LoadProgress) -> None:
        model.progress.CopyFrom(progress)
        self._tell_watchers(model)

    async def _launch(self, model: LaunchedModel, request: LaunchRequest) -> None:
        """Check everything a launch needs, then start its worker and load. A launch refused by
        its checks is unlisted; one whose worker fails to load is FAILED (listed until terminated);
        one cancelled by TerminateModel stops its worker and is unlisted by the terminate."""
        try:
            await self.admission.check_and_place(model, request)
        except BaseException:
            if model.state is not ModelState.TERMINATING:  # Terminate unlists what it terminates
                self.table.forget(model)
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
            self.table.spawn(self._watch(model, replica))
        if model.idle_unload_s > 0:
            self.table.spawn(self._unload_when_idle(model))

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
            ranks = dict(replica.engine_stats.adapter_ranks)
            # Adapters loaded at run time are not in the plan: a restarted or reloaded worker gets them again.
            for module in model.adapters.missing_from(ranks):
                ranks[module.name] = await worker.load_adapter(module)
            model.adapters.loaded(ranks)
        except BaseException as error:
            await worker.stop()
            if not isinstance(error, asyncio.CancelledError):  # cancelled: whoever cancelled says
                failure = _failure(error)
                replica.condition = Condition(ModelState.FAILED, Why.LOAD_FAILED, failure)
                replica.error = failure
            raise
        replica.ready_since = time.monotonic()
        self._replica_transition(model, replica, ModelState.READY, Why.LOADED)

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
        replica.restarting = self.table.spawn(self._restart(model, replica, worker))

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
            self.table.spawn(self._watch(model, replica))
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
        model.unloading = self.table.spawn(self._stop_all(self._cancel_restarts(model), workers))
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

    async def ready_within(self, model: LaunchedModel, deadline: float | None) -> None:
        """For a Generate: an UNLOADED model is loaded again (one reload, shared by every caller),
        and waited for within the caller's own deadline."""
        if model.state is ModelState.UNLOADED:
            self._transition(model, ModelState.LOADING, Why.RELOADING, "a Generate arrived")
            model.loading = self.table.spawn(self._reload(model))
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
                        self.table.health(health_name(model.uid), model.serves)
                        log.warning("model %s replica %d: %s", model.uid, replica.index, replica.error)
                    continue
                if replica.unresponsive and watched():
                    replica.unresponsive, replica.error = False, ""
                    self.table.health(health_name(model.uid), model.serves)
                    log.info("model %s replica %d: its worker answers again", model.uid, replica.index)
            if exited.done() and watched() and model.state is ModelState.READY:
                self._replica_died(model, replica, worker)
        finally:
            exited.cancel()


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
