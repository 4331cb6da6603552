"""TGIS (fmaas.GenerationService) through a client generated from the protocol's proto."""

from __future__ import annotations

import grpc
import protocol_clients
from rpc_helpers import collect, rpc_error
from status_details import bad_request, retry_info

from llmgrpc.tgis.v1 import generation_pb2 as tgis_pb
from llmgrpc.tgis.v1 import generation_pb2_grpc as tgis_grpc

PROMPTS = ["The capital of France is", "Once upon a time"]


def test_tgis_generate_stream_tokenize_and_model_info(running_server, client, tiny):
    answers = protocol_clients.run(
        "tgis", running_server.endpoint, model="tiny", prompts=PROMPTS, max_new_tokens=8
    )
    expected = [collect(client.generate("tiny", p, temperature=0, max_tokens=8))[1] for p in PROMPTS]
    batch = answers["batch"]
    assert [r.get("text", "") for r in batch] == expected
    for response, tokenized in zip(batch, answers["tokenize"], strict=True):
        assert response["stop_reason"] in ("MAX_TOKENS", "EOS_TOKEN")
        assert response["generated_token_count"] <= 8
        # Tokenize counts a text's tokens as a prompt's: what Generate reports it read.
        assert tokenized["token_count"] == response["input_token_count"] > 0
        assert len(tokenized["tokens"]) == tokenized["token_count"]

    stream = answers["stream"]
    assert "".join(r.get("text", "") for r in stream) == expected[0]
    assert all(r.get("stop_reason", "NOT_FINISHED") == "NOT_FINISHED" for r in stream[:-1])
    assert stream[-1]["stop_reason"] == batch[0]["stop_reason"]
    assert stream[-1]["input_token_count"] == batch[0]["input_token_count"]

    assert answers["info"]["model_kind"] == "DECODER_ONLY"
    assert answers["info"]["max_sequence_length"] == client.get_model("tiny").context_length > 0

    assert answers["sampled"]["seed"] == "7"  # uint64 in proto3 JSON is a string
    assert answers["unknown_model"] == "NOT_FOUND"
    assert answers["typical_p"] == "INVALID_ARGUMENT"
    # A schema nested 5,000 deep, and a format nothing satisfies (once EOS_TOKEN, empty).
    assert answers["deep_json_schema"] == "INVALID_ARGUMENT"
    assert answers["regex_matching_nothing"] == "INVALID_ARGUMENT"


def test_a_batch_larger_than_the_model_admits_is_invalid_with_no_retry_hint(running_server, settings, tiny):
    """Through the server's own stubs: one prompt more than the model runs and queues at once can
    never run, so it is the caller's to fix; a batch of exactly the limit runs."""
    limit = settings.max_running_requests + settings.max_waiting_requests
    params = tgis_pb.Parameters(stopping=tgis_pb.StoppingCriteria(max_new_tokens=1))

    def batch(prompts: int) -> tgis_pb.BatchedGenerationRequest:
        requests = [tgis_pb.GenerationRequest(text="Hello")] * prompts
        return tgis_pb.BatchedGenerationRequest(model_id="tiny", requests=requests, params=params)

    with grpc.insecure_channel(running_server.endpoint) as channel:
        stub = tgis_grpc.GenerationServiceStub(channel)
        error = rpc_error(stub.Generate, batch(limit + 1), timeout=120)
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
        assert f"at most {limit}" in error.details()
        assert [v.field for v in bad_request(error).field_violations] == ["requests"]
        assert retry_info(error) is None
        assert len(stub.Generate(batch(limit), timeout=120).responses) == limit
