"""A person with grpcurl and no proto files: reflection, descriptions and a streamed Generate."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

GRPCURL = Path(sys.executable).parent / "grpcurl"


def grpcurl(endpoint: str, *verb: str, data: dict | None = None) -> str:
    flags = ["-plaintext"] + (["-d", json.dumps(data)] if data is not None else [])
    result = subprocess.run(
        [str(GRPCURL), *flags, endpoint, *verb], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def json_stream(text: str) -> list[dict]:
    """The JSON messages grpcurl prints one after another."""
    decoder, messages, position = json.JSONDecoder(), [], 0
    while text[position:].strip():
        message, end = decoder.raw_decode(
            text, position + len(text[position:]) - len(text[position:].lstrip())
        )
        messages.append(message)
        position = end
    return messages


def test_services_are_listed_by_reflection(running_server):
    services = grpcurl(running_server.endpoint, "list").split()
    assert {"llmgrpc.v1.ModelService", "llmgrpc.v1.GenerateService", "grpc.health.v1.Health"} <= set(services)


def test_the_workers_internal_api_is_not_shown(running_server):
    """The server's API to its workers shares the server's process, not its contract."""
    assert not any("worker" in service for service in grpcurl(running_server.endpoint, "list").split())
    for symbol in ("llmgrpc.worker.v1.WorkerService", "llmgrpc.worker.v1.GenerateRequest"):
        result = subprocess.run(
            [str(GRPCURL), "-plaintext", running_server.endpoint, "describe", symbol],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode != 0 and "not found" in result.stderr.lower(), result.stdout + result.stderr


def test_describe_shows_the_contract_comments(running_server):
    described = grpcurl(running_server.endpoint, "describe", "llmgrpc.v1.GenerateRequest")
    assert "Exactly one of prompt and prompt_token_ids must be set." in described
    described = grpcurl(running_server.endpoint, "describe", "llmgrpc.v1.ModelService")
    assert "LaunchModel starts a worker process" in described


def test_generate_streams_through_grpcurl(running_server, tiny):
    # grpcurl prints the proto3 JSON mapping: lowerCamelCase field names.
    request = {"model_uid": "tiny", "prompt": "Hello", "max_tokens": 6, "temperature": 0}
    messages = json_stream(
        grpcurl(running_server.endpoint, "llmgrpc.v1.GenerateService/Generate", data=request)
    )
    assert len(messages) > 1
    assert messages[-1]["finishReason"] == "FINISH_REASON_LENGTH"
    assert messages[-1]["usage"]["completionTokens"] == 6
    assert sum(len(m.get("tokenIds", [])) for m in messages) == 6


def test_the_inference_protocols_are_listed_and_described(running_server):
    services = set(grpcurl(running_server.endpoint, "list").split())
    assert {
        "llmgrpc.v1.GenerateService",
        "inference.GRPCInferenceService",
        "fmaas.GenerationService",
    } <= services
    described = grpcurl(running_server.endpoint, "describe", "inference.GRPCInferenceService")
    assert "rpc ModelStreamInfer ( stream .inference.ModelInferRequest )" in described
    assert "triton_final_response" in described  # the comments come with it
    described = grpcurl(running_server.endpoint, "describe", "fmaas.GenerationService")
    assert "rpc GenerateStream ( .fmaas.SingleGenerationRequest )" in described
    assert "model_id" in grpcurl(running_server.endpoint, "describe", "fmaas.BatchedGenerationRequest")


def test_model_infer_through_grpcurl(running_server, tiny):
    request = {
        "model_name": "tiny",
        "inputs": [
            {
                "name": "text_input",
                "datatype": "BYTES",
                "shape": [1],
                "contents": {"bytes_contents": ["SGVsbG8="]},
            },
            {
                "name": "sampling_parameters",
                "datatype": "BYTES",
                "shape": [1],
                "contents": {"bytes_contents": ["eyJ0ZW1wZXJhdHVyZSI6IDAsICJtYXhfdG9rZW5zIjogNn0="]},
            },
        ],
    }
    (answer,) = json_stream(
        grpcurl(running_server.endpoint, "inference.GRPCInferenceService/ModelInfer", data=request)
    )
    assert answer["outputs"][0]["name"] == "text_output"
    assert answer["parameters"]["completion_tokens"]["int64Param"] == "6"
