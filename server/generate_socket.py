"""The server's half of the Generate socket (``llmgrpc.worker.frames`` tells the protocol):
``Streams.stream`` sends one request to a worker and yields its pieces. Leaving early closes
the connection, which aborts the request in the worker; a connection that ends without a
status means the worker went away, and the caller hears how it ended.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

from google.rpc import status_pb2

from llmgrpc.clients.errors import Reason, Unavailable
from llmgrpc.server.status import from_status_proto
from llmgrpc.server.worker_exit import WorkerExit
from llmgrpc.v1 import generate_pb2
from llmgrpc.worker import frames
from llmgrpc.worker.v1 import worker_pb2


def worker_died(ended: WorkerExit | None, when: str = "") -> Unavailable:
    """UNAVAILABLE for a worker that stopped answering, saying how it ended where it has (its
    exit code or signal, what that means, its last stderr lines; the same facts in ErrorInfo)."""
    what = " ".join(filter(None, ["the model's worker process stopped answering", when]))
    if ended is None:
        return Unavailable(what, reason=Reason.WORKER_UNAVAILABLE)
    return Unavailable(
        f"{what}: {ended.message}", reason=Reason.WORKER_UNAVAILABLE, metadata=ended.metadata()
    )


class Streams:
    """The open Generate connections to one worker, so that stopping it ends them all.

    ended: how the worker process ended, awaited when a stream breaks without a status."""

    def __init__(self, socket_path: Path, ended: Callable[[], Awaitable[WorkerExit | None]] | None = None):
        self.socket_path = socket_path
        self._ended = ended
        self._open: set[asyncio.StreamWriter] = set()
        self._stopping = False

    def close_all(self) -> None:
        """The worker is being stopped: end every open stream, each with UNAVAILABLE."""
        self._stopping = True
        for writer in list(self._open):
            writer.close()

    async def stream(
        self, request: worker_pb2.GenerateRequest, deadline: float | None
    ) -> AsyncIterator[generate_pb2.GenerateResponse]:
        """The worker's pieces for request; its error as a domain error. Leaving early (the
        caller went away) closes the connection, which aborts the request in the worker."""
        if self._stopping:
            raise await self._gone("")
        try:
            reader, writer = await asyncio.open_unix_connection(self.socket_path, limit=2**16)
        except OSError as error:
            raise await self._gone(f"({error.strerror or error})") from None
        self._open.add(writer)
        ends_at = frames.deadline_at(deadline)
        try:
            frames.write_frame(writer, request)
            while True:
                # The deadline around each read, never around the yield: a timeout that fired
                # while this generator is suspended would cancel its consumer instead.
                try:
                    async with asyncio.timeout_at(ends_at):
                        frame = await frames.read_frame(reader, worker_pb2.GenerateFrame)
                except TimeoutError:
                    raise frames.deadline_passed() from None
                if frame is None:
                    raise await self._gone("(its Generate stream ended without a status)")
                if frame.HasField("response"):
                    yield frame.response
                    continue
                status = status_pb2.Status.FromString(frame.status)
                if status.code != 0:
                    raise from_status_proto(status)
                return
        finally:
            self._open.discard(writer)
            writer.close()

    async def _gone(self, detail: str) -> Unavailable:
        if self._stopping:
            return Unavailable("the model's worker process is stopping", reason=Reason.WORKER_UNAVAILABLE)
        ended = await self._ended() if self._ended else None
        return worker_died(ended, "" if ended else detail)
