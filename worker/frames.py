"""The Generate socket's wire protocol, spoken by both halves: one connection per request,
each message a 4-byte little-endian length and then a worker protobuf (the server writes a
``GenerateRequest``; the worker answers ``GenerateFrame`` messages: pieces, then a status).

Why not the worker's gRPC channel: a gRPC message is handed from gRPC's polling thread to
the event loop on each side, two thread wake-ups per message per process, and at one
token a message those wake-ups took CPU from the engine's threads. Here a frame is one
write on the worker's event loop and one read on the server's. The worker's half is
``llmgrpc.worker.generate_socket``, the server's ``llmgrpc.server.generate_socket``.
"""

from __future__ import annotations

import asyncio
import struct
import time
from typing import TypeVar

from google.protobuf.message import Message

from llmgrpc.clients.errors import DeadlineExceeded, Unavailable
from llmgrpc.worker.v1 import worker_pb2

M = TypeVar("M", bound=Message)
_LENGTH = struct.Struct("<I")
# The largest frame either side accepts, as the worker's gRPC channel does.
FRAME_LIMIT = 64 * 1024 * 1024


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


def deadline_at(deadline: float | None) -> float | None:
    """A time.time() deadline as the event loop's clock reads it (for asyncio.timeout_at)."""
    if deadline is None:
        return None
    return asyncio.get_running_loop().time() + (deadline - time.time())


def deadline_passed() -> DeadlineExceeded:
    return DeadlineExceeded("the caller's deadline passed before the generation finished")
