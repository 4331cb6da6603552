"""What the adapters of engines that batch by themselves (vLLM, SGLang) share.

Such a library schedules its own requests; its adapter only maps the contract onto the
library's API, streams the library's outputs as chunks, counts the requests it holds
for GetModel, and aborts a request in the library when its caller goes away.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from llmgrpc.clients.errors import FailedPrecondition, FieldViolation, InvalidArgument, Reason
from llmgrpc.engines.base import (
    Chunk,
    Engine,
    EngineStats,
    FinishReason,
    GenerationRequest,
    Tokens,
)
from llmgrpc.engines.chat import hugging_face_chat_ids
from llmgrpc.engines.lora import LibraryAdapters, config_layer_shapes, unknown_adapter
from llmgrpc.engines.model_folder import read_model_config

if TYPE_CHECKING:
    from llmgrpc.engines.base import LoadPlan

# The libraries' finish reasons, in the contract's terms.
FINISH_REASONS = {"stop": FinishReason.STOP, "length": FinishReason.LENGTH, "abort": FinishReason.CANCELLED}


def choice_grammar(choices: tuple[str, ...]) -> str:
    """A list of choices as a Lark grammar (llguidance's dialect): the output is one of them."""
    return "start: " + " | ".join(json.dumps(choice) for choice in choices)


def whole_numbers_as_ints(options: dict[str, Any], keep_float: frozenset[str]) -> dict[str, Any]:
    """engine_options as a library takes them: JSON numbers are floats, ints where whole
    (but for the options that are fractions by nature)."""
    return {
        name: int(value)
        if isinstance(value, float) and value.is_integer() and name not in keep_float
        else value
        for name, value in options.items()
    }


# A LibraryEngine subclass, for the constructor its subclasses share.
Served = TypeVar("Served", bound="LibraryEngine")


class LibraryEngine(Engine):
    """One model held by a library that batches its own requests, in this worker process."""

    def __init__(self, engine: Any, context_length: int, device: str):
        self.engine = engine
        self.context_length = context_length
        self.device = device
        self.running = 0
        self.peak = 0

    @contextlib.contextmanager
    def counted(self) -> Iterator[None]:
        """Count a request as running (and the most ever running) while it streams."""
        self.running += 1
        self.peak = max(self.peak, self.running)
        try:
            yield
        finally:
            self.running -= 1

    # The library's name, for messages.
    library = ""

    @abc.abstractmethod
    async def abort_in_library(self, request_id: str) -> None:
        """Free a request's slot and KV cache in the library now."""

    def hugging_face_tokenizer(self) -> Any:
        """The library's tokenizer (a Hugging Face one), for Tokenize, Detokenize and truncation."""
        raise FailedPrecondition(f"{self.library} gives no tokenizer")

    def _encode(self, text: str, parse_special: bool) -> list[int]:
        """text's ids as a prompt's (the library's own encoding would read special tokens in it)."""
        return list(self.hugging_face_tokenizer().encode(text, split_special_tokens=not parse_special))

    async def tokenize(self, text: str, parse_special: bool = False) -> Tokens:
        tokenizer = self.hugging_face_tokenizer()

        def tokenize() -> Tokens:
            ids = self._encode(text, parse_special)
            return Tokens(ids, [tokenizer.decode([token]) for token in ids])

        return await asyncio.to_thread(tokenize)

    async def detokenize(self, token_ids: list[int]) -> str:
        tokenizer = self.hugging_face_tokenizer()
        vocab_size = len(tokenizer)
        out_of_range = [t for t in token_ids if not 0 <= t < vocab_size]
        if out_of_range:
            description = f"ids outside the vocabulary [0, {vocab_size}): {out_of_range[:5]}"
            raise InvalidArgument(
                f"token_ids has {description}",
                [FieldViolation("token_ids", description)],
                reason=Reason.TOKEN_OUT_OF_VOCABULARY,
            )
        return await asyncio.to_thread(tokenizer.decode, token_ids, skip_special_tokens=True)

    async def prompt_ids(self, request: GenerationRequest) -> list[int] | None:
        """The prompt as ids when the library must be given ids (None: the request's own prompt
        goes as it is): a conversation rendered by the model's chat template, as every engine
        renders it; a text prompt whose special-token spellings are text (the library would read
        them as special tokens); either cut to its last truncate_prompt_tokens ids."""
        keep = request.sampling.truncate_prompt_tokens
        if request.chat is not None:
            tokenizer = self.hugging_face_tokenizer()
            ids = tuple(await asyncio.to_thread(hugging_face_chat_ids, tokenizer, request.chat))
        elif request.prompt_token_ids is not None:
            if keep is None:
                return None
            ids = request.prompt_token_ids
        elif keep is None and request.parse_special_tokens:
            return None
        else:
            ids = tuple(
                await asyncio.to_thread(self._encode, request.prompt or "", request.parse_special_tokens)
            )
        return list(ids[-keep:] if keep is not None else ids)

    async def guarded(self, request_id: str, chunks: AsyncIterator[Chunk]) -> AsyncIterator[Chunk]:
        """Stream one request's chunks, counted as running. A ValueError (the library's word for
        a request it cannot take: prompt too long, ...) becomes INVALID_ARGUMENT; a request whose
        caller leaves before its last chunk is aborted in the library."""
        finished = False
        with self.counted():
            try:
                async with contextlib.aclosing(chunks):
                    async for chunk in chunks:
                        finished = chunk.finish_reason is not None
                        yield chunk
            except ValueError as error:
                finished = True
                raise InvalidArgument(f"{self.library} refused the request: {error}") from None
            finally:
                if not finished:
                    with contextlib.suppress(Exception):
                        await self.abort_in_library(request_id)

    # LoRA adapters, where the library serves them (set by load): the library decides which are
    # resident (its max_loras), so stats list their ranks only.
    adapters: LibraryAdapters | None = None
    base_layers: dict[str, tuple[int, int]] | None = None  # where known, to check adapters against

    @classmethod
    def started(
        cls: type[Served], engine: Any, context_length: int, plan: LoadPlan, weights: str, lora: bool
    ) -> Served:
        """The adapter of a library engine just started for plan; lora: the library was started
        with LoRA on, so it takes adapters."""
        served = cls(engine, context_length, plan.device)
        if lora:
            served.serve_adapters(plan.max_lora_rank, weights)
        return served

    def serve_adapters(self, max_rank: int, weights: str) -> None:
        """Take LoRA adapters from now on (the library was started with LoRA on); weights: the
        model's folder, whose config says the shapes adapters are checked against."""
        self.adapters = LibraryAdapters(self.library, max_rank)
        self.base_layers = config_layer_shapes(read_model_config(Path(weights)))

    def served_adapters(self) -> LibraryAdapters:
        if self.adapters is None:
            raise FailedPrecondition(
                f"this {self.library} model was launched without LoRA: launch it with lora_modules, or "
                "with engine_options enable_lora, to load adapters at run time",
                reason=Reason.ADAPTER_INCOMPATIBLE,
            )
        return self.adapters

    def adapter_path(self, name: str) -> str | None:
        """The path of the adapter a request names (None: the base model), or NOT_FOUND."""
        if not name:
            return None
        if self.adapters is None:
            raise unknown_adapter(name, [])
        return self.adapters.path(name)

    def unload_adapter(self, name: str) -> None:
        self.served_adapters().unload(name)

    def stats(self) -> EngineStats:
        return EngineStats(
            context_length=self.context_length,
            device=self.device,
            running_requests=self.running,
            peak_batch_size=self.peak,
            adapter_ranks=self.adapters.ranks() if self.adapters is not None else {},
        )

    def close(self) -> None:
        self.engine.shutdown()
