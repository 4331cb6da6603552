"""The Generate socket between server and worker (llmgrpc.worker.generate_socket, the worker's
half, and llmgrpc.server.generate_socket, the server's; llmgrpc.worker.frames), both halves in
one event loop: pieces and statuses arrive as sent, and whichever side goes away, or the
deadline passing, ends the worker's generation at once."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time

import pytest

from llmgrpc.clients.errors import (
    DeadlineExceeded,
    FieldViolation,
    InvalidArgument,
    Reason,
    RemoteError,
    Unavailable,
    code_name,
)
from llmgrpc.server import generate_socket
from llmgrpc.v1 import generate_pb2
from llmgrpc.worker import frames
from llmgrpc.worker import generate_socket as worker_socket
from llmgrpc.worker.v1 import worker_pb2


def piece(text: str) -> worker_pb2.GenerateFrame:
    return worker_pb2.GenerateFrame(response=generate_pb2.GenerateResponse(text=text))


class Generation:
    """A worker's generate(): yields pieces from a queue; records how it ended."""

    def __init__(self, pieces: list[str], then: BaseException | None = None, hold: bool = False):
        self.pieces, self.then, self.hold = pieces, then, hold
        self.requests: list[worker_pb2.GenerateRequest] = []
        self.closed = asyncio.Event()

    async def __call__(self, request: worker_pb2.GenerateRequest):
        self.requests.append(request)
        try:
            for text in self.pieces:
                yield piece(text)
            if self.then is not None:
                raise self.then
            if self.hold:  # an engine that makes nothing more until it is stopped
                await asyncio.Event().wait()
        finally:
            self.closed.set()


async def serving(generation: Generation, folder, scenario):
    socket = folder / "generate.sock"
    server = await asyncio.start_unix_server(functools.partial(worker_socket.serve, generation), socket)
    try:
        return await scenario(generate_socket.Streams(socket))
    finally:
        server.close()


def request(deadline: float | None = None) -> worker_pb2.GenerateRequest:
    sent = worker_pb2.GenerateRequest(
        request=generate_pb2.GenerateRequest(model_uid="m", prompt="p", max_tokens=3), request_id="r-1"
    )
    if deadline is not None:
        sent.deadline.FromNanoseconds(int(deadline * 1e9))
    return sent


def test_pieces_arrive_in_order_and_the_stream_ends_with_the_status(tmp_path):
    generation = Generation(["a", "b", "c"])

    async def scenario(streams):
        return [p.text async for p in streams.stream(request(), None)]

    assert asyncio.run(serving(generation, tmp_path, scenario)) == ["a", "b", "c"]
    assert generation.requests[0].request_id == "r-1"
    assert generation.requests[0].request.prompt == "p"


def test_a_workers_error_arrives_with_its_code_reason_and_fields(tmp_path):
    refused = InvalidArgument(
        "logit_bias has ids outside the vocabulary",
        [FieldViolation("logit_bias", "ids outside [0, 743)")],
        reason=Reason.TOKEN_OUT_OF_VOCABULARY,
    )
    generation = Generation(["a"], then=refused)

    async def scenario(streams):
        seen = []
        with pytest.raises(RemoteError) as raised:
            async for p in streams.stream(request(), None):
                seen.append(p.text)
        return seen, raised.value

    seen, error = asyncio.run(serving(generation, tmp_path, scenario))
    assert seen == ["a"]
    assert error.code_name == "INVALID_ARGUMENT"
    assert error.reason == Reason.TOKEN_OUT_OF_VOCABULARY
    assert error.violations == [FieldViolation("logit_bias", "ids outside [0, 743)")]
    assert "outside the vocabulary" in str(error)


def test_a_caller_leaving_closes_the_workers_generation(tmp_path):
    generation = Generation(["a"], hold=True)

    async def scenario(streams):
        pieces = streams.stream(request(), None)
        assert (await anext(pieces)).text == "a"
        await pieces.aclose()
        await asyncio.wait_for(generation.closed.wait(), 5)

    asyncio.run(serving(generation, tmp_path, scenario))


def test_the_deadline_ends_both_sides(tmp_path):
    generation = Generation(["a"], hold=True)

    async def scenario(streams):
        with pytest.raises((DeadlineExceeded, RemoteError)) as raised:
            async for _ in streams.stream(request(deadline=time.time() + 0.3), time.time() + 0.3):
                pass
        await asyncio.wait_for(generation.closed.wait(), 5)
        return raised.value

    error = asyncio.run(serving(generation, tmp_path, scenario))
    assert code_name(error) == "DEADLINE_EXCEEDED"  # whichever side's timer fired first


def test_the_worker_keeps_the_deadline_when_the_server_does_not(tmp_path):
    generation = Generation([], hold=True)

    async def scenario(streams):
        with pytest.raises(RemoteError) as raised:
            async for _ in streams.stream(request(deadline=time.time() + 0.2), None):
                pass
        return raised.value

    assert asyncio.run(serving(generation, tmp_path, scenario)).code_name == "DEADLINE_EXCEEDED"


def test_a_worker_that_goes_away_mid_stream_is_unavailable(tmp_path):
    socket = tmp_path / "generate.sock"

    async def dying(reader, writer):  # answers one piece, then its process "dies"
        await frames.read_frame(reader, worker_pb2.GenerateRequest)
        frames.write_frame(writer, piece("a"))
        await writer.drain()
        writer.transport.abort()

    async def scenario():
        server = await asyncio.start_unix_server(dying, socket)
        seen = []
        try:
            with pytest.raises(Unavailable) as raised:
                async for p in generate_socket.Streams(socket).stream(request(), None):
                    seen.append(p.text)
        finally:
            server.close()
        return seen, raised.value

    seen, error = asyncio.run(scenario())
    assert seen == ["a"]
    assert error.reason == Reason.WORKER_UNAVAILABLE and "stopped answering" in str(error)


def test_no_worker_listening_is_unavailable(tmp_path):
    async def scenario():
        async for _ in generate_socket.Streams(tmp_path / "nobody.sock").stream(request(), None):
            pass

    with pytest.raises(Unavailable, match="stopped answering"):
        asyncio.run(scenario())


def test_stopping_the_worker_ends_its_streams_as_stopping(tmp_path):
    generation = Generation(["a"], hold=True)

    async def scenario(streams):
        pieces = streams.stream(request(), None)
        await anext(pieces)
        streams.close_all()
        with pytest.raises(Unavailable, match="is stopping"):
            await anext(pieces)
        await asyncio.wait_for(generation.closed.wait(), 5)
        with pytest.raises(Unavailable, match="is stopping"):  # and refuses new ones
            async with contextlib.aclosing(streams.stream(request(), None)) as more:
                await anext(more)

    asyncio.run(serving(generation, tmp_path, scenario))


def test_an_engine_that_never_waits_still_lets_the_other_streams_run(tmp_path):
    """Writing a frame rarely waits: the worker's half gives up the event loop every
    FRAMES_PER_TURN frames, or one such stream would hold off every other request."""
    turns = 0
    turns_at_piece: list[int] = []

    async def never_waits(request):
        for index in range(10 * worker_socket.FRAMES_PER_TURN):
            turns_at_piece.append(turns)
            yield piece(str(index))

    async def scenario(streams):
        nonlocal turns

        async def other_work():
            nonlocal turns
            while True:
                turns += 1
                await asyncio.sleep(0)

        beside = asyncio.ensure_future(other_work())
        try:
            return [p async for p in streams.stream(request(), None)]
        finally:
            beside.cancel()

    assert len(asyncio.run(serving(never_waits, tmp_path, scenario))) == 10 * worker_socket.FRAMES_PER_TURN
    # The other work ran between every FRAMES_PER_TURN pieces, at least.
    for start in range(0, len(turns_at_piece) - worker_socket.FRAMES_PER_TURN):
        assert turns_at_piece[start + worker_socket.FRAMES_PER_TURN] > turns_at_piece[start]
