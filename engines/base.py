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
- ``engine.tokenize(text, parse_special)`` / ``engine.detokenize(token_ids)`` (async) use the
  model's tokenizer as ``generate`` does: special-token spellings in text are ordinary text
  unless parse_special; an engine without a tokenizer refuses (FailedPrecondition).
- ``engine.load_adapter(module, path)`` / ``engine.unload_adapter(name)`` (optional) add and
  remove a LoRA adapter (engines.lora) at run time, beside requests in flight; a request names
  one in ``GenerationRequest.adapter``. ``LoadPlan.lora_modules`` are loaded the same way,
  after ``load``, before the model is READY.
- ``engine.stats()`` reports what the manager shows in ``GetModel``.
- ``engine.kv_events()``: the log of what its prefix cache stores and evicts, or None.
- ``engine.close()`` frees the model.

Engines import their heavy libraries (torch, llama_cpp, vllm, sglang) inside their own
module, which only worker processes import; ``llmgrpc.engines.catalogue`` says which
engines exist and why one cannot run, without importing any of them.
"""

from __future__ import annotations

import abc
import dataclasses
import enum
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from llmgrpc.clients.errors import FailedPrecondition, FieldViolation, InvalidArgument, Reason
from llmgrpc.engines.chat import Chat, tool_call_schema
from llmgrpc.engines.lora import LoraModule
from llmgrpc.engines.prefix_cache import KvEventLog
from llmgrpc.v1 import generate_pb2


class FinishReason(enum.Enum):
    """Why a generation ended."""

    STOP = generate_pb2.FINISH_REASON_STOP
    LENGTH = generate_pb2.FINISH_REASON_LENGTH
    CANCELLED = generate_pb2.FINISH_REASON_CANCELLED


@dataclass(frozen=True)
class Constraint:
    """A format the output must follow (GenerateRequest.structured_output), by its oneof kind.

    spec is the schema, regex or grammar text, or the tuple of choices; empty for json_object."""

    kind: str  # json_schema, regex, choice, grammar or json_object
    spec: str | tuple[str, ...] = ""

    @property
    def field(self) -> str:
        """The request field it came from, for error details."""
        return (
            "structured_output.choice.choices" if self.kind == "choice" else f"structured_output.{self.kind}"
        )

    def invalid(self, description: str) -> InvalidArgument:
        """The error that refuses this format, naming its field."""
        return InvalidArgument(
            f"invalid {self.field}: {description}",
            [FieldViolation(self.field, description)],
            reason=Reason.INVALID_FIELD,
        )

    @classmethod
    def from_pb(cls, pb: generate_pb2.StructuredOutput) -> Constraint | None:
        kind = pb.WhichOneof("kind")
        if kind is None:
            return None
        if kind == "choice":
            return cls(kind, tuple(pb.choice.choices))
        if kind == "json_object":
            return cls(kind)
        return cls(kind, getattr(pb, kind))


# Alternatives per token a request may ask for, as OpenAI's API and vLLM's default allow.
MAX_LOGPROBS = 20
SAME_NAME = ""


@dataclass(frozen=True)
class Knob:
    """A number of SamplingParams a request may set (its GenerateRequest field has the same name):
    the values it takes, and its name in each engine library's sampling arguments (SAME_NAME: the
    same; None: not one of that library's sampling arguments, the engine applies it itself)."""

    valid: Callable[[float], bool]
    rule: str  # the valid values, in words, for error messages
    vllm: str | None = SAME_NAME
    sglang: str | None = SAME_NAME


def knob(default: Any, valid: Callable[[float], bool], rule: str, **names: str | None) -> Any:
    """A SamplingParams field that is a Knob (names: vllm=, sglang=, where they differ)."""
    return field(default=default, metadata={"knob": Knob(valid, rule, **names)})


@dataclass(frozen=True)
class SamplingParams:
    """How to choose each next token, and when to stop. Defaults are the contract's.

    A new number is one knob() field here (read, checked and passed to vLLM and SGLang from its
    declaration, offered by KServe, vLLM's engine contract and the CLI from the proto), its
    GenerateRequest field, and its meaning in llmgrpc.engines.sampling."""

    max_tokens: int = knob(256, lambda v: v >= 1, "must be at least 1", sglang="max_new_tokens")
    temperature: float = knob(1.0, lambda v: v >= 0, "must be 0 (greedy) or more")
    top_p: float = knob(1.0, lambda v: 0 < v <= 1, "must be in (0, 1]")
    top_k: int = knob(0, lambda v: v >= 0, "must be 0 (all tokens) or more")
    min_p: float = knob(0.0, lambda v: 0 <= v <= 1, "must be in [0, 1]")
    repetition_penalty: float = knob(1.0, lambda v: v > 0, "must be greater than 0 (1 is off)")
    presence_penalty: float = knob(0.0, lambda v: -2 <= v <= 2, "must be in [-2, 2]")
    frequency_penalty: float = knob(0.0, lambda v: -2 <= v <= 2, "must be in [-2, 2]")
    seed: int | None = knob(None, lambda v: True, "any 64-bit integer", sglang="sampling_seed")
    min_tokens: int = knob(0, lambda v: v >= 0, "must be 0 or more", sglang="min_new_tokens")
    # Alternatives per step; None: no logprobs at all. SGLang asks for them beside its sampling.
    logprobs: int | None = knob(
        None, lambda v: 0 <= v <= MAX_LOGPROBS, f"must be in [0, {MAX_LOGPROBS}]", sglang=None
    )
    # Cut before the prompt reaches any engine (engines.batching, engines.library_engine).
    truncate_prompt_tokens: int | None = knob(
        None, lambda v: v >= 1, "must be at least 1 (prompt tokens kept)", vllm=None, sglang=None
    )
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logit_bias: dict[int, float] = field(default_factory=dict)
    constraint: Constraint | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @classmethod
    def knobs(cls) -> list[tuple[str, Knob]]:
        """The knob fields, by name, in declaration order."""
        return [(f.name, f.metadata["knob"]) for f in dataclasses.fields(cls) if "knob" in f.metadata]

    def library_arguments(self, library: str) -> dict[str, Any]:
        """The knobs set to other than None, under their names in library ("vllm", "sglang")."""
        arguments = {}
        for name, declared in self.knobs():
            library_name = getattr(declared, library)
            value = getattr(self, name)
            if library_name is not None and value is not None:
                arguments[library_name or name] = value
        return arguments

    @classmethod
    def from_pb(
        cls, pb: generate_pb2.GenerateRequest, default_max_tokens: int | None = None
    ) -> SamplingParams:
        """The request's sampling fields, every default resolved here and nowhere else: unset
        knobs take the defaults above, max_tokens default_max_tokens when given (the server's
        setting, which its load plan carries)."""
        defaults = {f.name: f.default for f in dataclasses.fields(cls)}
        if default_max_tokens is not None:
            defaults["max_tokens"] = default_max_tokens
        knobs = {name: getattr(pb, name) if pb.HasField(name) else defaults[name] for name, _ in cls.knobs()}
        return cls(
            **knobs,
            stop=tuple(pb.stop),
            stop_token_ids=tuple(pb.stop_token_ids),
            ignore_eos=pb.ignore_eos,
            logit_bias=dict(pb.logit_bias),
            constraint=Constraint.from_pb(pb.structured_output) if pb.HasField("structured_output") else None,
        )


@dataclass(frozen=True)
class GenerationRequest:
    """One prompt to continue. Exactly one of prompt, prompt_token_ids and chat is set (a chat
    is rendered into the prompt by the model's own template, see llmgrpc.engines.chat).

    deadline is the caller's, a time.time() moment (None: it set none); the worker closes
    the request's stream when it passes, so an engine needs it only to plan ahead.
    parse_special_tokens: read special-token spellings in prompt ("<|eot_id|>") as those
    tokens; otherwise they are text (a chat's contents always are, see engines.chat).
    cache_prompt: the engine may start from KV it holds for a prefix of the prompt (KV computed
    under the same adapter only), and keep this request's KV for later ones; false: neither.
    adapter: the LoRA adapter to generate with, by name; empty: the base model."""

    request_id: str
    sampling: SamplingParams
    prompt: str | None = None
    prompt_token_ids: tuple[int, ...] | None = None
    deadline: float | None = None
    chat: Chat | None = None
    parse_special_tokens: bool = False
    cache_prompt: bool = True
    adapter: str = ""

    @classmethod
    def from_pb(
        cls,
        pb: generate_pb2.GenerateRequest,
        request_id: str,
        deadline: float | None = None,
        *,
        default_max_tokens: int | None = None,
    ) -> GenerationRequest:
        """A validated request (see llmgrpc.server.validation) as the engine takes it, its
        defaults resolved (SamplingParams.from_pb): the caller's message is read, never copied."""
        sampling = SamplingParams.from_pb(pb, default_max_tokens)
        chat = Chat.from_pb(pb) if pb.messages else None
        if chat is not None and chat.forces_a_call:
            # A call the model must make is a JSON value of a known shape: enforced while decoding.
            schema = json.dumps(tool_call_schema(chat.tools, chat.effective_tool_choice))
            sampling = dataclasses.replace(sampling, constraint=Constraint("json_schema", schema))
        return cls(
            request_id=request_id,
            sampling=sampling,
            prompt=pb.prompt if not (pb.prompt_token_ids or chat) else None,
            prompt_token_ids=tuple(pb.prompt_token_ids) if pb.prompt_token_ids else None,
            deadline=deadline,
            chat=chat,
            parse_special_tokens=pb.parse_special_tokens,
            cache_prompt=pb.cache_prompt if pb.HasField("cache_prompt") else True,
            adapter=pb.adapter,
        )


@dataclass
class Usage:
    """Token counts of one request."""

    prompt_tokens: int
    completion_tokens: int
    cached_prompt_tokens: int = 0  # of prompt_tokens, served from the engine's prefix cache


@dataclass
class TokenLogprob:
    """A generated token's log-probability, and the most likely tokens at its step
    as (token id, text, log-probability), most likely first."""

    token_id: int
    token: str
    logprob: float
    top: list[tuple[int, str, float]] = field(default_factory=list)

    def to_pb(self) -> generate_pb2.TokenLogprob:
        return generate_pb2.TokenLogprob(
            token_id=self.token_id,
            token=self.token,
            logprob=self.logprob,
            top_logprobs=[
                generate_pb2.TopLogprob(token_id=token_id, token=token, logprob=logprob)
                for token_id, token, logprob in self.top
            ],
        )


@dataclass
class Chunk:
    """A piece of output: the tokens of one step and the text they settled.

    logprobs: one per token id when the request asked for them; stop: the stop string or
    token id that ended the output (last chunk only)."""

    token_ids: list[int]
    text: str
    finish_reason: FinishReason | None = None
    usage: Usage | None = None
    logprobs: list[TokenLogprob] = field(default_factory=list)
    stop: str | int | None = None

    def to_pb(self, into: generate_pb2.GenerateResponse | None = None) -> generate_pb2.GenerateResponse:
        """The piece as the contract has it, written into `into` when given (the frame that
        carries it to the server, with no copy on the way)."""
        response = generate_pb2.GenerateResponse() if into is None else into
        response.text = self.text
        response.token_ids.extend(self.token_ids)
        response.logprobs.extend(lp.to_pb() for lp in self.logprobs)
        if self.finish_reason is not None:
            response.finish_reason = self.finish_reason.value
        if self.usage is not None:
            response.usage.prompt_tokens = self.usage.prompt_tokens
            response.usage.completion_tokens = self.usage.completion_tokens
            response.usage.cached_prompt_tokens = self.usage.cached_prompt_tokens
        if isinstance(self.stop, str):
            response.stop_string = self.stop
        elif self.stop is not None:
            response.stop_token_id = self.stop
        return response


@dataclass
class Tokens:
    """A text's token ids, and each token's text decoded alone."""

    token_ids: list[int]
    tokens: list[str]


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
    # The GGUF files of the quantization, in order: one, or the parts of a split model (llama.cpp
    # loads the first and finds the others beside it).
    file_names: list[str] = field(default_factory=list)


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
    gpu_count: int = 0  # the GPUs the worker sees (CUDA_VISIBLE_DEVICES); more than 1: spread the model
    default_max_tokens: int = SamplingParams.max_tokens  # of a request that sets none: the server's setting
    # LoRA adapters loaded with the model (engines.lora.LoraModule as JSON), and their limits.
    lora_modules: list[dict[str, Any]] = field(default_factory=list)
    max_loras: int = 4
    max_lora_rank: int = 16

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
    kv_cache_usage: float = 0.0  # the fraction, 0 to 1, of its KV-cache capacity live sequences hold
    resident_adapters: list[str] = field(default_factory=list)  # LoRA weights where the forward reads them
    adapter_ranks: dict[str, int] = field(default_factory=dict)  # every adapter the engine holds
    prefix_cache_queries: int = 0  # prompt tokens looked up in its prefix cache since it loaded
    prefix_cache_hits: int = 0  # of those, tokens found there


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

    async def tokenize(self, text: str, parse_special: bool = False) -> Tokens:
        """text's tokens, as generate tokenizes a prompt (with the beginning-of-text token);
        special-token spellings in text are text unless parse_special."""
        raise FailedPrecondition(f"the {type(self).__name__} engine does not tokenize")

    async def detokenize(self, token_ids: list[int]) -> str:
        """The text of token_ids, special tokens left out."""
        raise FailedPrecondition(f"the {type(self).__name__} engine does not detokenize")

    def load_adapter(self, module: LoraModule, path: str) -> int:
        """Check and load the LoRA adapter at path (a local folder or file) as module.name,
        beside requests in flight; its rank. Runs on a thread of its own."""
        raise FailedPrecondition(
            f"the {type(self).__name__} engine does not serve LoRA adapters",
            reason=Reason.ADAPTER_INCOMPATIBLE,
        )

    def unload_adapter(self, name: str) -> None:
        """Forget an adapter no request in flight uses."""
        raise FailedPrecondition(f"the {type(self).__name__} engine does not serve LoRA adapters")

    @abc.abstractmethod
    def stats(self) -> EngineStats:
        """Current numbers for GetModel."""

    def kv_events(self) -> KvEventLog | None:
        """What its prefix cache stores and evicts (engines.prefix_cache), if it keeps one."""
        return None

    @abc.abstractmethod
    def close(self) -> None:
        """Stop serving and free the model."""
