"""The GPU path through the gRPC service: placement, memory accounting, compiled decode, replicas.

Needs a CUDA GPU: skipped elsewhere, run by `make gpu-check` on a GPU machine.
"""

from __future__ import annotations

import json
import os
import threading
import time

import grpc
import pytest
import torch
from conftest import TESTS, TINY
from reserving_engine import FAMILY as RESERVING_FAMILY
from rpc_helpers import rpc_error, wait_until
from status_details import error_info

from llmgrpc.clients import Client
from llmgrpc.v1 import models_pb2

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (make gpu-check)"),
]
MIB = 1024**2


def greedy(client: Client, uid: str, prompt: str) -> list[int]:
    stream = client.generate(uid, prompt, max_tokens=32, temperature=0, ignore_eos=True)
    return [token for message in stream for token in message.token_ids]


def free_gpu_bytes() -> int:
    return torch.cuda.mem_get_info(0)[0]


def test_compiled_decode_on_cuda_gives_the_plain_path_tokens_and_frees_its_memory(client: Client):
    free_before = free_gpu_bytes()
    prompts = ("Hello there", "The quick brown fox", "Beautiful is better than ugly.")
    outputs = {}
    for decode in ("plain", "compiled"):
        uid = f"tiny-cuda-{decode}"
        options = {"dtype": "float32", "decode": decode}
        model = client.launch(TINY, model_uid=uid, device="cuda", engine_options=options, timeout=600)
        try:
            assert model.device == "cuda:0"
            assert model.state == models_pb2.MODEL_STATE_READY
            described = client.get_model(uid)
            assert described.gpu_memory_bytes > 0
            assert described.estimated_memory_bytes > 0
            outputs[decode] = [greedy(client, uid, prompt) for prompt in prompts]
        finally:
            client.terminate(uid)
    assert outputs["compiled"] == outputs["plain"]
    # Terminating ends the worker process, which gives its GPU memory back.
    deadline = time.monotonic() + 30
    while free_gpu_bytes() < free_before - 64 * MIB and time.monotonic() < deadline:
        time.sleep(0.2)
    assert free_gpu_bytes() >= free_before - 64 * MIB


def test_a_model_bigger_than_the_gpu_is_refused_with_the_numbers(client: Client):
    with pytest.raises(grpc.RpcError) as error:
        client.launch("llama-3.1", size_in_billions="405", model_engine="transformers", device="cuda")
    assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "cuda:0" in error.value.details() and "GiB" in error.value.details()


def test_the_default_device_on_a_gpu_machine_is_cuda(client: Client):
    model = client.launch(TINY, model_uid="tiny-auto", device="auto", timeout=600)
    try:
        assert model.device == "cuda:0"
        assert len(greedy(client, "tiny-auto", "Hello")) == 32
    finally:
        client.terminate("tiny-auto")


def test_a_gpu_index_that_does_not_exist_is_a_failed_precondition(client: Client):
    with pytest.raises(grpc.RpcError) as error:
        client.launch(TINY, device=f"cuda:{torch.cuda.device_count()}")
    assert error.value.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_two_replicas_of_the_tiny_model_share_one_gpu_and_both_serve(client: Client):
    model = client.launch(
        TINY,
        model_uid="tiny-pair",
        device="cuda:0",
        replica=2,
        engine_options={"dtype": "float32"},
        timeout=600,
    )
    try:
        assert model.state == models_pb2.MODEL_STATE_READY
        assert [replica.device for replica in model.replicas] == ["cuda:0", "cuda:0"]
        pids = {replica.worker_pid for replica in model.replicas}
        assert len(pids) == 2 and 0 not in pids
        assert client.get_model("tiny-pair").gpu_memory_bytes > 0
        # Two streams at once go one to each replica, and each decodes on the GPU.
        results: list[list[int]] = [[], []]

        def read(slot: int) -> None:
            results[slot] = greedy_long(client, "tiny-pair")

        readers = [threading.Thread(target=read, args=(slot,)) for slot in range(2)]
        for reader in readers:
            reader.start()
        split = wait_until(
            lambda: [r.running_requests for r in client.get_model("tiny-pair").replicas] == [1, 1], 60, 0.01
        )
        for reader in readers:
            reader.join(300)
        assert split
        assert results[0] == results[1] and len(results[0]) == 2000  # same weights, greedy
    finally:
        client.terminate("tiny-pair")


def greedy_long(client: Client, uid: str) -> list[int]:
    stream = client.generate(uid, "Hello there", max_tokens=2000, temperature=0, ignore_eos=True, timeout=300)
    return [token for message in stream for token in message.token_ids]


@pytest.fixture
def reserving_server(start_server, tmp_path, monkeypatch):
    """A server whose families include reserving-model, served by the Reserving double."""
    # The probe and the workers import the plugin, and llmgrpc from wherever it is installed.
    monkeypatch.setenv(
        "PYTHONPATH", os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")]))
    )
    (tmp_path / "reserving-model.json").write_text(json.dumps(RESERVING_FAMILY))
    return start_server(device="auto", engine_plugins=["reserving_engine:ENGINE_INFO"], families_dir=tmp_path)


def test_replicas_of_a_reserving_engine_are_counted_in_full_on_one_gpu(reserving_server):
    free, total = torch.cuda.mem_get_info(0)
    # A fraction one replica fits in and two do not, then one two replicas fit in.
    too_big = int(free / total * 0.75 * 1000) / 1000
    small = int(free / total * 0.2 * 1000) / 1000
    with Client(reserving_server.endpoint) as client:
        error = rpc_error(
            client.launch,
            "reserving-model",
            model_uid="greedy-pair",
            device="cuda:0",
            replica=2,
            engine_options={"gpu_memory_utilization": too_big},
        )
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "replica 2 of 2" in error.details() and "GPU 0" in error.details()
        info = error_info(error)
        assert info is not None and info.metadata["replica"] == "1"
        # The second replica needs the whole reservation; what is left after the first's is short.
        needed = int(info.metadata["gpu_0_needed_bytes"])
        assert abs(needed - too_big * total) < 0.01 * total
        assert int(info.metadata["gpu_0_free_bytes"]) < needed
        assert client.list_models() == []  # refused before any worker started

        model = client.launch(
            "reserving-model",
            model_uid="modest-pair",
            device="cuda:0",
            replica=2,
            engine_options={"gpu_memory_utilization": small},
        )
        try:
            assert [replica.device for replica in model.replicas] == ["cuda:0", "cuda:0"]
            assert abs(model.estimated_memory_bytes - 2 * small * total) < 0.01 * total
        finally:
            client.terminate("modest-pair")
