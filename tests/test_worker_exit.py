"""A worker that dies says why, everywhere a person looks: the caller's status (and its
ErrorInfo), the model's condition, `llmgrpc models`. Workers of the Gated double crash as an
engine library would, by a signal after a last line on stderr; SIGKILL also comes from outside."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import grpc
import pytest
from rpc_helpers import wait_until
from status_details import error_info

from llmgrpc.clients import Client
from llmgrpc.server.worker_exit import TAIL_BYTES, WorkerExit, last_lines
from llmgrpc.v1 import models_pb2

FAILED = models_pb2.MODEL_STATE_FAILED
READINGS = {
    "SIGILL": "CPU instruction this host cannot run",
    "SIGKILL": "out-of-memory killer",
    "SIGSEGV": "invalid memory access",
}


def models_listing(endpoint: str) -> str:
    """What `llmgrpc models` prints for a person."""
    command = [sys.executable, "-m", "llmgrpc.server.cli", "models", "--endpoint", endpoint]
    return subprocess.run(command, capture_output=True, text=True, check=True, timeout=60).stdout


@pytest.mark.parametrize("signal_name", ["SIGILL", "SIGKILL", "SIGSEGV"])
def test_a_worker_dying_mid_stream_names_its_signal_its_meaning_and_its_last_words(gated_server, signal_name):
    server = gated_server()
    with Client(server.endpoint) as client:
        client.launch("gated-model", model_uid="victim", engine_options={"token_delay_s": 0.01})
        stream = client.generate("victim", f"die by {signal_name}", max_tokens=10, timeout=60)
        with pytest.raises(grpc.RpcError) as caught:
            list(stream)
        error = caught.value
        assert error.code() == grpc.StatusCode.UNAVAILABLE
        last_words = f"gated engine: dying by {signal_name} in the middle of a stream"
        assert last_words in error.details()
        assert signal_name in error.details() and READINGS[signal_name] in error.details()
        info = error_info(error)
        assert info.reason == "WORKER_UNAVAILABLE"
        assert info.metadata["signal"] == signal_name
        assert info.metadata["exit_code"] == str(-signal.Signals[signal_name])

        assert wait_until(lambda: client.get_model("victim").state == FAILED, 15)
        failed = client.get_model("victim")
        assert failed.condition.reason == "WorkerExited"
        for text in (failed.condition.message, failed.error, models_listing(server.endpoint)):
            assert signal_name in text and READINGS[signal_name] in text and last_words in text
        client.terminate("victim")


def test_a_worker_killed_from_outside_says_so(gated_server):
    server = gated_server()
    with Client(server.endpoint) as client:
        model = client.launch("gated-model", model_uid="casualty", engine_options={"token_delay_s": 0.01})
        stream = client.generate("casualty", "Keep going", max_tokens=100_000, timeout=60)
        next(stream)
        os.kill(model.worker_pid, signal.SIGKILL)
        with pytest.raises(grpc.RpcError) as caught:
            list(stream)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "SIGKILL" in caught.value.details() and READINGS["SIGKILL"] in caught.value.details()
        assert error_info(caught.value).metadata["signal"] == "SIGKILL"
        client.terminate("casualty")


def test_a_load_that_crashes_fails_the_launch_with_the_signal_and_the_last_words(gated_server):
    server = gated_server()
    with Client(server.endpoint) as client:
        with pytest.raises(grpc.RpcError) as caught:
            client.launch("gated-model", model_uid="doomed", engine_options={"crash_at_load": "SIGILL"})
        last_words = "gated engine: dying by SIGILL while loading"
        details = caught.value.details()
        assert "SIGILL" in details and READINGS["SIGILL"] in details and last_words in details
        failed = client.get_model("doomed")
        assert failed.state == FAILED
        assert "SIGILL" in failed.condition.message and last_words in failed.condition.message
        client.terminate("doomed")


def test_an_exit_reads_plainly():
    assert WorkerExit(3).message == "the worker process exited with code 3"
    assert WorkerExit(3).metadata() == {"exit_code": "3"}
    ill = WorkerExit(-signal.SIGILL, "boom")
    assert ill.message.startswith("the worker process was killed by signal SIGILL: the engine's build")
    assert ill.message.endswith("its last words on stderr: boom")
    assert ill.metadata() == {"exit_code": str(-signal.SIGILL), "signal": "SIGILL"}


def test_the_stderr_tail_is_bounded_and_keeps_whole_lines():
    lines = [f"line {n:05d}" for n in range(1000)]
    tail = bytes("\n".join(lines) + "\n", "utf-8")[-TAIL_BYTES:]
    kept = last_lines(tail).split(" | ")
    assert kept[-1] == "line 00999" and all(line in lines for line in kept)
    assert len(" | ".join(kept)) <= TAIL_BYTES + 3 * len(kept)
