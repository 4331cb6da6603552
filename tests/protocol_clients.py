"""Third-party clients of the standard inference protocols, run in a process of their own.

Triton's client (tritonclient) and a TGIS client generated from the TGIS proto register the
protocols' messages (packages ``inference`` and ``fmaas``) in protobuf's default pool, as the
server's own stubs do: one process cannot hold both, so the tests run these scenarios here,
against the server they started, and read the JSON each prints.

Usage: python tests/protocol_clients.py SCENARIO ENDPOINT [ARGUMENTS_JSON]
"""

from __future__ import annotations

import json
import queue
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np

PROTOS = Path(__file__).resolve().parents[1] / "protos"
# JSON nested deeper than Python's parser goes (it raises RecursionError, not a ValueError).
DEEP_JSON = '{"a": ' * 5000 + "1" + "}" * 5000
TGIS_PROTO = PROTOS / "llmgrpc" / "tgis" / "v1" / "generation.proto"


# Triton's client.


def _triton(endpoint: str):
    import tritonclient.grpc as triton

    return triton, triton.InferenceServerClient(endpoint)


def _inputs(triton, prompt: str, sampling: dict | None = None, *, stream: bool | None = None, exclude=None):
    """The tensors Triton's vLLM backend takes, built as its users build them."""

    def tensor(name: str, datatype: str, value):
        item = triton.InferInput(name, [1], datatype)
        item.set_data_from_numpy(np.array([value], dtype=object if datatype == "BYTES" else bool))
        return item

    inputs = [tensor("text_input", "BYTES", prompt.encode())]
    if stream is not None:
        inputs.append(tensor("stream", "BOOL", stream))
    if sampling is not None:
        inputs.append(tensor("sampling_parameters", "BYTES", json.dumps(sampling).encode()))
    if exclude is not None:
        inputs.append(tensor("exclude_input_in_output", "BOOL", exclude))
    return inputs


def _text(result) -> str:
    output = result.as_numpy("text_output")
    return output[0].decode() if output is not None else None


def _error(call) -> dict:
    """The status a call failed with, as tritonclient reports it."""
    from tritonclient.utils import InferenceServerException

    try:
        call()
    except InferenceServerException as error:
        return {"status": error.status(), "message": error.message()}
    return {"status": "OK"}


def triton_basics(endpoint: str, model: str) -> dict:
    triton, client = _triton(endpoint)
    metadata = client.get_model_metadata(model, as_json=True)
    server = client.get_server_metadata(as_json=True)
    return {
        "live": client.is_server_live(),
        "ready": client.is_server_ready(),
        "model_ready": client.is_model_ready(model),
        "unknown_model_ready": client.is_model_ready("no-such-model"),
        "inputs": {t["name"]: t["datatype"] for t in metadata["inputs"]},
        "outputs": {t["name"]: t["datatype"] for t in metadata["outputs"]},
        "server": server,
        "statistics": client.get_inference_statistics(model, as_json=True),
    }


def triton_infer(endpoint: str, model: str, prompt: str, sampling: dict) -> dict:
    triton, client = _triton(endpoint)
    excluded = client.infer(model, _inputs(triton, prompt, sampling, exclude=True), request_id="r1")
    whole = client.infer(model, _inputs(triton, prompt, sampling))
    return {"text": _text(excluded), "id": excluded.get_response().id, "with_prompt": _text(whole)}


def triton_stream(endpoint: str, model: str, prompt: str, sampling: dict) -> dict:
    triton, client = _triton(endpoint)
    results: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    client.async_stream_infer(
        model,
        _inputs(triton, prompt, sampling, stream=True),
        request_id="s1",
        enable_empty_final_response=True,
    )
    pieces, finals, ids = [], [], set()
    while True:
        result, error = results.get(timeout=60)
        assert error is None, error
        response = result.get_response()
        ids.add(response.id)
        final = response.parameters["triton_final_response"].bool_param
        text = _text(result)
        pieces.append(text)
        finals.append(final)
        if final:
            break
    client.stop_stream()
    return {"pieces": pieces, "finals": finals, "ids": sorted(ids)}


def triton_cancel(endpoint: str, model: str, prompt: str, sampling: dict) -> dict:
    """Cancel a stream mid-generation and time how long the model keeps a request running."""
    from llmgrpc.clients import Client

    triton, client = _triton(endpoint)
    results: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    client.async_stream_infer(model, _inputs(triton, prompt, sampling, stream=True), request_id="c1")
    first, _ = results.get(timeout=60)
    with Client(endpoint) as llmgrpc_client:
        running_before = llmgrpc_client.get_model(model).running_requests
        cancelled_at = time.monotonic()
        client.stop_stream(cancel_requests=True)
        while llmgrpc_client.get_model(model).running_requests and time.monotonic() - cancelled_at < 30:
            time.sleep(0.01)
        return {
            "first_piece": _text(first),
            "running_before": running_before,
            "running_after": llmgrpc_client.get_model(model).running_requests,
            "seconds_to_idle": time.monotonic() - cancelled_at,
        }


def triton_lifecycle(endpoint: str, uid: str, family: str, admin: str, inference: str) -> dict:
    import tritonclient.grpc as triton

    admin_client = triton.InferenceServerClient(endpoint)
    as_admin = {"authorization": f"Bearer {admin}"}
    as_inference = {"authorization": f"Bearer {inference}"}
    refused = _error(
        partial(admin_client.load_model, uid, headers=as_inference, config=json.dumps({"model_name": family}))
    )
    admin_client.load_model(uid, headers=as_admin, config=json.dumps({"model_name": family}))
    loaded = admin_client.get_model_repository_index(headers=as_inference, as_json=True)
    ready = admin_client.is_model_ready(uid, headers=as_inference)
    refused_unload = _error(partial(admin_client.unload_model, uid, headers=as_inference))
    admin_client.unload_model(uid, headers=as_admin)
    unloaded = admin_client.get_model_repository_index(headers=as_inference, as_json=True)
    return {
        "refused_load": refused,
        "refused_unload": refused_unload,
        "index_loaded": loaded.get("models", []),
        "ready": ready,
        "index_unloaded": unloaded.get("models", []),
        "unauthenticated": _error(partial(admin_client.is_server_live)),
    }


def triton_bad_input(endpoint: str, model: str) -> dict:
    triton, client = _triton(endpoint)

    def infer(inputs, name=model):
        return _error(partial(client.infer, name, inputs))

    wrong_type = triton.InferInput("text_input", [1], "INT32")
    wrong_type.set_data_from_numpy(np.array([1], dtype=np.int32))
    unknown = triton.InferInput("prompt", [1], "BYTES")
    unknown.set_data_from_numpy(np.array([b"hi"], dtype=object))
    two = triton.InferInput("text_input", [2], "BYTES")
    two.set_data_from_numpy(np.array([b"a", b"b"], dtype=object))
    malformed = _inputs(triton, "hi")
    json_tensor = triton.InferInput("sampling_parameters", [1], "BYTES")
    json_tensor.set_data_from_numpy(np.array([b"{not json"], dtype=object))
    deep_tensor = triton.InferInput("sampling_parameters", [1], "BYTES")
    deep_tensor.set_data_from_numpy(np.array([DEEP_JSON.encode()], dtype=object))
    return {
        "unknown_tensor": infer([unknown]),
        "wrong_datatype": infer([wrong_type]),
        "wrong_shape": infer([two]),
        "malformed_json": infer([*malformed, json_tensor]),
        "deep_json": infer([*_inputs(triton, "hi"), deep_tensor]),
        "unknown_key": infer(_inputs(triton, "hi", {"temperature": 0, "beam_width": 4})),
        "out_of_range": infer(_inputs(triton, "hi", {"temperature": -1})),
        "unknown_model": infer(_inputs(triton, "hi"), name="no-such-model"),
        "stream_in_unary": infer(_inputs(triton, "hi", stream=True)),
    }


def triton_bench(endpoint: str, model: str, prompt: str, sampling: dict, streams: int) -> dict:
    """streams concurrent requests on one ModelStreamInfer call; their pieces and the wall time."""
    triton, client = _triton(endpoint)
    results: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    started = time.monotonic()
    for index in range(streams):
        client.async_stream_infer(
            model, _inputs(triton, prompt, sampling, stream=True), request_id=str(index)
        )
    finished, tokens = 0, 0
    while finished < streams:
        result, error = results.get(timeout=300)
        assert error is None, error
        response = result.get_response()
        if response.parameters["triton_final_response"].bool_param:
            finished += 1
            tokens += response.parameters["completion_tokens"].int64_param
    seconds = time.monotonic() - started
    client.stop_stream()
    return {"tokens": tokens, "seconds": seconds}


# A TGIS client, generated from the protocol's proto as its users generate it.


def _tgis(endpoint: str):
    import grpc
    from grpc_tools import protoc

    out = tempfile.mkdtemp(prefix="tgis-client-")
    args = [
        "protoc",
        f"-I{TGIS_PROTO.parent}",
        f"--python_out={out}",
        f"--grpc_python_out={out}",
        TGIS_PROTO.name,
    ]
    assert protoc.main(args) == 0, "protoc failed"
    sys.path.insert(0, out)
    import generation_pb2
    import generation_pb2_grpc

    return generation_pb2, generation_pb2_grpc.GenerationServiceStub(grpc.insecure_channel(endpoint))


def tgis(endpoint: str, model: str, prompts: list[str], max_new_tokens: int) -> dict:
    from google.protobuf.json_format import MessageToDict

    pb, stub = _tgis(endpoint)
    params = pb.Parameters(method=pb.GREEDY, stopping=pb.StoppingCriteria(max_new_tokens=max_new_tokens))
    batch = stub.Generate(
        pb.BatchedGenerationRequest(
            model_id=model, requests=[pb.GenerationRequest(text=p) for p in prompts], params=params
        )
    )
    stream = list(
        stub.GenerateStream(
            pb.SingleGenerationRequest(
                model_id=model, request=pb.GenerationRequest(text=prompts[0]), params=params
            )
        )
    )
    tokenized = stub.Tokenize(
        pb.BatchedTokenizeRequest(
            model_id=model, requests=[pb.TokenizeRequest(text=p) for p in prompts], return_tokens=True
        )
    )
    info = stub.ModelInfo(pb.ModelInfoRequest(model_id=model))
    sampled = stub.Generate(
        pb.BatchedGenerationRequest(
            model_id=model,
            requests=[pb.GenerationRequest(text=prompts[0])],
            params=pb.Parameters(
                method=pb.SAMPLE,
                sampling=pb.SamplingParameters(temperature=0.8, top_k=20, seed=7),
                stopping=pb.StoppingCriteria(max_new_tokens=max_new_tokens, stop_sequences=["zzzz"]),
            ),
        )
    )
    import grpc

    def status(call) -> str:
        try:
            call()
        except grpc.RpcError as error:
            return error.code().name
        return "OK"

    return {
        "batch": [MessageToDict(r, preserving_proto_field_name=True) for r in batch.responses],
        "stream": [MessageToDict(r, preserving_proto_field_name=True) for r in stream],
        "tokenize": [MessageToDict(r, preserving_proto_field_name=True) for r in tokenized.responses],
        "info": MessageToDict(
            info, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
        ),
        "sampled": MessageToDict(sampled.responses[0], preserving_proto_field_name=True),
        "unknown_model": status(lambda: stub.ModelInfo(pb.ModelInfoRequest(model_id="no-such-model"))),
        "typical_p": status(
            lambda: stub.Generate(
                pb.BatchedGenerationRequest(
                    model_id=model,
                    requests=[pb.GenerationRequest(text="hi")],
                    params=pb.Parameters(method=pb.SAMPLE, sampling=pb.SamplingParameters(typical_p=0.5)),
                )
            )
        ),
        **{
            name: status(
                lambda decoding=decoding: stub.Generate(
                    pb.BatchedGenerationRequest(
                        model_id=model,
                        requests=[pb.GenerationRequest(text="hi")],
                        params=pb.Parameters(method=pb.GREEDY, decoding=decoding),
                    )
                )
            )
            for name, decoding in (
                ("deep_json_schema", pb.DecodingParameters(json_schema=DEEP_JSON)),
                ("regex_matching_nothing", pb.DecodingParameters(regex=r"[^\s\S]")),
            )
        },
    }


SCENARIOS = {
    f.__name__: f
    for f in (
        triton_basics,
        triton_infer,
        triton_stream,
        triton_cancel,
        triton_lifecycle,
        triton_bad_input,
        triton_bench,
        tgis,
    )
}


def run(scenario: str, endpoint: str, timeout: float = 300, **arguments) -> dict:
    """Run a scenario in a fresh Python process and return what it printed."""
    result = subprocess.run(
        [sys.executable, __file__, scenario, endpoint, json.dumps(arguments)],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    name, address = sys.argv[1], sys.argv[2]
    kwargs = json.loads(sys.argv[3]) if len(sys.argv) > 3 else {}
    print(json.dumps(SCENARIOS[name](address, **kwargs), default=str))
