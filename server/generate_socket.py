"""Generate streams between the server and a worker: a Unix socket of their own, one
connection per request, length-prefixed worker protobuf frames (worker.proto's
``GenerateFrame`` tells the protocol).

Why not the worker's gRPC channel: a gRPC message is handed from gRPC's polling thread to
the event loop on each side, two thread wake-ups per message per process, and at one
token a message those wake-ups took CPU from the engine's threads. Here a frame is one
write on the worker's event loop and one read on the server's.

Both halves live here: ``serve`` (the worker's, engine-agnostic) and ``stream`` (the
server's). Closing the connection is the server's cancel; the status frame is the worker's
end of stream; a connection that ends without one means the worker went away.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import TypeVar

from google.protobuf.message import Message
from google.rpc import status_pb2

from llmgrpc.clients.errors import DeadlineExceeded, Reason, Unavailable
from llmgrpc.server import logs
from llmgrpc.server.status import from_status_proto, status_of
from llmgrpc.server.worker_exit import WorkerExit
from llmgrpc.worker.v1 import worker_pb2

M = TypeVar("M", bound=Message)
_LENGTH = struct.Struct("<I")
# The largest frame either side accepts, as the worker's gRPC channel does.
FRAME_LIMIT = 64 * 1024 * 1024
# Frames a stream writes before it lets the worker's other streams run: writing rarely waits
# (the socket's buffers are large), so an engine whose pieces come without waiting (a burst of
# them, or a benchmark engine) would otherwise keep the event loop from every other request.
FRAMES_PER_TURN = 16


def write_frame(writer: asyncio.StreamWriter, message: Message) -> None:
    data = message.SerializeToString()
    writer.write(_LENGTH.pack(len(data)) + data)


async def read_frame(reader: asyncio.StreamReader, message_class: type[M]) -> M | None:
    """The next frame; None when the connection ended (cleanly or not) before one began."""
    try:
        (length,) = _LENGTH.unpack(await reader.readexactly(_LENGTH.size))
    except (asyncio.IncompleteReadError, ConnectionError):
        return None
    if length > FRAME_LIMIT:
        raise Unavailable(f"a Generate frame of {length} bytes is over the limit of {FRAME_LIMIT}")
    try:
        return message_class.FromString(await reader.readexactly(length))
    except (asyncio.IncompleteReadError, ConnectionError):
        return None


def deadline_of(request: worker_pb2.GenerateRequest) -> float | None:
    """The caller's deadline a request carries, as a time.time() moment; None: no deadline."""
    return request.deadline.ToNanoseconds() / 1e9 if request.HasField("deadline") else None


def _deadline_at(deadline: float | None) -> float | None:
    """A time.time() deadline as the event loop's clock reads it (for asyncio.timeout_at)."""
    if deadline is None:
        return None
    return asyncio.get_running_loop().time() + (deadline - time.time())


def _deadline_passed() -> DeadlineExceeded:
    return DeadlineExceeded("the caller's deadline passed before the generation finished")


# The worker's half.

Generation = Callable[[worker_pb2.GenerateRequest], AsyncIterator[worker_pb2.GenerateResponse]]


async def serve(generate: Generation, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """One connection: read the request, write generate(request)'s pieces, then the status.
    The server closing its end, or the request's deadline passing, stops generate at once
    (its generator is closed, which aborts the request in the engine)."""
    try:
        request = await read_frame(reader, worker_pb2.GenerateRequest)
        if request is None:
            return
        deadline = deadline_of(request)
        logs.REQUEST_ID.set(request.request_id)  # for every log line of it, the engine's included
        writing = asyncio.ensure_future(_write_all(generate(request), writer, deadline))
        # The server sends nothing after its request: the read ends when it closes its end.
        closed = asyncio.ensure_future(reader.read())
        try:
            await asyncio.wait({writing, closed}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            closed.cancel()
            abandoned = not writing.done()  # nobody is listening any more
            if abandoned:
                writing.cancel()
                with contextlib.suppress(Exception, asyncio.CancelledError):
                    await writing
        if abandoned:
            return
        error = writing.exception()
        status = status_of(error, "Generate") if error is not None else status_pb2.Status()
        write_frame(writer, worker_pb2.GenerateFrame(status=status.SerializeToString()))
        with contextlib.suppress(ConnectionError):
            await writer.drain()
    finally:
        writer.close()


async def _write_all(
    pieces: AsyncIterator[worker_pb2.GenerateResponse], writer: asyncio.StreamWriter, deadline: float | None
) -> None:
    try:
        async with contextlib.aclosing(pieces), asyncio.timeout_at(_deadline_at(deadline)):
            written = 0
            async for piece in pieces:
                write_frame(writer, worker_pb2.GenerateFrame(response=piece))
                await writer.drain()  # the server reading slower than the engine makes holds the engine
                written += 1
                if written % FRAMES_PER_TURN == 0:
                    await asyncio.sleep(0)
    except TimeoutError:
        raise _deadline_passed() from None


# The server's half.


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
    ) -> AsyncIterator[worker_pb2.GenerateResponse]:
        """The worker's pieces for request; its error as a domain error. Leaving early (the
        caller went away) closes the connection, which aborts the request in the worker."""
        if self._stopping:
            raise await self._gone("")
        try:
            reader, writer = await asyncio.open_unix_connection(self.socket_path, limit=2**16)
        except OSError as error:
            raise await self._gone(f"({error.strerror or error})") from None
        self._open.add(writer)
        ends_at = _deadline_at(deadline)
        try:
            write_frame(writer, request)
            while True:
                # The deadline around each read, never around the yield: a timeout that fired
                # while this generator is suspended would cancel its consumer instead.
                try:
                    async with asyncio.timeout_at(ends_at):
                        frame = await read_frame(reader, worker_pb2.GenerateFrame)
                except TimeoutError:
                    raise _deadline_passed() from None
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
