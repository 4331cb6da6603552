"""The worker's half of the Generate socket (``llmgrpc.worker.frames`` tells the protocol):
``serve`` answers one connection with the engine's pieces, then the status. It is
engine-agnostic: ``generate`` is the worker's ``Worker.generate``. Closing the connection is the
server's cancel; the status frame is the worker's end of stream.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable

from google.rpc import status_pb2

from llmgrpc.server import logs
from llmgrpc.server.status import status_of
from llmgrpc.worker import frames
from llmgrpc.worker.v1 import worker_pb2

# Frames a stream writes before it lets the worker's other streams run: writing rarely waits
# (the socket's buffers are large), so an engine whose pieces come without waiting (a burst of
# them, or a benchmark engine) would otherwise keep the event loop from every other request.
FRAMES_PER_TURN = 16

Generation = Callable[[worker_pb2.GenerateRequest], AsyncIterator[worker_pb2.GenerateFrame]]


async def serve(generate: Generation, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """One connection: read the request, write generate(request)'s pieces, then the status.
    The server closing its end, or the request's deadline passing, stops generate at once
    (its generator is closed, which aborts the request in the engine)."""
    try:
        request = await frames.read_frame(reader, worker_pb2.GenerateRequest)
        if request is None:
            return
        deadline = frames.deadline_of(request)
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
        frames.write_frame(writer, worker_pb2.GenerateFrame(status=status.SerializeToString()))
        with contextlib.suppress(ConnectionError):
            await writer.drain()
    finally:
        writer.close()


async def _write_all(
    pieces: AsyncIterator[worker_pb2.GenerateFrame], writer: asyncio.StreamWriter, deadline: float | None
) -> None:
    try:
        async with contextlib.aclosing(pieces), asyncio.timeout_at(frames.deadline_at(deadline)):
            written = 0
            async for piece in pieces:
                frames.write_frame(writer, piece)
                await writer.drain()  # the server reading slower than the engine makes holds the engine
                written += 1
                if written % FRAMES_PER_TURN == 0:
                    await asyncio.sleep(0)
    except TimeoutError:
        raise frames.deadline_passed() from None
