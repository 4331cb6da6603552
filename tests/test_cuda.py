"""The GPU path through the gRPC service: placement, memory accounting, compiled decode.

Needs a CUDA GPU: skipped elsewhere, run by `make gpu-check` on a GPU machine.
"""

from __future__ import annotations

import time

import grpc
import pytest
import torch
from conftest import TINY

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
