"""The server's side of one worker process: start it, load, stream, stop."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import grpc
from google.protobuf import any_pb2, descriptor_pool, message_factory
from google.protobuf.message import Message
from opentelemetry.trace import SpanKind

from llmgrpc.clients.errors import Reason, Unavailable
from llmgrpc.engines.base import LoadPlan
from llmgrpc.engines.lora import LoraModule
from llmgrpc.server import generate_socket, logs, tracing
from llmgrpc.server.status import from_rpc_error
from llmgrpc.server.worker_exit import StderrTail, WorkerExit
from llmgrpc.v1 import generate_pb2, models_pb2
from llmgrpc.worker.v1 import worker_pb2, worker_pb2_grpc

# The span of a Generate stream's hop to the worker.
GENERATE_HOP = f"{worker_pb2.DESCRIPTOR.package}/Generate"

# Reconnect fast: the worker binds its socket moments after it starts.
CHANNEL_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 50),
    ("grpc.min_reconnect_backoff_ms", 50),
    ("grpc.max_reconnect_backoff_ms", 250),
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
]


def end_process_group(leader_pid: int) -> None:
    """Kill what is left of a stopped worker's process group (processes its engine library
    started and did not end). Nothing happens when the group is already empty."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(leader_pid, signal.SIGKILL)


def _request_id() -> tuple[tuple[str, str], ...]:
    """The metadata that gives a worker the request id of the call it serves (for its logs)."""
    request_id = logs.REQUEST_ID.get()
    return ((logs.REQUEST_ID_METADATA, request_id),) if request_id else ()


def _this_task_is_cancelled() -> bool:
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


class WorkerProcess:
    """One worker process and the gRPC channel to it over a Unix socket."""

    def __init__(
        self,
        plan: LoadPlan,
        python: str,
        visible_gpu: str | None = None,
        *,
        env: dict[str, str],
        tracer=None,
    ):
        self.plan = plan
        self.python = python
        self.visible_gpu = visible_gpu
        self.tracer = tracer
        self.env = env  # the worker's whole environment (worker_environment.worker_environment)
        self._folder = Path(tempfile.mkdtemp(prefix="llmgrpc-worker-"))
        self.socket_path = self._folder / "worker.sock"
        self.generate_streams = generate_socket.Streams(self._folder / "generate.sock", self.ended)
        self.process: asyncio.subprocess.Process | None = None
        self._stderr: StderrTail | None = None
        self.channel: grpc.aio.Channel | None = None
        self._stub: worker_pb2_grpc.WorkerServiceAsyncStub | None = None

    @property
    def pid(self) -> int:
        return self.process.pid if self.process and self.process.returncode is None else 0

    @property
    def exit(self) -> WorkerExit | None:
        """How the process ended (with what its stderr said last); None while it runs."""
        if self.process is None or self.process.returncode is None:
            return None
        return WorkerExit(self.process.returncode, self._stderr.text if self._stderr else "")

    @property
    def exit_reason(self) -> str:
        ended = self.exit
        return ended.message if ended else "the worker process is running"

    async def ended(self, within_s: float = 2.0) -> WorkerExit | None:
        """How the process ended, waiting at most within_s for it to end (a broken socket comes
        moments before the exit status); None if it still runs."""
        if self.process is None:
            return None
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.shield(self.wait()), within_s)
        return self.exit

    async def start(self, timeout_s: float) -> None:
        """Start the process and wait until its socket accepts connections."""
        env = dict(self.env)
        if self.visible_gpu is not None:
            env["CUDA_VISIBLE_DEVICES"] = self.visible_gpu
        self.process = await asyncio.create_subprocess_exec(
            self.python,
            "-m",
            "llmgrpc.worker",
            "--socket",
            str(self.socket_path),
            "--generate-socket",
            str(self.generate_streams.socket_path),
            "--plan",
            json.dumps(self.plan.to_json_dict()),
            stdin=asyncio.subprocess.PIPE,
            # Passed through to the server's stderr, its end kept for the exit's description.
            stderr=asyncio.subprocess.PIPE,
            env=env,
            # A process group of its own: what the engine library starts (vLLM's engine core
            # and workers) can be ended with the worker, and a terminal's Ctrl-C reaches only
            # the server, which then stops its workers in order.
            start_new_session=True,
        )
        assert self.process.stderr is not None
        self._stderr = StderrTail(self.process.stderr)
        deadline = time.monotonic() + timeout_s
        while not self.socket_path.exists():
            if self.process.returncode is not None:
                raise generate_socket.worker_died(await self.ended(), "before it started serving")
            if time.monotonic() > deadline:
                raise Unavailable(
                    f"the worker process did not start serving within {timeout_s:.0f} s",
                    reason=Reason.WORKER_UNAVAILABLE,
                )
            await asyncio.sleep(0.02)
        self.channel = grpc.aio.insecure_channel(f"unix:{self.socket_path}", options=CHANNEL_OPTIONS)
        self._stub = worker_pb2_grpc.WorkerServiceStub(self.channel)
        try:
            await asyncio.wait_for(self.channel.channel_ready(), max(deadline - time.monotonic(), 1.0))
        except asyncio.TimeoutError:
            raise Unavailable(
                "the worker process did not accept a connection in time", reason=Reason.WORKER_UNAVAILABLE
            ) from None

    async def load(self, on_progress: Callable[[models_pb2.LoadProgress], None]) -> worker_pb2.EngineStats:
        """Have the worker load its model; returns the engine's stats once it is ready."""
        call = self.stub.Load(worker_pb2.LoadRequest(), metadata=_request_id())
        async for event in self._relay(call):
            if event.HasField("stats"):
                return event.stats
            on_progress(event.progress)
        ended = await self.ended()
        if ended is not None:
            raise generate_socket.worker_died(ended, "while loading")
        raise Unavailable("the worker ended its load without a result", reason=Reason.WORKER_UNAVAILABLE)

    async def download(self) -> AsyncIterator[worker_pb2.DownloadResponse]:
        """Have the worker fetch its plan's weights, loading nothing: progress, then the model_path."""
        call = self.stub.Download(worker_pb2.DownloadRequest(), metadata=_request_id())
        async for event in self._relay(call):
            yield event

    async def generate(
        self, request: generate_pb2.GenerateRequest, deadline: float | None
    ) -> AsyncIterator[generate_pb2.GenerateResponse]:
        """Stream request from the worker (as the caller sent it: the worker resolves its defaults,
        see LoadPlan.default_max_tokens), under the request id of the call being served;
        deadline: the caller's, as a time.time() moment, which the worker and this side both keep."""
        call_request = worker_pb2.GenerateRequest(request=request, request_id=logs.request_id())
        if deadline is not None:
            call_request.deadline.FromNanoseconds(int(deadline * 1e9))
        # A CLIENT span for the hop to the worker (when traced); its context travels in the request.
        span = (
            tracing.current_span(
                self.tracer,
                GENERATE_HOP,
                kind=SpanKind.CLIENT,
                attributes={"llmgrpc.model_uid": self.plan.model_uid},
            )
            if self.tracer is not None
            else contextlib.nullcontext()
        )
        with span:
            if self.tracer is not None:
                call_request.trace_context.update(tracing.inject())
            async with contextlib.aclosing(self.generate_streams.stream(call_request, deadline)) as pieces:
                async for piece in pieces:
                    yield piece

    async def call_model(self, request: Message, timeout: float | None) -> Message:
        """The worker's answer to a public call the model serves (worker.model_calls), as the
        public response message it packed."""
        packed = any_pb2.Any()
        packed.Pack(request)
        call = self.stub.CallModel(
            worker_pb2.CallModelRequest(request=packed), timeout=timeout, metadata=_request_id()
        )
        answer = (await self._answer(call)).response
        response = message_factory.GetMessageClass(
            descriptor_pool.Default().FindMessageTypeByName(answer.TypeName())
        )()
        answer.Unpack(response)
        return response

    async def stats(self, timeout: float = 2.0) -> worker_pb2.EngineStats:
        return (await self._answer(self.stub.Stats(worker_pb2.StatsRequest(), timeout=timeout))).stats

    async def describe(self, timeout: float | None = None) -> worker_pb2.DescribeResponse:
        """The loaded model's vocabulary facts and tokenizer folder (see engines.model_facts)."""
        return await self._answer(self.stub.Describe(worker_pb2.DescribeRequest(), timeout=timeout))

    async def load_adapter(self, module: LoraModule) -> int:
        """Have the worker fetch, check and load a LoRA adapter; its rank."""
        request = worker_pb2.LoadAdapterRequest(
            adapter=models_pb2.LoraModule(name=module.name, path=module.path, scale=module.scale)
        )
        return (await self._answer(self.stub.LoadAdapter(request, metadata=_request_id()))).rank

    async def unload_adapter(self, name: str) -> None:
        await self._answer(
            self.stub.UnloadAdapter(worker_pb2.UnloadAdapterRequest(name=name), metadata=_request_id())
        )

    async def kv_events(self, start_sequence_number: int) -> AsyncIterator[bytes]:
        """The engine's prefix-cache event batches (serialized smg KvEventBatch), as they happen."""
        call = self.stub.WatchKvEvents(
            worker_pb2.WatchKvEventsRequest(start_sequence_number=start_sequence_number)
        )
        async for response in self._relay(call):
            yield response.kv_event_batch

    async def stop(self, timeout_s: float = 10.0) -> None:
        """Ask the worker to exit (close its standard input), then kill it if it lingers."""
        self.generate_streams.close_all()
        try:
            if self.channel is not None:
                await self.channel.close()
            if self.process is not None and self.process.returncode is None:
                if self.process.stdin is not None:
                    self.process.stdin.close()
                try:
                    await asyncio.wait_for(self.process.wait(), timeout_s)
                except asyncio.TimeoutError:
                    self.process.kill()
                    await self.process.wait()
        finally:  # even when the caller is cancelled meanwhile: nothing of the worker stays behind
            if self.process is not None:
                end_process_group(self.process.pid)
            shutil.rmtree(self._folder, ignore_errors=True)
        if self._stderr is not None:  # what it said last, for its exit's description
            await self._stderr.drained(within_s=1.0)
            self._stderr.close()

    async def wait(self) -> int:
        """The exit status, once the process has ended and its stderr has been read to the end."""
        assert self.process is not None
        returncode = await self.process.wait()
        if self._stderr is not None:
            await self._stderr.drained(within_s=1.0)
        return returncode

    @property
    def stub(self) -> worker_pb2_grpc.WorkerServiceAsyncStub:
        assert self._stub is not None, "the worker has not started"
        return self._stub

    async def _answer(self, call):
        """A unary call's response; its error as a domain error."""
        try:
            return await call
        except grpc.aio.AioRpcError as error:
            raise await self._translate(error) from None

    async def _relay(self, call) -> AsyncIterator:
        """Iterate a worker stream; its errors become domain errors; leaving early cancels it."""
        try:
            async for message in call:
                yield message
        except grpc.aio.AioRpcError as error:
            raise await self._translate(error) from None
        except asyncio.CancelledError:
            if _this_task_is_cancelled():
                raise
            # Not our caller leaving: the channel was closed under the call (the worker is stopping).
            raise Unavailable(
                "the model's worker process is stopping", reason=Reason.WORKER_UNAVAILABLE
            ) from None
        finally:
            call.cancel()

    async def _translate(self, error: grpc.aio.AioRpcError) -> Exception:
        remote = from_rpc_error(error)
        if error.code() == grpc.StatusCode.UNAVAILABLE and remote.reason is None:
            # No reason: not the worker's answer (a hub it cannot reach is) but the channel breaking,
            # because the process died or is dying.
            ended = await self.ended()
            if ended is not None:
                return generate_socket.worker_died(ended)
            return Unavailable(
                f"the model's worker process stopped answering: {error.details()}",
                reason=Reason.WORKER_UNAVAILABLE,
            )
        return remote
