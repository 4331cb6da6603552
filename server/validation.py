"""Pure checks of incoming requests; each raises InvalidArgument naming every bad field."""

from __future__ import annotations

import math
import re

from google.protobuf import struct_pb2

from llmgrpc.clients.errors import FieldViolation, InvalidArgument, Reason
from llmgrpc.engines.weights.hubs import DOWNLOAD_HUBS
from llmgrpc.v1 import generate_pb2, models_pb2

MODEL_UID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
DEVICE = re.compile(r"^(auto|cpu|cuda|cuda:\d+)$")
# Every decode step of a request checks its stop strings: bounded, so one request cannot
# slow the steps of everything batched with it.
MAX_STOP_STRINGS = 64
MAX_STOP_CHARACTERS = 4096


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
    if bool(request.prompt) == bool(request.prompt_token_ids):
        bad("prompt", "set exactly one of prompt (text) and prompt_token_ids")
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
    _raise_if_any("GenerateRequest", violations)


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
