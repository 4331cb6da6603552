"""The engine interface, and the domain types that cross it.

An engine serves one loaded model inside a worker process. Its whole contract:

- ``Engine.load(plan, weights, report)`` (a classmethod) loads the weights the plan names
  onto the plan's device and returns a ready engine. It runs in a worker thread; it may
  call ``report(phase, done, total)`` to show progress.
- ``engine.generate(request)`` is an async generator of ``Chunk``s, one or more tokens
  each, the last one carrying the finish reason and usage. Concurrent calls must be
  batched by the engine, not served one after another. Closing the generator early
  (the caller went away, passed its deadline, or the model is terminated) must stop the
  engine's work on that request within one decode step.
- ``engine.stats()`` reports what the manager shows in ``GetModel``.
- ``engine.close()`` frees the model.

Engines import their heavy libraries (torch, llama_cpp, vllm, sglang) inside their own
module, which only worker processes import; ``llmgrpc.engines.catalogue`` says which
engines exist and why one cannot run, without importing any of them.
"""

from __future__ import annotations

import abc
import enum
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from llmgrpc.v1 import generate_pb2


class FinishReason(enum.Enum):
    """Why a generation ended."""

    STOP = generate_pb2.FINISH_REASON_STOP
    LENGTH = generate_pb2.FINISH_REASON_LENGTH
    CANCELLED = generate_pb2.FINISH_REASON_CANCELLED


@dataclass(frozen=True)
class SamplingParams:
    """How to choose each next token, and when to stop. Defaults are the contract's."""

    max_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    seed: int | None = None
    ignore_eos: bool = False
    min_tokens: int = 0

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @classmethod
    def from_pb(cls, pb: generate_pb2.GenerateRequest, default_max_tokens: int = 256) -> SamplingParams:
        """The request's sampling fields; unset optional fields take the defaults above."""
        defaults = cls()

        def pick(name: str, default: Any) -> Any:
            return getattr(pb, name) if pb.HasField(name) else default

        return cls(
            max_tokens=pick("max_tokens", default_max_tokens),
            temperature=pick("temperature", defaults.temperature),
            top_p=pick("top_p", defaults.top_p),
            top_k=pick("top_k", defaults.top_k),
            min_p=pick("min_p", defaults.min_p),
            repetition_penalty=pick("repetition_penalty", defaults.repetition_penalty),
            presence_penalty=pick("presence_penalty", defaults.presence_penalty),
            frequency_penalty=pick("frequency_penalty", defaults.frequency_penalty),
            stop=tuple(pb.stop),
            stop_token_ids=tuple(pb.stop_token_ids),
            seed=pick("seed", None),
            ignore_eos=pb.ignore_eos,
            min_tokens=pick("min_tokens", 0),
        )


@dataclass(frozen=True)
class GenerationRequest:
    """One prompt to continue. Exactly one of prompt and prompt_token_ids is set.

    deadline is the caller's, a time.time() moment (None: it set none); the worker closes
    the request's stream when it passes, so an engine needs it only to plan ahead."""

    request_id: str
    sampling: SamplingParams
    prompt: str | None = None
    prompt_token_ids: tuple[int, ...] | None = None
    deadline: float | None = None

    @classmethod
    def from_pb(
        cls, pb: generate_pb2.GenerateRequest, request_id: str, deadline: float | None = None
    ) -> GenerationRequest:
        """A validated request (see llmgrpc.server.validation) as the engine takes it."""
        return cls(
            request_id=request_id,
            sampling=SamplingParams.from_pb(pb),
            prompt=pb.prompt if not pb.prompt_token_ids else None,
            prompt_token_ids=tuple(pb.prompt_token_ids) if pb.prompt_token_ids else None,
            deadline=deadline,
        )


@dataclass
class Usage:
    """Token counts of one request."""

    prompt_tokens: int
    completion_tokens: int


@dataclass
class Chunk:
    """A piece of output: the tokens of one step and the text they settled."""

    token_ids: list[int]
    text: str
    finish_reason: FinishReason | None = None
    usage: Usage | None = None

    def to_pb(self) -> generate_pb2.GenerateResponse:
        response = generate_pb2.GenerateResponse(text=self.text, token_ids=self.token_ids)
        if self.finish_reason is not None:
            response.finish_reason = self.finish_reason.value
        if self.usage is not None:
            response.usage.prompt_tokens = self.usage.prompt_tokens
            response.usage.completion_tokens = self.usage.completion_tokens
        return response


@dataclass
class SpecRef:
    """The registry spec a model is launched from, as the worker needs it."""

    model_name: str
    model_format: str
    size_in_billions: str
    quantization: str
    model_id: str
    hubs: list[dict[str, str]] = field(default_factory=list)
    model_file_name_template: str = ""
    generator: str = ""


@dataclass
class LoadPlan:
    """Everything a worker needs to load one model; sent to it as JSON."""

    model_uid: str
    engine: str
    spec: SpecRef
    device: str
    cache_dir: str
    max_batch_size: int
    model_path: str = ""
    engine_options: dict[str, Any] = field(default_factory=dict)
    download_hub: str = "auto"  # "auto" (the spec's hubs in order), "huggingface" or "modelscope"
    hub_cache_dir: str = ""  # one folder for hub downloads; empty: the hub libraries' own caches

    def to_json_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json_dict(cls, data: dict[str, Any]) -> LoadPlan:
        return cls(**{**data, "spec": SpecRef(**data["spec"])})


@dataclass
class EngineStats:
    """What an engine reports about itself for GetModel."""

    context_length: int
    device: str
    running_requests: int = 0
    peak_batch_size: int = 0
    gpu_memory_bytes: int = 0


# report(phase, done, total): progress of a load, e.g. ("downloading", 1_000, 5_000).
ProgressReport = Callable[[str, int, int], None]


class Engine(abc.ABC):
    """One loaded model serving generation requests (see the module docstring)."""

    @classmethod
    @abc.abstractmethod
    def load(cls, plan: LoadPlan, weights: str, report: ProgressReport) -> Engine:
        """Load the model whose files are at ``weights`` (a folder or a file)."""

    @abc.abstractmethod
    def generate(self, request: GenerationRequest) -> AsyncIterator[Chunk]:
        """Stream the continuation of request; closing the iterator aborts the request."""

    @abc.abstractmethod
    def stats(self) -> EngineStats:
        """Current numbers for GetModel."""

    @abc.abstractmethod
    def close(self) -> None:
        """Stop serving and free the model."""
