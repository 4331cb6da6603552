"""The calls a launched model answers, routed to one of its READY replicas: Generate through
the model's admission gate (a bounded batch and a bounded queue), Tokenize and Detokenize
without one. A call to an idle-unloaded model reloads it first, within the caller's deadline.

Every protocol's Generate passes here, so its metrics (queue time, tokens, latencies, finish
reasons) are recorded here alone; the servicers only convert."""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator

from google.protobuf.message import Message

from llmgrpc.clients.errors import (
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    LlmgrpcError,
    Reason,
    Unavailable,
)
from llmgrpc.engines.chat import attach_tool_calls
from llmgrpc.server.launched import LaunchedModel, ModelState, Replica
from llmgrpc.server.metrics import Metrics
from llmgrpc.server.models.adapters import ServedAdapter
from llmgrpc.server.models.lifecycle import LOADING_RETRY_AFTER_S, Lifecycle
from llmgrpc.server.models.table import ModelTable
from llmgrpc.server.worker_client import WorkerProcess
from llmgrpc.v1 import generate_pb2
from llmgrpc.worker.v1 import worker_pb2


class Routing:
    def __init__(self, table: ModelTable, lifecycle: Lifecycle, metrics: Metrics):
        self.table = table
        self.lifecycle = lifecycle
        self.metrics = metrics

    def generate(
        self, request: generate_pb2.GenerateRequest, timeout: float | None
    ) -> AsyncIterator[generate_pb2.GenerateResponse]:
        """The request's stream from a READY replica, timed and counted (Metrics.track_generation)
        here, where every protocol's Generate passes, and nowhere else."""
        responses = self._generate(request, timeout)
        return self.metrics.track_generation(request.model_uid, responses, request.adapter)

    async def _generate(
        self, request: generate_pb2.GenerateRequest, timeout: float | None
    ) -> AsyncIterator[generate_pb2.GenerateResponse]:
        # The caller's deadline as a moment (wall clock: the worker is another process), so that
        # time spent waiting for admission counts against it.
        deadline = time.time() + timeout if timeout is not None else None
        model = self.table.get(request.model_uid)
        await self.lifecycle.ready_within(model, deadline)
        self._require_ready(model)
        if request.messages:
            _check_chat_abilities(model, request)
        queued = time.monotonic()
        # Counted from here, queued or decoding: UnloadAdapter refuses while any stream of it is in flight.
        with model.adapters.stream(request.adapter, model.uid) as adapter:
            in_slot = self._generate_in_slot(model, request, deadline, queued, adapter)
            async with contextlib.aclosing(in_slot) as responses:
                async for response in responses:
                    yield response

    async def _generate_in_slot(
        self,
        model: LaunchedModel,
        request: generate_pb2.GenerateRequest,
        deadline: float | None,
        queued: float,
        adapter: ServedAdapter | None,
    ) -> AsyncIterator[generate_pb2.GenerateResponse]:
        wants_tool_calls = bool(request.tools) and request.tool_choice != "none"
        answer: list[str] = []
        async with model.gate.slot(model.uid, request.priority):
            self.metrics.observe_queue_time(model.uid, time.monotonic() - queued)
            replica = self._ready_replica(model)
            assert replica.worker is not None
            replica.in_flight += 1
            if adapter is not None:
                adapter.decoding(True)
            try:
                async for response in replica.worker.generate(request, deadline):
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
                if adapter is not None:
                    adapter.decoding(False)
                model.last_active = time.monotonic()

    async def call_model(self, request: Message, timeout: float | None) -> Message:
        """A public call the model answers without decoding (Tokenize, ...; worker.model_calls),
        by a READY replica: request names the model in its model_uid."""
        return await (await self._ready_worker(request.model_uid, timeout)).call_model(request, timeout)

    async def describe(self, model_uid: str, timeout: float | None) -> worker_pb2.DescribeResponse:
        """The model's vocabulary facts and tokenizer folder, from a READY replica's worker."""
        return await (await self._ready_worker(model_uid, timeout)).describe(timeout)

    async def _ready_worker(self, model_uid: str, timeout: float | None) -> WorkerProcess:
        model = await self._ready_for_call(model_uid, timeout)
        worker = self._ready_replica(model).worker
        assert worker is not None
        return worker

    async def kv_events(self, model_uid: str, start_sequence_number: int) -> list[AsyncIterator[bytes]]:
        """The prefix-cache event streams of the model's READY replicas, by replica index (each a
        serialized smg KvEventBatch per batch; see worker.kv_events)."""
        model = await self._ready_for_call(model_uid, None)
        ready = [replica for replica in model.replicas if replica.state is ModelState.READY]
        return [
            replica.worker.kv_events(start_sequence_number)
            for replica in sorted(ready, key=lambda replica: replica.index)
            if replica.worker is not None
        ]

    async def _ready_for_call(self, model_uid: str, timeout: float | None) -> LaunchedModel:
        """A READY model for a call that does not decode (it takes no admission slot)."""
        model = self.table.get(model_uid)
        await self.lifecycle.ready_within(model, time.time() + timeout if timeout is not None else None)
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
