"""KServe v2 / Open Inference Protocol (Triton's gRPC API), served over llmgrpc's models.

Owner: the KServe v2 servicer. Each inference is converted (``kserve_convert``) into a
``GenerateRequest`` handed to the same ``EngineManager.generate`` the llmgrpc.v1
GenerateService calls, so both protocols share admission, deadlines, cancellation and
metrics; errors raised here or there become statuses in the interceptor. The repository
RPCs are LaunchModel and TerminateModel.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from importlib.metadata import PackageNotFoundError, version

import grpc

from llmgrpc.clients.errors import LlmgrpcError
from llmgrpc.kserve.v2 import grpc_service_pb2 as pb
from llmgrpc.kserve.v2 import grpc_service_pb2_grpc as pb_grpc
from llmgrpc.server import logs
from llmgrpc.server.kserve_convert import (
    EXTENSIONS,
    FINAL_RESPONSE,
    MODEL_VERSION,
    STREAM,
    TRITON_STATES,
    Inference,
    invalid_inference,
    launch_request,
    model_metadata,
)
from llmgrpc.server.launched import ModelState
from llmgrpc.server.manager import EngineManager
from llmgrpc.server.metrics import Metrics
from llmgrpc.server.validation import check_model_uid

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name


def _server_version() -> str:
    try:
        return version("llmgrpc")
    except PackageNotFoundError:
        return "unknown"


class KServeServicer(pb_grpc.GRPCInferenceServiceServicer):
    """GRPCInferenceService: each RPC converts at the boundary and calls the manager."""

    def __init__(
        self,
        manager: EngineManager,
        metrics: Metrics,
        server_ready: Callable[[], bool],
        *,
        max_stream_pending: int,
    ):
        self.manager = manager
        self.metrics = metrics
        self.server_ready = server_ready
        self.max_stream_pending = max_stream_pending  # per ModelStreamInfer call (settings)

    async def _answers(
        self, inference: Inference, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ModelInferResponse]:
        """One request's responses: a piece per settled text (stream), else the whole text."""
        pieces = [inference.request.prompt] if inference.prepend_prompt else []
        async for response in self.manager.generate(inference.request, context.time_remaining()):
            if response.finish_reason:
                text = response.text if inference.stream else "".join(pieces) + response.text
                for answer in inference.answers(response, text):
                    yield answer
                return
            if inference.stream:
                if response.text:
                    yield inference.response(response.text, **{FINAL_RESPONSE: False})
            else:
                pieces.append(response.text)

    async def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=self.server_ready())

    async def ModelReady(self, request, context):
        # As Triton: a model it does not know is simply not ready.
        model = next((m for m in self.manager.list() if m.uid == request.name), None)
        return pb.ModelReadyResponse(ready=model is not None and model.state is ModelState.READY)

    async def ServerMetadata(self, request, context):
        return pb.ServerMetadataResponse(name="llmgrpc", version=_server_version(), extensions=EXTENSIONS)

    async def ModelMetadata(self, request, context):
        check_model_uid(request.name)
        return model_metadata(self.manager.get(request.name))

    async def ModelInfer(self, request, context):
        inference = Inference.from_pb(request)
        if inference.stream:
            raise invalid_inference(
                f"inputs[{STREAM}]", "true needs ModelStreamInfer: ModelInfer answers once"
            )
        answers = [answer async for answer in self._answers(inference, context)]
        return answers[0]

    async def ModelStreamInfer(self, request_iterator, context):
        """Each request starts a generation once read; their responses interleave, each carrying
        its request's id. A request that fails answers error_message and the stream goes on; the
        call's end (cancel, deadline) cancels every generation, which aborts it in the engine.

        Backpressure: at most max_stream_pending requests are in progress and as many answers
        wait to be sent; beyond, the caller's next request is read only once it has read answers
        (its writes then wait in gRPC's flow control). A caller that writes and never reads
        holds a bounded amount of the server's memory, until the unread-stream timeout ends it.
        """
        outbox: asyncio.Queue = asyncio.Queue(self.max_stream_pending)
        room = asyncio.Semaphore(self.max_stream_pending)  # for requests in progress
        done = object()
        generations: set[asyncio.Task] = set()

        async def run(request: pb.ModelInferRequest, number: int) -> None:
            logs.adopt_part_id(number)  # this task's: each request of the stream has its own id
            try:
                inference = Inference.from_pb(request)
                async for answer in self._answers(inference, context):
                    await outbox.put(pb.ModelStreamInferResponse(infer_response=answer))
            except LlmgrpcError as error:
                failed = pb.ModelInferResponse(model_name=request.model_name, id=request.id)
                await outbox.put(pb.ModelStreamInferResponse(error_message=str(error), infer_response=failed))
            finally:
                room.release()

        async def read() -> None:
            try:
                number = 0
                requests = aiter(request_iterator)
                while True:
                    await room.acquire()  # the next request is read only with room for it
                    request = await anext(requests, done)
                    if request is done:
                        break
                    number += 1
                    task = asyncio.create_task(run(request, number))
                    generations.add(task)
                    task.add_done_callback(generations.discard)
                while generations:  # the caller has sent everything: finish what runs
                    await asyncio.gather(*list(generations))
                await outbox.put(done)
            except Exception as error:  # a message that does not parse: the call fails
                await outbox.put(error)

        reader = asyncio.create_task(read())
        try:
            while (item := await outbox.get()) is not done:
                if isinstance(item, Exception):
                    raise item
                yield item
        finally:
            for task in (reader, *generations):
                task.cancel()

    async def ModelStatistics(self, request, context):
        models = [self.manager.get(request.name)] if request.name else self.manager.list()
        return pb.ModelStatisticsResponse(model_stats=[self._statistics(model) for model in models])

    def _statistics(self, model) -> pb.ModelStatistics:
        """Finished requests of every protocol, from the server's own metrics."""

        def sample(name: str) -> float:
            value = self.metrics.registry.get_sample_value(name, {"model_uid": model.uid})
            return value or 0.0

        count = int(sample("llmgrpc:e2e_request_latency_seconds_count"))
        seconds = sample("llmgrpc:e2e_request_latency_seconds_sum")
        last = time.time() - (time.monotonic() - model.last_active) if count else 0.0
        success = pb.StatisticDuration(count=count, ns=int(seconds * 1e9))
        return pb.ModelStatistics(
            name=model.uid,
            version=MODEL_VERSION,
            last_inference=int(last * 1000),
            inference_count=count,
            execution_count=count,
            inference_stats=pb.InferStatistics(success=success),
        )

    async def RepositoryIndex(self, request, context):
        models = [
            pb.RepositoryIndexResponse.ModelIndex(
                name=model.uid,
                version=MODEL_VERSION,
                state=TRITON_STATES.get(model.state, model.state.name),
                reason=model.state.name + (f": {model.error}" if model.error else ""),
            )
            for model in self.manager.list()
            if not request.ready or model.state is ModelState.READY
        ]
        return pb.RepositoryIndexResponse(models=models)

    async def RepositoryModelLoad(self, request, context):
        check_model_uid(request.model_name)
        await self.manager.launch(launch_request(request))
        return pb.RepositoryModelLoadResponse()

    async def RepositoryModelUnload(self, request, context):
        check_model_uid(request.model_name)
        await self.manager.terminate(request.model_name)
        return pb.RepositoryModelUnloadResponse()
