"""KServe v2 / Open Inference Protocol through Triton's own client (tritonclient), unchanged."""

from __future__ import annotations

import grpc
import protocol_clients
from conftest import TINY
from rpc_helpers import collect, rpc_error
from status_details import bad_request

from llmgrpc.kserve.v2 import grpc_service_pb2 as kserve_pb
from llmgrpc.kserve.v2 import grpc_service_pb2_grpc as kserve_grpc
from llmgrpc.server.kserve_convert import encode_bytes

PROMPT = "The capital of France is"
GREEDY = {"temperature": 0, "max_tokens": 12, "ignore_eos": True}


def generated_text(client, **sampling) -> str:
    return collect(client.generate("tiny", PROMPT, **sampling))[1]


def test_health_and_metadata(running_server, tiny):
    answers = protocol_clients.run("triton_basics", running_server.endpoint, model="tiny")
    assert answers["live"] and answers["ready"] and answers["model_ready"]
    assert answers["unknown_model_ready"] is False
    assert answers["inputs"] == {
        "text_input": "BYTES",
        "stream": "BOOL",
        "sampling_parameters": "BYTES",
        "exclude_input_in_output": "BOOL",
    }
    assert answers["outputs"] == {"text_output": "BYTES"}
    assert answers["server"]["name"] == "llmgrpc"
    assert "model_repository" in answers["server"]["extensions"]
    assert answers["statistics"]["model_stats"][0]["name"] == "tiny"


def test_infer_returns_what_generate_returns(running_server, client, tiny):
    answers = protocol_clients.run(
        "triton_infer", running_server.endpoint, model="tiny", prompt=PROMPT, sampling=GREEDY
    )
    expected = generated_text(client, temperature=0, max_tokens=12, ignore_eos=True)
    assert answers["text"] == expected
    assert answers["id"] == "r1"
    # As Triton's vLLM backend: without exclude_input_in_output the prompt comes first.
    assert answers["with_prompt"] == PROMPT + expected


def test_stream_pieces_add_up_to_generate_and_end_with_a_final_response(running_server, client, tiny):
    answers = protocol_clients.run(
        "triton_stream", running_server.endpoint, model="tiny", prompt=PROMPT, sampling=GREEDY
    )
    expected = generated_text(client, temperature=0, max_tokens=12, ignore_eos=True)
    *pieces, final = answers["pieces"]
    assert len(pieces) > 1 and all(pieces)
    assert "".join(pieces) == expected
    assert final is None  # the empty final response: no text_output
    assert answers["finals"] == [False] * len(pieces) + [True]
    assert answers["ids"] == ["s1"]


def test_stop_stream_cancels_the_engines_work(running_server, tiny):
    sampling = {"temperature": 0, "max_tokens": 2000, "ignore_eos": True}
    answers = protocol_clients.run(
        "triton_cancel", running_server.endpoint, model="tiny", prompt=PROMPT, sampling=sampling
    )
    assert answers["first_piece"]
    assert answers["running_before"] == 1
    assert answers["running_after"] == 0
    assert answers["seconds_to_idle"] < 2.0, answers


def test_bad_input_gets_the_codes_llmgrpc_v1_gives(running_server, tiny):
    answers = protocol_clients.run("triton_bad_input", running_server.endpoint, model="tiny")
    for fault in (
        "unknown_tensor",
        "wrong_datatype",
        "wrong_shape",
        "malformed_json",
        "deep_json",
        "unknown_key",
        "out_of_range",
    ):
        assert answers[fault]["status"] == "StatusCode.INVALID_ARGUMENT", (fault, answers[fault])
    assert "prompt" in answers["unknown_tensor"]["message"]
    assert "INT32" in answers["wrong_datatype"]["message"]
    assert "sampling_parameters" in answers["malformed_json"]["message"]
    assert (
        "sampling_parameters" in answers["deep_json"]["message"] and "deep" in answers["deep_json"]["message"]
    )
    assert "beam_width" in answers["unknown_key"]["message"]
    assert "temperature" in answers["out_of_range"]["message"]
    assert answers["unknown_model"]["status"] == "StatusCode.NOT_FOUND"
    assert answers["stream_in_unary"]["status"] == "StatusCode.INVALID_ARGUMENT"


def test_the_repository_launches_and_terminates_and_needs_admin(start_server):
    server = start_server(device="cpu", auth_tokens={"adm1n": "admin", "inf3rence": "inference"})
    answers = protocol_clients.run(
        "triton_lifecycle",
        server.endpoint,
        uid="tiny-kserve",
        family=TINY,
        admin="adm1n",
        inference="inf3rence",
    )
    assert answers["refused_load"]["status"] == "StatusCode.PERMISSION_DENIED"
    assert answers["unauthenticated"]["status"] == "StatusCode.UNAUTHENTICATED"
    assert [(m["name"], m["state"]) for m in answers["index_loaded"]] == [("tiny-kserve", "READY")]
    assert answers["ready"] is True
    assert answers["refused_unload"]["status"] == "StatusCode.PERMISSION_DENIED"
    assert answers["index_unloaded"] == []


def test_negative_dimensions_and_contents_beside_raw_contents_are_refused(running_server):
    """Through the server's own stubs: shape [-1, -1] has a product of 1 but is no shape, and a
    tensor's contents beside raw_input_contents would be silently ignored (Triton refuses both)."""
    negative = kserve_pb.ModelInferRequest(model_name="absent")
    negative.inputs.add(name="text_input", datatype="BYTES", shape=[-1, -1]).contents.bytes_contents.append(
        b"Hello"
    )
    both = kserve_pb.ModelInferRequest(model_name="absent")
    both.inputs.add(name="text_input", datatype="BYTES", shape=[1]).contents.bytes_contents.append(b"Hello")
    both.raw_input_contents.append(encode_bytes(b"Goodbye"))
    with grpc.insecure_channel(running_server.endpoint) as channel:
        stub = kserve_grpc.GRPCInferenceServiceStub(channel)
        error = rpc_error(stub.ModelInfer, negative, timeout=30)
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
        assert "shape [-1, -1]" in error.details() and "0 or more" in error.details()
        assert [v.field for v in bad_request(error).field_violations] == ["inputs[text_input]"]
        error = rpc_error(stub.ModelInfer, both, timeout=30)
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
        assert "raw_input_contents" in error.details()
        assert [v.field for v in bad_request(error).field_violations] == ["inputs[text_input].contents"]
