"""A launched model and what the manager keeps of it: its state and how it got there, its
admission gate, its replicas (worker processes), and what its calls in flight get when it goes away.

The engine manager (``llmgrpc.server.manager``) owns these objects and every transition;
this module only says what they are.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import heapq
import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from llmgrpc.clients.errors import LlmgrpcError, Reason, ResourceExhausted, Unavailable
from llmgrpc.server import resources
from llmgrpc.server.models.adapters import ModelAdapters
from llmgrpc.server.registry import Selection, SpecQuery
from llmgrpc.server.worker_client import WorkerProcess
from llmgrpc.v1 import models_pb2
from llmgrpc.worker.v1 import worker_pb2

# How long a caller should wait before retrying a full queue.
QUEUE_RETRY_AFTER_S = 1.0


class ModelState(enum.Enum):
    LOADING = models_pb2.MODEL_STATE_LOADING
    READY = models_pb2.MODEL_STATE_READY
    FAILED = models_pb2.MODEL_STATE_FAILED
    TERMINATING = models_pb2.MODEL_STATE_TERMINATING
    UNLOADED = models_pb2.MODEL_STATE_UNLOADED
    TERMINATED = models_pb2.MODEL_STATE_TERMINATED


# The states a WatchModel stream ends in: nothing more happens without a new request.
SETTLED = frozenset({ModelState.READY, ModelState.FAILED, ModelState.UNLOADED, ModelState.TERMINATED})


class Why:
    """The stable reasons of a model's conditions (ModelCondition.reason)."""

    LAUNCH_REQUESTED = "LaunchRequested"
    LOADED = "Loaded"
    LOAD_FAILED = "LoadFailed"
    WORKER_EXITED = "WorkerExited"
    IDLE_UNLOADED = "IdleUnloaded"
    RELOADING = "Reloading"
    TERMINATE_REQUESTED = "TerminateRequested"
    LAUNCH_ABANDONED = "LaunchAbandoned"
    TERMINATED = "Terminated"
    RESTARTING = "Restarting"


@dataclass(frozen=True)
class Condition:
    """How a model came to its state, and when (wall clock)."""

    state: ModelState
    reason: str
    message: str = ""
    at: float = field(default_factory=time.time)

    def to_pb(self) -> models_pb2.ModelCondition:
        condition = models_pb2.ModelCondition(
            state=self.state.value, reason=self.reason, message=self.message
        )
        condition.transition_time.FromNanoseconds(int(self.at * 1e9))
        return condition


def progress_to_pb(progress: models_pb2.LoadProgress) -> models_pb2.LoadProgress:
    """A load's progress as the contract shows it: phase "starting" until the worker reports."""
    shown = models_pb2.LoadProgress()
    shown.CopyFrom(progress)
    shown.phase = progress.phase or "starting"
    return shown


class AdmissionGate:
    """At most max_running requests decoding and max_waiting queued; beyond, refuse.

    Queued requests are admitted by effective priority, lower first, first come first served
    among equals (vLLM's meaning of a request's priority). A request's effective priority is
    its priority less ageing_per_s for each second it has waited: once it has waited
    (its priority - theirs) / ageing_per_s seconds, it goes ahead of every more urgent request
    that arrives, so no stream of them holds it back for ever. A slot that frees goes straight
    to the next waiter, so a newcomer never overtakes the queue."""

    def __init__(self, max_running: int, max_waiting: int, *, ageing_per_s: float = 0.0):
        self.max_running = max_running
        self.max_waiting = max_waiting
        self.ageing_per_s = ageing_per_s
        self.running = 0
        # A heap of (order, arrival, admitted). Comparing two waiters' effective priorities,
        # p1 - a * (now - t1) against p2 - a * (now - t2), "now" cancels out: the order of
        # p + a * t, fixed at arrival, is their order at every moment.
        self._queue: list[tuple[float, int, asyncio.Future[None]]] = []
        self._arrivals = itertools.count()
        self._epoch = time.monotonic()

    @property
    def waiting(self) -> int:
        return len(self._queue)

    @contextlib.asynccontextmanager
    async def slot(self, model_uid: str, priority: int = 0):
        if self.running >= self.max_running and self.waiting >= self.max_waiting:
            raise ResourceExhausted(
                f"model {model_uid} is busy: {self.running} requests running and {self.waiting} waiting "
                f"(limits {self.max_running} and {self.max_waiting}); retry later",
                reason=Reason.QUEUE_FULL,
                retry_after_s=QUEUE_RETRY_AFTER_S,
                metadata={"model_uid": model_uid},
            )
        if self.running < self.max_running:
            self.running += 1
        else:
            await self._wait_for_slot(priority)
        try:
            yield
        finally:
            self._release()

    async def _wait_for_slot(self, priority: int) -> None:
        admitted: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        order = priority + self.ageing_per_s * (time.monotonic() - self._epoch)
        entry = (order, next(self._arrivals), admitted)
        heapq.heappush(self._queue, entry)
        try:
            await admitted
        except asyncio.CancelledError:
            if admitted.done() and not admitted.cancelled():
                self._release()  # handed a slot as the caller left: pass it on
            else:
                self._queue.remove(entry)
                heapq.heapify(self._queue)
            raise

    def _release(self) -> None:
        """A running request ended: its slot goes to the first waiter, else it is free."""
        while self._queue:
            _, _, admitted = heapq.heappop(self._queue)
            if not admitted.done():
                admitted.set_result(None)
                return
        self.running -= 1


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
class Replica:
    """One of a launched model's worker processes, holding a whole copy of the model.

    ``new_worker`` makes its worker (again: after an idle unload, or after the worker died)."""

    index: int
    device: str = ""
    condition: Condition = field(default_factory=lambda: Condition(ModelState.LOADING, Why.LAUNCH_REQUESTED))
    new_worker: Callable[[], WorkerProcess] | None = None
    worker: WorkerProcess | None = None
    gpu_reserved_bytes: dict[int, int] = field(default_factory=dict)  # per GPU index, while it loads
    estimated_bytes: int = 0
    engine_stats: worker_pb2.EngineStats = field(default_factory=worker_pb2.EngineStats)
    unresponsive: bool = False  # READY, but its worker has stopped answering pings
    error: str = ""
    in_flight: int = 0  # Generate streams it serves now
    restarts: int = 0  # times its worker was started again after dying
    failures_in_row: int = 0  # deaths without a long READY stretch between: the restart backoff
    ready_since: float = 0.0  # time.monotonic() of its last READY
    restarting: asyncio.Task | None = None  # waiting out the backoff, then loading again

    @property
    def state(self) -> ModelState:
        return self.condition.state

    @property
    def pid(self) -> int:
        return self.worker.pid if self.worker else 0

    @property
    def serves(self) -> bool:
        return self.state is ModelState.READY and not self.unresponsive

    def to_pb(self) -> models_pb2.ReplicaDescription:
        return models_pb2.ReplicaDescription(
            index=self.index,
            state=self.state.value,
            device=self.device,
            worker_pid=self.pid,
            restarts=self.restarts,
            running_requests=self.in_flight,
            condition=self.condition.to_pb(),
        )


@dataclass
class LaunchedModel:
    """One launch, listed from the moment it is asked for until it is terminated.

    ``selection`` is None while the launch is still being checked (the spec not yet chosen);
    ``ending`` is set once the model is being terminated: what its calls in flight get.
    ``replicas`` are its worker processes (one unless launched with ``replica``); the model is
    READY while one of them is, and its admission gate is shared by all of them."""

    uid: str
    query: SpecQuery
    device: str
    gate: AdmissionGate
    replicas: list[Replica] = field(default_factory=lambda: [Replica(0)])
    idle_unload_s: float = 0.0  # 0: never unloaded
    condition: Condition = field(default_factory=lambda: Condition(ModelState.LOADING, Why.LAUNCH_REQUESTED))
    last_active: float = field(default_factory=time.monotonic)  # when its last stream ended
    unloading: asyncio.Task | None = None  # stopping the workers of an UNLOADED model
    watchers: set[asyncio.Queue] = field(default_factory=set)  # WatchModel streams
    selection: Selection | None = None
    estimated_bytes: int = 0
    error: str = ""
    launched_at: float = field(default_factory=time.monotonic)
    load_seconds: float = 0.0
    progress: models_pb2.LoadProgress = field(default_factory=models_pb2.LoadProgress)
    loading: asyncio.Task | None = None
    terminating: asyncio.Task | None = None
    ending: Ending | None = None
    adapters: ModelAdapters = field(default_factory=ModelAdapters)

    def to_pb(self) -> models_pb2.ModelDescription:
        selection, stats, query = self.selection, self.engine_stats, self.query
        pid = self.worker.pid if self.worker else 0
        progress = progress_to_pb(self.progress) if self.state is ModelState.LOADING else None
        pids = [replica.pid for replica in self.replicas if replica.pid]
        return models_pb2.ModelDescription(
            model_uid=self.uid,
            model_name=selection.family.model_name if selection else query.model_name,
            model_engine=selection.engine if selection else query.model_engine,
            model_format=selection.spec.model_format if selection else query.model_format,
            size_in_billions=selection.spec.size_in_billions if selection else query.size_in_billions,
            quantization=selection.quantization if selection else query.quantization,
            state=self.state.value,
            device=self.device,
            memory_bytes=sum(resources.process_memory_bytes(pid) for pid in pids),
            gpu_memory_bytes=stats.gpu_memory_bytes,
            context_length=stats.context_length,
            running_requests=self.gate.running,
            waiting_requests=self.gate.waiting,
            error=self.error or self._replica_errors(),
            worker_pid=pid,
            peak_batch_size=stats.peak_batch_size,
            load_seconds=self.load_seconds,
            estimated_memory_bytes=self.estimated_bytes,
            progress=progress,
            condition=self.condition.to_pb(),
            idle_unload_s=self.idle_unload_s,
            replicas=[replica.to_pb() for replica in self.replicas],
            adapters=self.adapters.to_pb(set(self.replicas[0].engine_stats.resident_adapters)),
            max_loras=self.adapters.max_loras,
            max_lora_rank=self.adapters.max_lora_rank,
        )

    def _replica_errors(self) -> str:
        if len(self.replicas) == 1:
            return self.replicas[0].error
        return "; ".join(f"replica {r.index}: {r.error}" for r in self.replicas if r.error)

    @property
    def state(self) -> ModelState:
        return self.condition.state

    @property
    def worker(self) -> WorkerProcess | None:
        """The first replica's worker (the only one, unless launched with replicas)."""
        return self.replicas[0].worker

    @property
    def engine_stats(self) -> worker_pb2.EngineStats:
        """The engines' numbers over all replicas: memory summed, the rest from the largest."""
        stats = [replica.engine_stats for replica in self.replicas]
        return worker_pb2.EngineStats(
            context_length=max(s.context_length for s in stats),
            device=stats[0].device,
            running_requests=sum(s.running_requests for s in stats),
            peak_batch_size=max(s.peak_batch_size for s in stats),
            gpu_memory_bytes=sum(s.gpu_memory_bytes for s in stats),
            kv_cache_usage=sum(s.kv_cache_usage for s in stats) / len(stats),
            prefix_cache_queries=sum(s.prefix_cache_queries for s in stats),
            prefix_cache_hits=sum(s.prefix_cache_hits for s in stats),
        )

    @property
    def in_flight(self) -> int:
        return self.gate.running + self.gate.waiting

    @property
    def serves(self) -> bool:
        """Whether its health is SERVING: READY, and one of its replicas READY and answering."""
        return self.state is ModelState.READY and any(replica.serves for replica in self.replicas)

    def pick_replica(self) -> Replica | None:
        """The READY replica a request goes to: one answering pings before one that is not, then
        the fewest requests in flight, then the lowest index."""
        ready = [replica for replica in self.replicas if replica.state is ModelState.READY]
        return min(ready, key=lambda r: (r.unresponsive, r.in_flight, r.index), default=None)


# health(name, serving): tells the health service whether a model serves.
HealthUpdate = Callable[[str, bool], None]


def health_name(model_uid: str) -> str:
    """The grpc.health.v1 service name of a launched model."""
    return f"model/{model_uid}"
