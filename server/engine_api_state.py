"""What the vLLM engine contract reports, read from the launched model: route, health, facts, load.

Owner: the vLLM engine contract (``llmgrpc.server.engine_api``). Pure functions of the
server's real state (a ``LaunchedModel``, its worker's ``DescribeResponse``), so the
servicer only fetches that state and sends what these give.

Routing: the contract has no model field, so each listener serves one model. The main port
serves the one launched model that has no listener of its own; a model launched with
``engine_api_port`` (the models file's word, or the ``engine_api_ports`` setting) is served
on that port alone. A main port with no such model, or with several, answers health false
and Generate FAILED_PRECONDITION saying so.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass

from smg_grpc_proto.generated import vllm_engine_pb2 as pb

from llmgrpc.clients.errors import FailedPrecondition, Reason
from llmgrpc.server.launched import LaunchedModel, ModelState, Why
from llmgrpc.server.manager import EngineManager
from llmgrpc.worker.v1 import worker_pb2

SERVER_TYPE = "llmgrpc"


@dataclass(frozen=True)
class Route:
    """Which model a listener serves: model_uid's, or (None: the main port) the one launched model
    that has no listener of its own (own_listeners: the uids that have one)."""

    model_uid: str | None
    own_listeners: frozenset[str] = frozenset()

    def model(self, manager: EngineManager) -> LaunchedModel:
        if self.model_uid is not None:
            return manager.get(self.model_uid)
        served = [model for model in manager.list() if model.uid not in self.own_listeners]
        if len(served) == 1:
            return served[0]
        if not served:
            raise FailedPrecondition(
                "no model is launched for this port: launch one (its uid then answers the vLLM engine "
                "contract here)",
                reason=Reason.MODEL_NOT_FOUND,
            )
        uids = ", ".join(sorted(model.uid for model in served))
        raise FailedPrecondition(
            f"{len(served)} models are launched ({uids}) and the vLLM engine contract names none: the "
            "main port serves a server's only model; give each model its own listener with "
            "engine_api_port (models file) or the engine_api_ports setting",
            reason=Reason.MODEL_NOT_FOUND,
        )


def health(model: LaunchedModel, draining: bool) -> tuple[bool, str]:
    """Whether the model can take a request now, and why. An UNLOADED model can (the request
    reloads it), as can one reloading for a request; one loading, restarting, failed or
    stopping cannot, nor can any while the server drains."""
    if draining:
        return False, "the server is draining: send requests to another worker"
    state, reason = model.state, model.condition.reason
    if state is ModelState.READY:
        if model.serves:
            return True, f"model {model.uid} is READY"
        return False, f"model {model.uid} is READY but no replica answers its pings"
    if state is ModelState.UNLOADED:
        return True, f"model {model.uid} is UNLOADED after idling; the next request loads it again"
    if state is ModelState.LOADING and reason == Why.RELOADING:
        return True, f"model {model.uid} is loading again for a request; requests wait for it"
    detail = f": {model.error}" if model.error else ""
    return False, f"model {model.uid} is {state.name} ({reason}){detail}"


def model_info(model: LaunchedModel, description: worker_pb2.DescribeResponse) -> pb.GetModelInfoResponse:
    """GetModelInfo from the launched model and its worker's description of its vocabulary."""
    context_length = int(model.engine_stats.context_length)
    return pb.GetModelInfoResponse(
        model_path=description.model_path,
        is_generation=True,
        max_context_length=context_length,
        vocab_size=description.vocab_size,
        supports_vision=False,
        served_model_name=model.uid,
        tokenizer_path=description.tokenizer_dir,
        model_type=description.model_type,
        architectures=description.architectures,
        eos_token_ids=description.eos_token_ids,
        pad_token_id=description.pad_token_id,
        bos_token_id=description.bos_token_id,
        # A prompt leaves room for at least one generated token.
        max_req_input_len=max(context_length - 1, 0),
    )


def server_info(model: LaunchedModel, started: float, last_receive: float, draining: bool):
    """GetServerInfo: the model's admission numbers (max_num_seqs: the requests it decodes at once)."""
    return pb.GetServerInfoResponse(
        active_requests=model.gate.running + model.gate.waiting,
        is_paused=draining,
        last_receive_timestamp=last_receive,
        uptime_seconds=time.monotonic() - started,
        server_type=SERVER_TYPE,
        data_parallel_size=1,
        max_num_seqs=model.gate.max_running,
    )


def loads(model: LaunchedModel, kv_cache_usage: float) -> pb.GetLoadsResponse:
    """GetLoads: running and waiting from the admission gate, KV usage as the engine reports it."""
    gate = model.gate
    return pb.GetLoadsResponse(
        timestamp=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        version=SERVER_TYPE,
        dp_rank_count=1,
        loads=[
            pb.SchedulerLoad(
                dp_rank=0,
                num_running_reqs=gate.running,
                num_waiting_reqs=gate.waiting,
                num_total_reqs=gate.running + gate.waiting,
                token_usage=kv_cache_usage,
                max_running_requests=gate.max_running,
            )
        ],
    )


@dataclass(eq=False)
class AbortableCall:
    """One Generate call as Abort sees it: its task, and whether it is at its yield (gRPC is
    sending a response, or about to resume it) or inside its own awaits."""

    task: asyncio.Task
    sending: bool = False
    aborted: bool = False

    def abort(self) -> None:
        self.aborted = True
        # A cancel lands where the task waits. Inside the call's own awaits it ends the call, whose
        # handler turns it into CANCELLED; inside gRPC's send it would end the RPC's task with no
        # status at all, the caller waiting out its deadline. At its yield the call checks instead.
        if not self.sending:
            self.task.cancel()

    def check(self) -> None:
        """After each response sent: end the call if Abort came while it was sent."""
        if self.aborted:
            raise asyncio.CancelledError


class Aborts:
    """The Generate calls in flight by the gateway's request id, so Abort can stop them: an
    aborted call ends, which closes its streams to the engine (the engine drops the request at its
    next step)."""

    def __init__(self) -> None:
        self._calls: dict[str, set[AbortableCall]] = {}

    @contextlib.contextmanager
    def watch(self, request_id: str) -> Iterator[AbortableCall]:
        task = asyncio.current_task()
        assert task is not None
        call = AbortableCall(task)
        self._calls.setdefault(request_id, set()).add(call)
        try:
            yield call
        finally:
            calls = self._calls.get(request_id, set())
            calls.discard(call)
            if not calls:
                self._calls.pop(request_id, None)

    def abort(self, request_ids: list[str]) -> int:
        """End the calls of these request ids; how many there were (unknown ids are ignored: the
        request may have finished as the gateway asked)."""
        calls = [call for request_id in request_ids for call in self._calls.get(request_id, ())]
        for call in calls:
            call.abort()
        return len(calls)
