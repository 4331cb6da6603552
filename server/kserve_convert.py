"""KServe v2 <-> llmgrpc: ModelInferRequest tensors as a GenerateRequest, and the answers back.

Owner: the KServe v2 protocol's conversions (``llmgrpc.server.kserve`` serves it). Pure
conversion and validation: tensors are named as Triton's vLLM backend names them: inputs
``text_input`` (BYTES), ``stream`` and ``exclude_input_in_output`` (BOOL),
``sampling_parameters`` (BYTES holding a JSON object with vLLM's sampling names); output
``text_output`` (BYTES). Bad tensors and sampling parameters raise ``InvalidArgument`` naming
the fault; RepositoryModelLoad's parameters become a LaunchModel request.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from typing import Any

from llmgrpc.clients.client import SAMPLING_KNOBS
from llmgrpc.clients.errors import FieldViolation, InvalidArgument, Reason
from llmgrpc.kserve.v2 import grpc_service_pb2 as pb
from llmgrpc.server.launched import ModelState
from llmgrpc.server.manager import LaunchRequest
from llmgrpc.server.validation import check_generate, check_launch, check_model_uid, parse_json
from llmgrpc.v1 import generate_pb2, models_pb2

MODEL_VERSION = "1"  # llmgrpc models have one version
EXTENSIONS = ("model_repository", "statistics", "parameters")

TEXT_INPUT, STREAM, SAMPLING_PARAMETERS, EXCLUDE_INPUT = (
    "text_input",
    "stream",
    "sampling_parameters",
    "exclude_input_in_output",
)
TEXT_OUTPUT = "text_output"
# Each input's data type; all hold one element (shape [1], or [1, 1] with a batch dimension).
INPUT_TYPES = {TEXT_INPUT: "BYTES", STREAM: "BOOL", SAMPLING_PARAMETERS: "BYTES", EXCLUDE_INPUT: "BOOL"}
LORA_NAME = "lora_name"  # in sampling_parameters: a LoRA adapter of the model (Triton vLLM backend)
FINAL_RESPONSE = "triton_final_response"
ENABLE_EMPTY_FINAL_RESPONSE = "triton_enable_empty_final_response"

# Triton's vLLM backend: its sampling_parameters names (vLLM's, which GenerateRequest's fields
# share), each with its type; logprobs are not taken, since text_output has no place for them.
# Values may come as JSON numbers or as strings (the backend's own examples send strings).
SAMPLING_FIELDS: dict[str, type] = {
    **{name: kind for name, kind in SAMPLING_KNOBS.items() if name != "logprobs"},
    "ignore_eos": bool,
    "stop": list,
    "stop_token_ids": list,
}
FINISH_REASONS = {generate_pb2.FINISH_REASON_STOP: "stop", generate_pb2.FINISH_REASON_LENGTH: "length"}
# Repository states in Triton's words.
TRITON_STATES = {
    ModelState.READY: "READY",
    ModelState.LOADING: "LOADING",
    ModelState.FAILED: "UNAVAILABLE",
    ModelState.UNLOADED: "UNAVAILABLE",
    ModelState.TERMINATING: "UNLOADING",
}
# RepositoryModelLoad's parameters: the words of LaunchModel that choose what to launch.
LAUNCH_WORDS = ("model_name", "model_engine", "model_format", "size_in_billions", "quantization", "device")


def invalid_inference(field: str, description: str) -> InvalidArgument:
    return InvalidArgument(
        f"invalid ModelInferRequest: {field}: {description}",
        [FieldViolation(field, description)],
        reason=Reason.INVALID_FIELD,
    )


# Tensors.


def _bytes_elements(data: bytes, field: str) -> list[bytes]:
    """A raw BYTES tensor: each element a 4-byte little-endian length, then its bytes."""
    elements, position = [], 0
    while position < len(data):
        if position + 4 > len(data):
            raise invalid_inference(field, "raw BYTES contents end inside an element's 4-byte length")
        (length,) = struct.unpack_from("<I", data, position)
        position += 4
        if position + length > len(data):
            raise invalid_inference(
                field, f"raw BYTES element of {length} bytes runs past the end of the contents"
            )
        elements.append(data[position : position + length])
        position += length
    return elements


def encode_bytes(*elements: bytes) -> bytes:
    return b"".join(struct.pack("<I", len(element)) + element for element in elements)


def _element(tensor: pb.ModelInferRequest.InferInputTensor, raw: bytes | None) -> bytes | bool:
    """The one element of an input tensor, checked against its name's data type and shape."""
    field = f"inputs[{tensor.name}]"
    expected = INPUT_TYPES[tensor.name]
    if tensor.datatype != expected:
        raise invalid_inference(
            field, f"datatype {tensor.datatype or '(none)'} is not valid: must be {expected}"
        )
    if any(dimension < 0 for dimension in tensor.shape):
        raise invalid_inference(
            field, f"shape {list(tensor.shape)} is not valid: dimensions are 0 or more; shape [1]"
        )
    if math.prod(tensor.shape) != 1 or not tensor.shape:
        raise invalid_inference(field, f"shape {list(tensor.shape)} is not valid: one element, shape [1]")
    if expected == "BYTES":
        elements = _bytes_elements(raw, field) if raw is not None else list(tensor.contents.bytes_contents)
    else:
        elements = [bool(byte) for byte in raw] if raw is not None else list(tensor.contents.bool_contents)
    if len(elements) != 1:
        raise invalid_inference(
            field, f"{len(elements)} elements given for shape {list(tensor.shape)}: must be 1"
        )
    return elements[0]


def read_inputs(request: pb.ModelInferRequest) -> dict[str, bytes | bool]:
    """Each input tensor's element by name; unknown names, data types and shapes are refused."""
    if request.raw_input_contents and len(request.raw_input_contents) != len(request.inputs):
        raise invalid_inference(
            "raw_input_contents",
            f"{len(request.raw_input_contents)} entries for {len(request.inputs)} inputs: one per input",
        )
    values: dict[str, bytes | bool] = {}
    for index, tensor in enumerate(request.inputs):
        if tensor.name not in INPUT_TYPES:
            raise invalid_inference(
                f"inputs[{tensor.name}]",
                f"unknown input tensor {tensor.name!r}: the inputs are {', '.join(INPUT_TYPES)}",
            )
        if tensor.name in values:
            raise invalid_inference(f"inputs[{tensor.name}]", "given twice")
        if request.raw_input_contents and tensor.HasField("contents"):
            raise invalid_inference(
                f"inputs[{tensor.name}].contents",
                "given together with raw_input_contents: send every input's data in one of them",
            )
        raw = request.raw_input_contents[index] if request.raw_input_contents else None
        values[tensor.name] = _element(tensor, raw)
    for output in request.outputs:
        if output.name != TEXT_OUTPUT:
            raise invalid_inference(
                f"outputs[{output.name}]",
                f"unknown output tensor {output.name!r}: the output is {TEXT_OUTPUT}",
            )
    return values


# Sampling parameters.


def _sampling_value(key: str, value: Any, kind: type) -> Any:
    field = f"{SAMPLING_PARAMETERS}.{key}"
    if kind is list:
        items = [value] if isinstance(value, str) else value
        element = str if key == "stop" else int
        if not isinstance(items, list) or not all(
            isinstance(item, element) and not isinstance(item, bool) for item in items
        ):
            raise invalid_inference(field, f"{value!r} is not valid: a list of {element.__name__}")
        return items
    if kind is bool:
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        if isinstance(value, bool):
            return value
        raise invalid_inference(field, f"{value!r} is not valid: true or false")
    try:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ValueError
        number = float(value)
        if kind is int:
            if not number.is_integer():
                raise ValueError
            return int(number)
        return number
    except (ValueError, OverflowError):
        raise invalid_inference(
            field, f"{value!r} is not valid: a {'whole ' if kind is int else ''}number"
        ) from None


def apply_sampling_parameters(text: bytes, request: generate_pb2.GenerateRequest) -> None:
    """Set request's sampling fields from sampling_parameters' JSON (vLLM's names)."""
    parameters = parse_json(text, SAMPLING_PARAMETERS)
    if not isinstance(parameters, dict):
        raise invalid_inference(SAMPLING_PARAMETERS, "must be a JSON object of vLLM sampling parameters")
    # The Triton vLLM backend's way to name a LoRA adapter; the model name's base:adapter is the other.
    lora_name = parameters.pop(LORA_NAME, None)
    if lora_name is not None:
        if not isinstance(lora_name, str) or (request.adapter and lora_name != request.adapter):
            raise invalid_inference(
                f"{SAMPLING_PARAMETERS}.{LORA_NAME}",
                f"{lora_name!r} is not valid: an adapter's name (or the one the model name gives after ':')",
            )
        request.adapter = lora_name
    unknown = sorted(set(parameters) - set(SAMPLING_FIELDS))
    if unknown:
        raise invalid_inference(
            SAMPLING_PARAMETERS,
            f"unknown sampling parameters {', '.join(unknown)}: known are {', '.join(SAMPLING_FIELDS)}",
        )
    for key, value in parameters.items():
        kind = SAMPLING_FIELDS[key]
        value = _sampling_value(key, value, kind)
        if key == "top_k" and value == -1:  # vLLM's "all tokens"
            value = 0
        if kind is list:
            getattr(request, key).extend(value)
        else:
            try:
                setattr(request, key, value)
            except (ValueError, TypeError):  # out of the field's range (int32, int64)
                raise invalid_inference(
                    f"{SAMPLING_PARAMETERS}.{key}", f"{value!r} is out of range"
                ) from None


@dataclass(frozen=True)
class Inference:
    """A ModelInferRequest in domain terms: the generation and how to answer it."""

    id: str
    request: generate_pb2.GenerateRequest
    stream: bool
    prepend_prompt: bool
    empty_final_response: bool

    @classmethod
    def from_pb(cls, pb_request: pb.ModelInferRequest) -> Inference:
        """model_name is a model's uid, or uid:adapter for one of its LoRA adapters."""
        model_uid, _, adapter = pb_request.model_name.partition(":")
        check_model_uid(model_uid)
        inputs = read_inputs(pb_request)
        if TEXT_INPUT not in inputs:
            raise invalid_inference(f"inputs[{TEXT_INPUT}]", "required: the prompt, BYTES of shape [1]")
        try:
            prompt = bytes(inputs[TEXT_INPUT]).decode("utf-8")
        except UnicodeDecodeError:
            raise invalid_inference(f"inputs[{TEXT_INPUT}]", "not valid UTF-8 text") from None
        request = generate_pb2.GenerateRequest(model_uid=model_uid, prompt=prompt, adapter=adapter)
        if SAMPLING_PARAMETERS in inputs:
            apply_sampling_parameters(bytes(inputs[SAMPLING_PARAMETERS]), request)
        check_generate(request)
        stream = bool(inputs.get(STREAM, False))
        parameter = pb_request.parameters.get(ENABLE_EMPTY_FINAL_RESPONSE)
        return cls(
            id=pb_request.id,
            request=request,
            stream=stream,
            # As Triton's vLLM backend: the prompt comes first in whole outputs, never in pieces.
            prepend_prompt=not stream and not inputs.get(EXCLUDE_INPUT, False),
            empty_final_response=parameter is not None and parameter.bool_param,
        )

    def response(self, text: str | None, **parameters: bool | int | str) -> pb.ModelInferResponse:
        """A response carrying text_output (None: an empty response) and the given parameters."""
        response = pb.ModelInferResponse(
            model_name=self.request.model_uid, model_version=MODEL_VERSION, id=self.id
        )
        if text is not None:
            response.outputs.add(name=TEXT_OUTPUT, datatype="BYTES", shape=[1])
            response.raw_output_contents.append(encode_bytes(text.encode("utf-8")))
        for name, value in parameters.items():
            if isinstance(value, bool):
                response.parameters[name].bool_param = value
            elif isinstance(value, int):
                response.parameters[name].int64_param = value
            else:
                response.parameters[name].string_param = value
        return response

    def answers(self, last: generate_pb2.GenerateResponse, text: str) -> list[pb.ModelInferResponse]:
        """What ends a request: its last text with the finish reason and usage, flagged final
        (or followed by an empty final response, when the request asked for one)."""
        usage = {
            "finish_reason": FINISH_REASONS.get(last.finish_reason, "cancelled"),
            "prompt_tokens": last.usage.prompt_tokens,
            "completion_tokens": last.usage.completion_tokens,
        }
        if not self.empty_final_response:
            return [self.response(text, **{FINAL_RESPONSE: True}, **usage)]
        return [
            self.response(text, **{FINAL_RESPONSE: False}, **usage),
            self.response(None, **{FINAL_RESPONSE: True}),
        ]


def model_metadata(model) -> pb.ModelMetadataResponse:
    tensor = pb.ModelMetadataResponse.TensorMetadata
    engine = model.selection.engine if model.selection else model.query.model_engine
    return pb.ModelMetadataResponse(
        name=model.uid,
        versions=[MODEL_VERSION],
        platform=f"llmgrpc/{engine or 'auto'}",
        inputs=[tensor(name=name, datatype=datatype, shape=[1]) for name, datatype in INPUT_TYPES.items()],
        outputs=[tensor(name=TEXT_OUTPUT, datatype="BYTES", shape=[-1])],
    )


def launch_request(pb_request: pb.RepositoryModelLoadRequest) -> LaunchRequest:
    """RepositoryModelLoad's name and parameters as a LaunchModel request: the name is the uid;
    the parameters (or a parameter config, a JSON object, as tritonclient's load_model sends)
    carry the launch's words; the family defaults to the name."""
    words: dict[str, Any] = {}
    for key, parameter in pb_request.parameters.items():
        kind = parameter.WhichOneof("parameter_choice")
        if key == "config" and kind == "string_param":
            config = parse_json(parameter.string_param or "{}", "parameters[config]")
            if not isinstance(config, dict):
                raise _load_invalid("parameters[config]", "must be a JSON object of launch words")
            words.update(config)
        elif key in LAUNCH_WORDS and kind in ("string_param", "int64_param"):
            words[key] = getattr(parameter, kind)
        else:
            raise _load_invalid(
                f"parameters[{key}]",
                f"not a launch parameter: {', '.join(LAUNCH_WORDS)} (strings), or config (JSON of them)",
            )
    unknown = sorted(set(words) - set(LAUNCH_WORDS))
    if unknown:
        raise _load_invalid(
            "parameters", f"unknown launch words {', '.join(unknown)}: {', '.join(LAUNCH_WORDS)}"
        )
    launch = models_pb2.LaunchModelRequest(
        model_uid=pb_request.model_name,
        model_name=str(words.get("model_name") or pb_request.model_name),
        model_engine=str(words.get("model_engine", "")),
        model_format=str(words.get("model_format", "")),
        size_in_billions=str(words.get("size_in_billions", "")),
        quantization=str(words.get("quantization", "")),
        device=str(words.get("device", "")),
    )
    check_launch(launch)
    return LaunchRequest.from_pb(launch)


def _load_invalid(field: str, description: str) -> InvalidArgument:
    return InvalidArgument(
        f"invalid RepositoryModelLoadRequest: {field}: {description}",
        [FieldViolation(field, description)],
        reason=Reason.INVALID_FIELD,
    )
