"""Streams whose callers do not keep up: the server's memory and decode slots stay bounded.

A ModelStreamInfer caller that writes and never reads is held back (backpressure), and a
response stream whose caller reads nothing for ``stream_unread_timeout_s`` is ended, its
decode slot freed. The test clients keep gRPC's flow-control window to them at its initial
64 KiB (no BDP probing), so that a caller who does not read stops taking responses soon.
"""

from __future__ import annotations

import asyncio

import grpc
from rpc_helpers import collect, wait_until
from status_details import reason

from llmgrpc.clients import Client
from llmgrpc.kserve.v2 import grpc_service_pb2 as kserve_pb
from llmgrpc.kserve.v2 import grpc_service_pb2_grpc as kserve_grpc
from llmgrpc.server.kserve_convert import encode_bytes
from llmgrpc.v1 import models_pb2

SMALL_WINDOW = [("grpc.http2.bdp_probe", 0)]


def unknown_model_request(number: int) -> kserve_pb.ModelInferRequest:
    """A request answered at once (its model does not exist), padded to 2 KiB."""
    request = kserve_pb.ModelInferRequest(model_name="absent", id=str(number))
    request.inputs.add(name="text_input", datatype="BYTES", shape=[1])
    request.raw_input_contents.append(encode_bytes(b"x" * 2048))
    return request


def test_a_model_stream_infer_caller_that_does_not_read_is_held_back_then_served(start_server):
    """The caller writes requests as fast as it can and reads nothing: soon a write waits (the
    server stopped reading); once it reads, every request it wrote gets its answer."""
    server = start_server(max_stream_pending=4, stream_unread_timeout_s=300)
    offered = 20_000  # 40 MiB of requests: far more than any transport buffers

    async def scenario() -> tuple[int, list[kserve_pb.ModelStreamInferResponse]]:
        async with grpc.aio.insecure_channel(server.endpoint, options=SMALL_WINDOW) as channel:
            call = kserve_grpc.GRPCInferenceServiceStub(channel).ModelStreamInfer(timeout=120)
            written = 0
            pending = None
            while written < offered:
                pending = asyncio.ensure_future(call.write(unknown_model_request(written)))
                done, _ = await asyncio.wait({pending}, timeout=3.0)
                if not done:
                    break  # held back: the server reads no more until answers are read
                pending.result()
                written += 1
            held_back_at = written
            answers = []

            async def read() -> None:
                async for answer in call:
                    answers.append(answer)

            reading = asyncio.ensure_future(read())
            if pending is not None and not pending.done():
                await pending
                written += 1
            await call.done_writing()
            await reading
            assert len(answers) == written
            return held_back_at, answers

    held_back_at, answers = asyncio.run(scenario())
    assert held_back_at < offered
    assert sorted(int(answer.infer_response.id) for answer in answers) == list(range(len(answers)))
    assert all("absent" in answer.error_message for answer in answers)


def test_a_stream_whose_caller_does_not_read_ends_and_frees_its_decode_slot(gated_server):
    """Both decode slots taken by streams whose callers read nothing: each ends after the unread
    timeout, and a third request, queued behind them, runs; the idle callers find the reason
    once they read."""
    server = gated_server(max_running_requests=2, max_waiting_requests=4, stream_unread_timeout_s=1)
    with Client(server.endpoint) as client:
        client.launch("gated-model", model_uid="busy", engine_options={"token_delay_s": 0}, timeout=60)
        idle_channel = grpc.insecure_channel(server.endpoint, options=SMALL_WINDOW)
        with Client(server.endpoint, channel=idle_channel) as idle:
            unread = [idle.generate("busy", "unread", timeout=120, max_tokens=10**7) for _ in range(2)]
            assert wait_until(lambda: client.get_model("busy").running_requests == 2)
            queued = client.generate("busy", "behind them", timeout=60, max_tokens=3)
            assert collect(queued)[1] == "abc"
            for stream in unread:
                try:
                    collect(stream)
                except grpc.RpcError as error:
                    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                    assert reason(error) == "STREAM_NOT_READ"
                    assert "read nothing" in error.details()
                else:
                    raise AssertionError("a stream nobody read ran to its end")
        assert wait_until(lambda: client.get_model("busy").running_requests == 0)


def test_a_watcher_that_reads_slowly_gets_the_latest_description_not_a_backlog(gated_server):
    """A load reports thousands of progress steps while a watcher reads nothing: once it reads, it
    gets what its transport held and then the model as it is now, not every step in between."""
    steps = 3000
    server = gated_server()
    with Client(server.endpoint) as client:
        options = {"progress_reports": steps}
        client.launch("gated-model", model_uid="watched", engine_options=options, wait=False, timeout=60)
        watcher_channel = grpc.insecure_channel(server.endpoint, options=SMALL_WINDOW)
        with Client(server.endpoint, channel=watcher_channel) as watcher:
            request = models_pb2.WatchModelRequest(model_uid="watched")
            responses = watcher.models.WatchModel(request, timeout=120)  # the call starts now
            assert wait_until(lambda: client.get_model("watched").state == models_pb2.MODEL_STATE_READY, 60)
            seen = [response.model for response in responses]
    assert seen[0].state == models_pb2.MODEL_STATE_LOADING
    assert seen[-1].state == models_pb2.MODEL_STATE_READY
    assert len(seen) < steps / 2, f"{len(seen)} descriptions for {steps} progress steps"
