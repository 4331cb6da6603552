"""Pure checks of incoming requests; each raises InvalidArgument naming every bad field."""

from __future__ import annotations

import json
import math
import re

from google.protobuf import struct_pb2

from llmgrpc.clients.errors import FieldViolation, InvalidArgument, Reason
from llmgrpc.engines import lora
from llmgrpc.engines.base import SamplingParams
from llmgrpc.engines.chat import ROLES as CHAT_ROLES
from llmgrpc.engines.weights.hubs import DOWNLOAD_HUBS
from llmgrpc.server import placement
from llmgrpc.v1 import generate_pb2, models_pb2

MODEL_UID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
DEVICE = re.compile(r"^(auto|cpu|cuda|cuda:\d+)$")
HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")  # owner/name
# Every decode step of a request checks its stop strings: bounded, so one request cannot
# slow the steps of everything batched with it.
MAX_STOP_STRINGS = 64
MAX_STOP_CHARACTERS = 4096
LOGIT_BIAS_LIMIT = 100.0
# Priorities beyond these are refused: a bounded range keeps ageing's promise (settings'
# priority_ageing_per_s) of how long the least urgent request can be held back.
MIN_PRIORITY, MAX_PRIORITY = -100, 100
# JSON from callers (schemas, tool arguments, sampling parameters) is read by recursive code
# (the parser, jsonschema, the chat template, the grammar library): its nesting is bounded.
MAX_JSON_DEPTH = 64
# A format is compiled, then followed at every step; the grammar library's lexer grows with a
# format's literal text (a megabyte regex or choice fails after its first token, a 64 KiB one
# costs milliseconds a step) and refuses more than 2000 alternatives in one rule.
MAX_FORMAT_CHARACTERS = 65_536
MAX_CHOICES = 1024
# What OpenAI's API allows as a tool's name: an identifier, never markup.
TOOL_NAME = re.compile(r"[a-zA-Z0-9_-]{1,64}")


def parse_json(text: str | bytes, field: str):
    """text as a JSON value; InvalidArgument naming field when it is not JSON or is nested more
    than MAX_JSON_DEPTH deep. Every protocol reads a caller's JSON through this."""
    try:
        value = json.loads(text)
    except RecursionError:  # not a ValueError: deeper than the parser itself goes
        value, too_deep = None, True
    except ValueError as error:  # UnicodeDecodeError too
        raise _invalid_field(field, f"not valid JSON ({error})") from None
    else:
        too_deep = _depth_exceeds(value, MAX_JSON_DEPTH)
    if too_deep:
        raise _invalid_field(field, f"JSON nested more than {MAX_JSON_DEPTH} deep: at most {MAX_JSON_DEPTH}")
    return value


def _depth_exceeds(value, limit: int) -> bool:
    """Whether a parsed JSON value has arrays or objects nested more than limit deep."""
    level = [value]
    for _ in range(limit):
        level = [
            item
            for container in level
            if isinstance(container, (list, dict))
            for item in (container.values() if isinstance(container, dict) else container)
        ]
        if not level:
            return False
    return any(isinstance(item, (list, dict)) for item in level)


def _invalid_field(field: str, description: str) -> InvalidArgument:
    return InvalidArgument(
        f"invalid {field}: {description}", [FieldViolation(field, description)], reason=Reason.INVALID_FIELD
    )


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
    if request.adapter and not lora.NAME_PATTERN.match(request.adapter):
        bad(
            "adapter",
            f"{request.adapter!r} is not an adapter name (ListAdapters lists them; empty: the base)",
        )
    if any(token < 0 for token in request.prompt_token_ids):
        bad("prompt_token_ids", "token ids must be 0 or more")
    for name, knob in SamplingParams.knobs():
        optional_number(name, knob.valid, knob.rule)
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
    violations += _logit_bias_violations(request.logit_bias)
    if not MIN_PRIORITY <= request.priority <= MAX_PRIORITY:
        bad("priority", f"{request.priority} is out of range: must be in [{MIN_PRIORITY}, {MAX_PRIORITY}]")
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
    names the field when it does not compile (an invalid regex, grammar or JSON Schema) or
    can never be satisfied."""
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
        field_name = "structured_output.choice.choices"
        if not choices:
            return [FieldViolation(field_name, "give at least one choice")]
        if len(choices) > MAX_CHOICES:  # checked first: then no need to read them all
            return [FieldViolation(field_name, f"{len(choices)} choices: at most {MAX_CHOICES}")]
        if any(not choice for choice in choices):
            return [FieldViolation(field_name, "choices must not be empty")]
        text_length = sum(len(choice) for choice in choices)
    elif kind == "json_object":
        if not structured.json_object:
            return [FieldViolation(field_name, "must be true (any JSON object); unset it for free text")]
        return []
    elif not getattr(structured, kind):
        return [FieldViolation(field_name, "must not be empty")]
    else:
        text_length = len(getattr(structured, kind))
    if text_length > MAX_FORMAT_CHARACTERS:
        return [
            FieldViolation(
                field_name, f"{text_length} characters: a format has at most {MAX_FORMAT_CHARACTERS}"
            )
        ]
    if kind == "json_schema":
        try:
            schema = parse_json(structured.json_schema, field_name)
        except InvalidArgument as error:
            return error.violations
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
            field_name = f"messages[{index}].tool_calls[{call_index}].arguments"
            try:
                arguments = parse_json(call.arguments or "{}", field_name)
            except InvalidArgument as error:
                violations += error.violations
                continue
            if not isinstance(arguments, dict):
                violations.append(FieldViolation(field_name, "must be a JSON object (as text)"))
    if len(request.tools) > MAX_TOOLS:
        violations.append(FieldViolation("tools", f"{len(request.tools)} tools: at most {MAX_TOOLS}"))
    names = [tool.name for tool in request.tools]
    for index, tool in enumerate(request.tools):
        if not TOOL_NAME.fullmatch(tool.name):
            violations.append(
                FieldViolation(
                    f"tools[{index}].name",
                    f"{tool.name!r} is not a tool name: 1 to 64 letters, digits, '_' or '-'",
                )
            )
        elif names.count(tool.name) > 1:
            violations.append(FieldViolation(f"tools[{index}].name", f"{tool.name!r} is given twice"))
        if tool.parameters:
            violations += _schema_violations(tool.parameters, f"tools[{index}].parameters")
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


def _schema_violations(text: str, field: str) -> list[FieldViolation]:
    """What keeps text from being a JSON Schema of an object (a tool's parameters)."""
    import jsonschema

    try:
        schema = parse_json(text, field)
    except InvalidArgument as error:
        return error.violations
    if not isinstance(schema, dict):
        return [FieldViolation(field, "not a JSON Schema: a schema is a JSON object")]
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as error:
        return [FieldViolation(field, f"not a JSON Schema: {error.message}")]
    if schema.get("type", "object") != "object":
        return [
            FieldViolation(
                field, f"not a JSON Schema: a tool's arguments are an object, not {schema.get('type')!r}"
            )
        ]
    return []


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
    violations += _lora_violations(request)
    _raise_if_any("LaunchModelRequest", violations)


def _lora_violations(request: models_pb2.LaunchModelRequest) -> list[FieldViolation]:
    violations: list[FieldViolation] = []
    names: set[str] = set()
    for index, module in enumerate(request.lora_modules):
        violations += lora_module_violations(module, f"lora_modules[{index}]")
        if module.name in names:
            violations.append(
                FieldViolation(f"lora_modules[{index}].name", f"{module.name!r} is given twice")
            )
        names.add(module.name)
    for field_name, limit in (
        ("max_loras", lora.MAX_LORAS_LIMIT),
        ("max_lora_rank", lora.MAX_LORA_RANK_LIMIT),
    ):
        value = getattr(request, field_name)
        if request.HasField(field_name) and not 1 <= value <= limit:
            violations.append(FieldViolation(field_name, f"{value} is not valid: 1 to {limit}"))
    return violations


def lora_module_violations(module: models_pb2.LoraModule, prefix: str) -> list[FieldViolation]:
    """What is wrong with one LoraModule: its name, its path (a local path or a hub id), its scale."""
    violations = []
    if not lora.NAME_PATTERN.match(module.name):
        violations.append(
            FieldViolation(f"{prefix}.name", f"{module.name!r}: 1 to 64 letters, digits, '.', '_' or '-'")
        )
    if not module.path:
        violations.append(
            FieldViolation(f"{prefix}.path", "required: a local PEFT folder or GGUF file, or a hub id")
        )
    elif not (module.path.startswith("/") or HUB_ID.match(module.path)):
        violations.append(
            FieldViolation(
                f"{prefix}.path", f"{module.path!r}: an absolute local path, or a hub id owner/name"
            )
        )
    if module.HasField("scale") and not math.isfinite(module.scale):
        violations.append(FieldViolation(f"{prefix}.scale", "must be a finite number"))
    return violations


def check_load_adapter(request: models_pb2.LoadAdapterRequest) -> None:
    violations = lora_module_violations(request.adapter, "adapter")
    if not request.model_uid:
        violations.append(FieldViolation("model_uid", "required: the uid of a launched model"))
    _raise_if_any("LoadAdapterRequest", violations)


def check_unload_adapter(request: models_pb2.UnloadAdapterRequest) -> None:
    violations = []
    if not request.model_uid:
        violations.append(FieldViolation("model_uid", "required: the uid of a launched model"))
    if not request.name:
        violations.append(FieldViolation("name", "required: the adapter's name (ListAdapters lists them)"))
    _raise_if_any("UnloadAdapterRequest", violations)


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
