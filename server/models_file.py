"""The models file: the set of models a server launches at start, declared in a file.

YAML (or JSON, which YAML reads too) with one key, ``models``: a list of launches in
LaunchModelRequest's words::

    models:
      - model_name: llama-3.1-instruct    # required: the family
        model_uid: llama                  # default: model_name
        model_engine: llama.cpp           # the rest as in LaunchModelRequest
        model_format: ggufv2
        size_in_billions: "8"
        quantization: Q4_K_M
        device: cuda:0
        engine_options: {n_gpu_layers: -1}
        download_hub: auto                # or model_path: /models/llama.gguf
        idle_unload_s: 600
        replica: 2                        # n_gpu, gpu_idx too
        engine_api_port: 50061            # vLLM's engine contract for this model alone (gateways)
        lora_modules: [sql=/models/sql-lora, {name: chat, path: owner/chat-lora, scale: 0.5}]
        max_loras: 4                      # max_lora_rank too
      - model_name: tiny-llama-3.1

Parsing is pure: ``parse_models`` checks every entry and names the entry and the field of the
first problem (unknown keys are refused, so a typo never silently launches the wrong model).
Each entry becomes a LaunchModelRequest, checked by the same rules as one sent over gRPC.

Reading is bounded: only a regular file of at most ``MAX_BYTES`` is read (a FIFO would block
start-up), and YAML aliases (``*name``) are refused, since nested ones expand exponentially
(a "billion laughs" file of a few hundred bytes would fill the memory).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from llmgrpc.clients.errors import InvalidArgument
from llmgrpc.engines.model_folder import read_regular_file
from llmgrpc.server.manager import LaunchRequest
from llmgrpc.server.registry import SpecQuery
from llmgrpc.server.validation import check_launch
from llmgrpc.v1 import models_pb2

__all__ = ["ModelsFileError", "launch_requests", "load_models_file", "parse_models"]

# A list of launches: kilobytes. Anything much larger is not a models file.
MAX_BYTES = 1024 * 1024

# The spec words, as LaunchModelRequest names them (SpecQuery's fields).
_QUERY_FIELDS = ("model_name", "model_engine", "model_format", "size_in_billions", "quantization")
_TEXT_FIELDS = (*_QUERY_FIELDS, "model_uid", "model_path", "device", "download_hub")
_TEXT_FIELDS = (*_TEXT_FIELDS, "n_gpu")
_KNOWN_FIELDS = (*_TEXT_FIELDS, "engine_options", "idle_unload_s", "replica", "gpu_idx", "engine_api_port")
_KNOWN_FIELDS = (*_KNOWN_FIELDS, "lora_modules", "max_loras", "max_lora_rank")


class ModelsFileError(ValueError):
    """The models file cannot be read or one of its entries is not a valid launch."""


@dataclass(frozen=True)
class _Entry:
    """Where a problem is: 'models[1] (tiny)'."""

    index: int
    uid: str

    def __str__(self) -> str:
        return f"models[{self.index}]" + (f" ({self.uid})" if self.uid else "")


def _text(entry: _Entry, name: str, value: Any) -> str:
    # YAML reads `size_in_billions: 8` as a number; the registry's words are text.
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise ModelsFileError(f"{entry}: {name} must be text, not {type(value).__name__} ({value!r})")
    return str(value)


def _launch(index: int, item: Any) -> LaunchRequest:
    if not isinstance(item, dict):
        raise ModelsFileError(f"models[{index}]: each model is a mapping of LaunchModelRequest fields")
    uid = item.get("model_uid") or item.get("model_name") or ""
    entry = _Entry(index, uid if isinstance(uid, str) else "")
    unknown = sorted(str(key) for key in item if key not in _KNOWN_FIELDS)
    if unknown:
        raise ModelsFileError(
            f"{entry}: unknown field {', '.join(unknown)}; known fields: {', '.join(_KNOWN_FIELDS)}"
        )
    words = {name: _text(entry, name, item[name]) for name in _TEXT_FIELDS if item.get(name) is not None}
    if not words.get("model_name"):
        raise ModelsFileError(f"{entry}: model_name is required (the model family, e.g. tiny-llama-3.1)")
    engine_options = item.get("engine_options") or {}
    if not isinstance(engine_options, dict) or not all(isinstance(key, str) for key in engine_options):
        raise ModelsFileError(f"{entry}: engine_options must be a mapping of option names to values")
    idle_unload_s = item.get("idle_unload_s")
    if idle_unload_s is not None and (
        isinstance(idle_unload_s, bool)
        or not isinstance(idle_unload_s, (int, float))
        or not math.isfinite(idle_unload_s)
        or idle_unload_s < 0
    ):
        raise ModelsFileError(f"{entry}: idle_unload_s must be seconds >= 0, not {idle_unload_s!r}")
    replica = item.get("replica")
    if replica is not None and (isinstance(replica, bool) or not isinstance(replica, int)):
        raise ModelsFileError(f"{entry}: replica must be a whole number, not {replica!r}")
    gpu_idx = item.get("gpu_idx") or []
    if not isinstance(gpu_idx, list) or not all(
        isinstance(index, int) and not isinstance(index, bool) for index in gpu_idx
    ):
        raise ModelsFileError(f"{entry}: gpu_idx must be a list of GPU indices, not {gpu_idx!r}")
    engine_api_port = item.get("engine_api_port")
    if engine_api_port is not None and (
        isinstance(engine_api_port, bool)
        or not isinstance(engine_api_port, int)
        or not 0 < engine_api_port < 65536
    ):
        raise ModelsFileError(f"{entry}: engine_api_port must be a port, 1 to 65535, not {engine_api_port!r}")
    # Like --launch NAME: the family's name is the uid unless one is given.
    request = models_pb2.LaunchModelRequest(
        **{**words, "model_uid": words.get("model_uid") or words["model_name"]}
    )
    request.gpu_idx.extend(gpu_idx)
    if engine_options:
        request.engine_options.update(engine_options)
    if idle_unload_s is not None:
        request.idle_unload_s = float(idle_unload_s)
    if replica is not None:
        request.replica = replica
    _add_lora_words(entry, item, request)
    try:
        check_launch(request)
    except InvalidArgument as error:
        problems = "; ".join(f"{v.field}: {v.description}" for v in error.violations)
        raise ModelsFileError(f"{entry}: {problems}") from None
    return dataclasses.replace(LaunchRequest.from_pb(request), engine_api_port=engine_api_port)


def _add_lora_words(entry: _Entry, item: dict, request: models_pb2.LaunchModelRequest) -> None:
    """lora_modules (each "name=path" or a mapping of name, path and scale), max_loras, max_lora_rank."""
    modules = item.get("lora_modules") or []
    if not isinstance(modules, list):
        raise ModelsFileError(f"{entry}: lora_modules must be a list of name=path or {{name, path, scale}}")
    for module in modules:
        if isinstance(module, str):
            name, _, path = module.partition("=")
            request.lora_modules.append(models_pb2.LoraModule(name=name, path=path))
        elif isinstance(module, dict) and set(module) <= {"name", "path", "scale"}:
            request.lora_modules.append(models_pb2.LoraModule(**module))
        else:
            raise ModelsFileError(
                f"{entry}: lora_modules entry {module!r} is not name=path or {{name, path, scale}}"
            )
    for name in ("max_loras", "max_lora_rank"):
        value = item.get(name)
        if value is not None:
            if isinstance(value, bool) or not isinstance(value, int):
                raise ModelsFileError(f"{entry}: {name} must be a whole number, not {value!r}")
            setattr(request, name, value)


def parse_models(document: Any) -> list[LaunchRequest]:
    """The launches of a parsed models file; ModelsFileError naming the entry and field if invalid."""
    if not isinstance(document, dict) or set(document) != {"models"}:
        raise ModelsFileError("a models file is a mapping with one key, models: a list of launches")
    items = document["models"]
    if not isinstance(items, list):
        raise ModelsFileError("models must be a list of launches")
    launches = [_launch(index, item) for index, item in enumerate(items)]
    return _unique(launches)


def _unique(launches: list[LaunchRequest]) -> list[LaunchRequest]:
    seen: set[str] = set()
    for launch in launches:
        if launch.model_uid in seen:
            raise ModelsFileError(
                f"model_uid {launch.model_uid!r} is launched twice; give each model its own model_uid"
            )
        seen.add(launch.model_uid)
    return launches


class _Loader(yaml.SafeLoader):
    """YAML's safe subset without aliases: each value is written out where it is used."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(
                None,
                None,
                f"aliases (*{event.anchor}) are not allowed: write the value out",
                event.start_mark,
            )
        return super().compose_node(parent, index)


def load_models_file(path: Path) -> list[LaunchRequest]:
    """Read and check a models file (YAML or JSON)."""
    try:
        text = read_regular_file(Path(path), MAX_BYTES).decode("utf-8")
        document = yaml.load(text, Loader=_Loader)  # noqa: S506 (a safe loader)
    except (ValueError, yaml.YAMLError) as error:  # UnicodeDecodeError too
        raise ModelsFileError(f"cannot read models file {path}: {error}") from None
    except RecursionError:
        raise ModelsFileError(f"cannot read models file {path}: it is nested too deeply") from None
    try:
        return parse_models(document)
    except ModelsFileError as error:
        raise ModelsFileError(f"{path}: {error}") from None


def launch_requests(models_file: Path | None, launch_names: list[str]) -> list[LaunchRequest]:
    """Every launch a server makes at start: the models file's, then each --launch NAME (its
    short form: the family under its own name as uid)."""
    launches = load_models_file(models_file) if models_file is not None else []
    launches += [LaunchRequest(query=SpecQuery(model_name=name), model_uid=name) for name in launch_names]
    try:
        return _unique(launches)
    except ModelsFileError as error:
        raise ModelsFileError(f"{error} (between the models file and --launch)") from None
