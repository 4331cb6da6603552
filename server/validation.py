"""Pure checks of incoming requests; each raises InvalidArgument naming every bad field."""

from __future__ import annotations

import json
import math
import re

from google.protobuf import struct_pb2

from llmgrpc.clients.errors import FieldViolation, InvalidArgument, Reason
from llmgrpc.engines.chat import ROLES as CHAT_ROLES
from llmgrpc.engines.weights.hubs import DOWNLOAD_HUBS
from llmgrpc.server import placement
from llmgrpc.v1 import generate_pb2, models_pb2

MODEL_UID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
DEVICE = re.compile(r"^(auto|cpu|cuda|cuda:\d+)$")
# Every decode step of a request checks its stop strings: bounded, so one request cannot
# slow the steps of everything batched with it.
MAX_STOP_STRINGS = 64
MAX_STOP_CHARACTERS = 4096
MAX_LOGPROBS = 20  # alternatives per token, as OpenAI's API and vLLM's default allow
LOGIT_BIAS_LIMIT = 100.0


def _raise_if_any(what: str, violations: list[FieldViolation]) -> None:
    if violations:
        summary = "; ".join(f"{v.field}: {v.description}" for v in violations)
        raise InvalidArgument(f"invalid {what}: {summary}", violations, reason=Reason.INVALID_FIELD)


def check_generate(request: generate_pb2.GenerateRequest) -> None:
    violations: list[FieldViolation] = []

    def bad(field: str, description: str) -> None:
        violations.append(FieldViolation(field, description))

    def optional_number(field: str, valid, description: str) -> None:
        if request.HasField(field):
            value = getattr(request, field)
            if not (math.isfinite(value) and valid(value)):
                bad(field, f"{value!r} is not valid: {description}")

    if not request.model_uid:
        bad("model_uid", "required: the uid of a launched model (ModelService.ListModels lists them)")
    if sum(map(bool, (request.prompt, request.prompt_token_ids, request.messages))) != 1:
        bad("prompt", "set exactly one of prompt (text), prompt_token_ids and messages (a conversation)")
    violations += chat_violations(request)
    if any(token < 0 for token in request.prompt_token_ids):
        bad("prompt_token_ids", "token ids must be 0 or more")
    optional_number("max_tokens", lambda v: v >= 1, "must be at least 1")
    optional_number("temperature", lambda v: v >= 0, "must be 0 (greedy) or more")
    optional_number("top_p", lambda v: 0 < v <= 1, "must be in (0, 1]")
    optional_number("top_k", lambda v: v >= 0, "must be 0 (all tokens) or more")
    optional_number("min_p", lambda v: 0 <= v <= 1, "must be in [0, 1]")
    optional_number("repetition_penalty", lambda v: v > 0, "must be greater than 0 (1 is off)")
    optional_number("presence_penalty", lambda v: -2 <= v <= 2, "must be in [-2, 2]")
    optional_number("frequency_penalty", lambda v: -2 <= v <= 2, "must be in [-2, 2]")
    optional_number("min_tokens", lambda v: v >= 0, "must be 0 or more")
    if (
        request.HasField("min_tokens")
        and request.HasField("max_tokens")
        and request.min_tokens > request.max_tokens
    ):
        bad("min_tokens", f"{request.min_tokens} is more than max_tokens {request.max_tokens}")
    if len(request.stop) > MAX_STOP_STRINGS:  # checked first: then no need to read them all
        bad("stop", f"{len(request.stop)} stop strings: at most {MAX_STOP_STRINGS}")
    elif any(not stop for stop in request.stop):
        bad("stop", "stop strings must not be empty")
    elif (characters := sum(len(stop) for stop in request.stop)) > MAX_STOP_CHARACTERS:
        bad("stop", f"stop strings of {characters} characters in all: at most {MAX_STOP_CHARACTERS}")
    if any(token < 0 for token in request.stop_token_ids):
        bad("stop_token_ids", "token ids must be 0 or more")
    optional_number("logprobs", lambda v: 0 <= v <= MAX_LOGPROBS, f"must be in [0, {MAX_LOGPROBS}]")
    optional_number("truncate_prompt_tokens", lambda v: v >= 1, "must be at least 1 (prompt tokens kept)")
    violations += _logit_bias_violations(request.logit_bias)
    if request.HasField("structured_output"):
        violations += _structured_output_violations(request.structured_output)
    _raise_if_any("GenerateRequest", violations)


def _logit_bias_violations(logit_bias) -> list[FieldViolation]:
    if any(token < 0 for token in logit_bias):
        return [FieldViolation("logit_bias", "token ids must be 0 or more")]
    out_of_range = [
        f"{token}: {bias!r}"
        for token, bias in logit_bias.items()
        if not (math.isfinite(bias) and -LOGIT_BIAS_LIMIT <= bias <= LOGIT_BIAS_LIMIT)
    ]
    if out_of_range:
        return [
            FieldViolation(
                "logit_bias",
                f"biases must be in [-{LOGIT_BIAS_LIMIT:g}, {LOGIT_BIAS_LIMIT:g}]; "
                f"not {', '.join(out_of_range[:5])}",
            )
        ]
    return []


def _structured_output_violations(structured: generate_pb2.StructuredOutput) -> list[FieldViolation]:
    """What can be told without the model's tokenizer; the worker compiles the format and
    names the field when it does not compile (an invalid regex, grammar or JSON Schema)."""
    kind = structured.WhichOneof("kind")
    if kind is None:
        return [
            FieldViolation(
                "structured_output", "set one of json_schema, regex, choice, grammar and json_object"
            )
        ]
    field_name = f"structured_output.{kind}"
    if kind == "choice":
        choices = structured.choice.choices
        if not choices:
            return [FieldViolation("structured_output.choice.choices", "give at least one choice")]
        if any(not choice for choice in choices):
            return [FieldViolation("structured_output.choice.choices", "choices must not be empty")]
    elif kind == "json_object":
        if not structured.json_object:
            return [FieldViolation(field_name, "must be true (any JSON object); unset it for free text")]
    elif not getattr(structured, kind):
        return [FieldViolation(field_name, "must not be empty")]
    elif kind == "json_schema":
        try:
            schema = json.loads(structured.json_schema)
        except ValueError as error:
            return [FieldViolation(field_name, f"not JSON: {error}")]
        if not isinstance(schema, (dict, bool)):
            return [FieldViolation(field_name, "a JSON Schema is a JSON object (or true or false)")]
    return []


def check_tokenize(request: generate_pb2.TokenizeRequest) -> None:
    check_model_uid(request.model_uid)


def check_detokenize(request: generate_pb2.DetokenizeRequest) -> None:
    violations: list[FieldViolation] = []
    if not request.model_uid:
        violations.append(FieldViolation("model_uid", "required: the uid of a launched model"))
    if any(token < 0 for token in request.token_ids):
        violations.append(FieldViolation("token_ids", "token ids must be 0 or more"))
    _raise_if_any("DetokenizeRequest", violations)


# What a tool's parameters may be: a JSON Schema of an object.
MAX_TOOLS = 128


def chat_violations(request: generate_pb2.GenerateRequest) -> list[FieldViolation]:
    """What is wrong with a request's messages, tools and tool_choice (nothing without them)."""
    violations: list[FieldViolation] = []
    if not request.messages:
        if request.tools or request.tool_choice or request.HasField("add_generation_prompt"):
            violations.append(
                FieldViolation("tools", "tools, tool_choice and add_generation_prompt go with messages")
            )
        return violations
    for index, message in enumerate(request.messages):
        if message.role not in CHAT_ROLES:
            violations.append(
                FieldViolation(
                    f"messages[{index}].role", f"{message.role!r} is not a role: {', '.join(CHAT_ROLES)}"
                )
            )
        for call_index, call in enumerate(message.tool_calls):
            if not _is_json_object(call.arguments or "{}"):
                violations.append(
                    FieldViolation(
                        f"messages[{index}].tool_calls[{call_index}].arguments",
                        "must be a JSON object (as text)",
                    )
                )
    if len(request.tools) > MAX_TOOLS:
        violations.append(FieldViolation("tools", f"{len(request.tools)} tools: at most {MAX_TOOLS}"))
    names = [tool.name for tool in request.tools]
    for index, tool in enumerate(request.tools):
        if not tool.name:
            violations.append(FieldViolation(f"tools[{index}].name", "required"))
        elif names.count(tool.name) > 1:
            violations.append(FieldViolation(f"tools[{index}].name", f"{tool.name!r} is given twice"))
        if tool.parameters and (problem := _schema_problem(tool.parameters)):
            violations.append(FieldViolation(f"tools[{index}].parameters", f"not a JSON Schema: {problem}"))
    if request.tool_choice and request.tool_choice not in ("auto", "none", "required", *names):
        valid = ", ".join(["auto", "none", "required", *names])
        violations.append(
            FieldViolation("tool_choice", f"{request.tool_choice!r} names no given tool; valid: {valid}")
        )
    if request.tool_choice in ("required", *names) and not request.tools:
        violations.append(FieldViolation("tool_choice", "a call is required but no tools are given"))
    if (
        request.tool_choice
        and request.tool_choice not in ("auto", "none")
        and request.HasField("structured_output")
    ):
        violations.append(
            FieldViolation("structured_output", "cannot be combined with a required tool call (tool_choice)")
        )
    return violations


def _is_json_object(text: str) -> bool:
    try:
        return isinstance(json.loads(text), dict)
    except ValueError:
        return False


def _schema_problem(text: str) -> str | None:
    """Why text is not a JSON Schema of an object, or None."""
    import jsonschema

    try:
        schema = json.loads(text)
    except ValueError as error:
        return f"not JSON ({error})"
    if not isinstance(schema, dict):
        return "a schema is a JSON object"
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as error:
        return error.message
    if schema.get("type", "object") != "object":
        return f"a tool's arguments are an object, not {schema.get('type')!r}"
    return None


def check_launch(request: models_pb2.LaunchModelRequest) -> None:
    violations: list[FieldViolation] = []
    if not request.model_name:
        violations.append(
            FieldViolation("model_name", "required: a family name (ModelService.ListSpecs lists them)")
        )
    if request.model_uid and not MODEL_UID.match(request.model_uid):
        violations.append(
            FieldViolation(
                "model_uid",
                f"{request.model_uid!r} is not valid: 1 to 64 letters, digits, '.', '_' or '-', "
                "starting with a letter or digit",
            )
        )
    if request.device and not DEVICE.match(request.device):
        violations.append(
            FieldViolation("device", f"{request.device!r} is not valid: auto, cpu, cuda or cuda:N")
        )
    if request.HasField("engine_options"):
        for path in _non_finite_numbers(request.engine_options, "engine_options"):
            violations.append(FieldViolation(path, "numbers must be finite (JSON has no NaN or Infinity)"))
    if request.HasField("idle_unload_s") and not (
        math.isfinite(request.idle_unload_s) and request.idle_unload_s >= 0
    ):
        violations.append(
            FieldViolation(
                "idle_unload_s", f"{request.idle_unload_s!r} is not valid: seconds, 0 or more (0: never)"
            )
        )
    replica = request.replica if request.HasField("replica") else 1
    replica_violations = placement.replica_violations(replica, request.gpu_idx)
    violations += replica_violations
    # n_gpu and the device speak of one replica: gpu_idx's share of the first one.
    gpu_idx = list(request.gpu_idx)
    one_replica = gpu_idx if replica_violations else gpu_idx[: len(gpu_idx) // replica]
    violations += placement.word_violations(request.device, request.n_gpu, one_replica)
    violations += _download_hub_violations(request.download_hub)
    _raise_if_any("LaunchModelRequest", violations)


def check_download(request: models_pb2.DownloadModelRequest) -> None:
    violations: list[FieldViolation] = []
    if not request.model_name:
        violations.append(
            FieldViolation("model_name", "required: a family name (ModelService.ListSpecs lists them)")
        )
    violations += _download_hub_violations(request.download_hub)
    _raise_if_any("DownloadModelRequest", violations)


def _download_hub_violations(download_hub: str) -> list[FieldViolation]:
    if download_hub and download_hub not in DOWNLOAD_HUBS:
        return [
            FieldViolation(
                "download_hub", f"{download_hub!r} is not valid: {', '.join(DOWNLOAD_HUBS)} (empty: auto)"
            )
        ]
    return []


def check_model_uid(model_uid: str) -> None:
    if not model_uid:
        _raise_if_any("request", [FieldViolation("model_uid", "required: the uid of a launched model")])


def _non_finite_numbers(struct: struct_pb2.Struct, prefix: str):
    """Paths of NaN and infinite numbers in a Struct (they have no JSON form)."""

    def walk(value: struct_pb2.Value, path: str):
        kind = value.WhichOneof("kind")
        if kind == "number_value" and not math.isfinite(value.number_value):
            yield path
        elif kind == "struct_value":
            for key, item in value.struct_value.fields.items():
                yield from walk(item, f"{path}.{key}")
        elif kind == "list_value":
            for index, item in enumerate(value.list_value.values):
                yield from walk(item, f"{path}[{index}]")

    for key, item in struct.fields.items():
        yield from walk(item, f"{prefix}.{key}")
