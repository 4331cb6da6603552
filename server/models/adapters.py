"""A launched model's LoRA adapters: which exist, their state and streams, and the run-time
LoadAdapter, UnloadAdapter and ListAdapters.

Every replica's worker holds every adapter: LoadAdapter loads it into each READY replica (a
replica that fails undoes it on the others), and a launch's ``lora_modules`` travel in each
replica's plan. Unloading never cuts a stream: while one is in flight the call is refused
(FAILED_PRECONDITION, ADAPTER_IN_USE, saying how many) and nothing changes; the caller
retries once they end. Refusing rather than waiting keeps UnloadAdapter's answer immediate and
lets the operator decide; streams that arrive after it are not held back.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from llmgrpc.clients.errors import AlreadyExists, FailedPrecondition, LlmgrpcError, Reason
from llmgrpc.engines.lora import DEFAULT_MAX_LORA_RANK, DEFAULT_MAX_LORAS, LoraModule, unknown_adapter
from llmgrpc.v1 import models_pb2

if TYPE_CHECKING:
    from llmgrpc.server.launched import LaunchedModel


class AdapterState(enum.Enum):
    LOADING = models_pb2.ADAPTER_STATE_LOADING
    READY = models_pb2.ADAPTER_STATE_READY


@dataclass
class ServedAdapter:
    """One adapter of a model, and its Generate streams in flight."""

    module: LoraModule
    state: AdapterState = AdapterState.LOADING
    rank: int = 0
    waiting: int = 0  # Generate streams queued for a batch slot
    running: int = 0  # and decoding

    @property
    def in_flight(self) -> int:
        return self.waiting + self.running

    def decoding(self, started: bool) -> None:
        """One of its streams got a batch slot (started), or gave it back."""
        step = 1 if started else -1
        self.waiting, self.running = self.waiting - step, self.running + step

    def to_pb(self, resident: bool) -> models_pb2.AdapterDescription:
        return models_pb2.AdapterDescription(
            name=self.module.name,
            path=self.module.path,
            scale=self.module.scale,
            state=self.state.value,
            rank=self.rank,
            resident=resident,
            running_requests=self.in_flight,
        )


@dataclass
class ModelAdapters:
    """The adapters of one model, in the order they were loaded, and its LoRA limits."""

    max_loras: int = DEFAULT_MAX_LORAS
    max_lora_rank: int = DEFAULT_MAX_LORA_RANK
    by_name: dict[str, ServedAdapter] = field(default_factory=dict)

    @classmethod
    def at_launch(cls, modules: tuple[LoraModule, ...], max_loras: int, max_lora_rank: int) -> ModelAdapters:
        return cls(max_loras, max_lora_rank, {module.name: ServedAdapter(module) for module in modules})

    def loaded(self, ranks: dict[str, int]) -> None:
        """The workers have loaded the launch's adapters: READY, with their ranks."""
        for adapter in self.by_name.values():
            if adapter.module.name in ranks:
                adapter.state, adapter.rank = AdapterState.READY, ranks[adapter.module.name]

    def missing_from(self, ranks: dict[str, int]) -> list[LoraModule]:
        """The READY adapters that a worker reporting ranks lacks (loaded after its plan was made)."""
        return [
            a.module
            for a in self.by_name.values()
            if a.state is AdapterState.READY and a.module.name not in ranks
        ]

    def ready(self, name: str, model_uid: str) -> ServedAdapter:
        """The READY adapter a request names, or NOT_FOUND naming those there are."""
        adapter = self.by_name.get(name)
        if adapter is None or adapter.state is not AdapterState.READY:
            known = [a.module.name for a in self.by_name.values() if a.state is AdapterState.READY]
            raise unknown_adapter(name, known, model_uid)
        return adapter

    @contextlib.contextmanager
    def stream(self, name: str, model_uid: str) -> Iterator[ServedAdapter | None]:
        """Count a Generate stream of adapter name (none for the base) as waiting while it lasts;
        ServedAdapter.decoding moves it to running while it has a batch slot."""
        if not name:
            yield None
            return
        adapter = self.ready(name, model_uid)
        adapter.waiting += 1
        try:
            yield adapter
        finally:
            adapter.waiting -= 1

    def busy(self) -> tuple[list[str], list[str]]:
        """The adapters with streams decoding, and those with streams queued."""
        adapters = self.by_name.values()
        return [a.module.name for a in adapters if a.running], [a.module.name for a in adapters if a.waiting]

    def to_pb(self, resident: set[str]) -> list[models_pb2.AdapterDescription]:
        return [adapter.to_pb(name in resident) for name, adapter in self.by_name.items()]


async def load_adapter(model: LaunchedModel, module: LoraModule) -> ServedAdapter:
    """Load an adapter into every READY replica of a READY model."""
    adapters = model.adapters
    if module.name in adapters.by_name:
        raise AlreadyExists(
            f"model {model.uid} already has an adapter {module.name!r}: unload it first, or pick "
            "another name",
            metadata={"model_uid": model.uid, "adapter": module.name},
        )
    workers = [replica.worker for replica in model.replicas if replica.serves and replica.worker is not None]
    if not workers:
        raise FailedPrecondition(
            f"model {model.uid} is {model.state.name}, not READY: adapters load into a READY model",
            reason=Reason.MODEL_LOADING,
            metadata={"model_uid": model.uid},
        )
    adapter = adapters.by_name[module.name] = ServedAdapter(module)
    try:
        ranks = await asyncio.gather(
            *(worker.load_adapter(module) for worker in workers), return_exceptions=True
        )
        failure = next((rank for rank in ranks if isinstance(rank, BaseException)), None)
        if failure is not None:
            for worker, rank in zip(workers, ranks, strict=True):
                if not isinstance(rank, BaseException):
                    with contextlib.suppress(LlmgrpcError):
                        await worker.unload_adapter(module.name)
            raise failure
    except BaseException:
        del adapters.by_name[module.name]
        raise
    adapter.state, adapter.rank = AdapterState.READY, int(ranks[0])
    return adapter


async def unload_adapter(model: LaunchedModel, name: str) -> ServedAdapter:
    """Remove an adapter no stream uses (see the module docstring) from every replica."""
    adapter = model.adapters.ready(name, model.uid)
    if adapter.in_flight:
        raise FailedPrecondition(
            f"adapter {name!r} of model {model.uid} has {adapter.in_flight} Generate streams in flight: "
            "unloading never cuts a stream, so retry once they have ended",
            reason=Reason.ADAPTER_IN_USE,
            metadata={"model_uid": model.uid, "adapter": name, "in_flight": str(adapter.in_flight)},
        )
    del model.adapters.by_name[name]  # no new stream can name it from here
    workers = [replica.worker for replica in model.replicas if replica.worker is not None]
    await asyncio.gather(*(worker.unload_adapter(name) for worker in workers), return_exceptions=True)
    return dataclasses.replace(adapter, waiting=0, running=0)
