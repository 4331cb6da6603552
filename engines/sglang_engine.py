"""SGLang engine: SGLang's public offline API (sglang.Engine), streaming, aborting on cancel.

Written against SGLang's API (``Engine(...)``, ``async_generate(..., stream=True, rid=...)``,
``tokenizer_manager.abort_request(rid)``) and tested against a test double of it: SGLang
has no CPU build, so this project has not yet run it on a real SGLang.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from llmgrpc.engines.base import (
    Chunk,
    FinishReason,
    GenerationRequest,
    LoadPlan,
    ProgressReport,
    SamplingParams,
    Usage,
)
from llmgrpc.engines.library_engine import FINISH_REASONS, LibraryEngine, whole_numbers_as_ints


def engine_kwargs(plan: LoadPlan, weights: str) -> dict[str, Any]:
    """sglang.Engine keyword arguments for a plan: the model, then the engine options."""
    options = whole_numbers_as_ints(plan.engine_options, keep_float=frozenset({"mem_fraction_static"}))
    return {"model_path": weights, "max_running_requests": plan.max_batch_size, **options}


def sampling_dict(params: SamplingParams) -> dict[str, Any]:
    """SGLang's sampling_params for the contract's sampling fields."""
    sampling = {
        "max_new_tokens": params.max_tokens,
        "min_new_tokens": params.min_tokens,
        "temperature": params.temperature,
        "top_p": params.top_p,
        "top_k": params.top_k if params.top_k > 0 else -1,  # SGLang: -1 keeps every token
        "min_p": params.min_p,
        "repetition_penalty": params.repetition_penalty,
        "presence_penalty": params.presence_penalty,
        "frequency_penalty": params.frequency_penalty,
        "stop": list(params.stop),
        "stop_token_ids": list(params.stop_token_ids),
        "ignore_eos": params.ignore_eos,
        "skip_special_tokens": True,
    }
    if params.seed is not None:
        sampling["sampling_seed"] = params.seed
    return sampling


class _Delta:
    """SGLang streams cumulative text and ids by default (incremental with stream_output):
    turn either into what is new since the last chunk."""

    def __init__(self) -> None:
        self.text = ""
        self.ids: list[int] = []

    def new(self, text: str, ids: list[int], completion_tokens: int) -> tuple[str, list[int]]:
        cumulative = len(ids) == completion_tokens and ids[: len(self.ids)] == self.ids
        new_ids = ids[len(self.ids) :] if cumulative else ids
        new_text = text[len(self.text) :] if cumulative and text.startswith(self.text) else text
        self.ids = ids if cumulative else self.ids + ids
        self.text = text if cumulative else self.text + text
        return new_text, list(new_ids)


class SGLangEngine(LibraryEngine):
    """One model served by an SGLang Engine in this worker process."""

    library = "SGLang"

    @classmethod
    def load(cls, plan: LoadPlan, weights: str, report: ProgressReport) -> SGLangEngine:
        import sglang

        report("loading weights", 0, 0)
        engine = sglang.Engine(**engine_kwargs(plan, weights))
        context_length = int(engine.tokenizer_manager.context_len)
        return cls(engine, context_length, plan.device)

    async def generate(self, request: GenerationRequest) -> AsyncIterator[Chunk]:
        prompt_args: dict[str, Any] = (
            {"input_ids": list(request.prompt_token_ids)}
            if request.prompt_token_ids is not None
            else {"prompt": request.prompt}
        )
        delta = _Delta()

        async def chunks() -> AsyncIterator[Chunk]:
            stream = await self.engine.async_generate(
                **prompt_args,
                sampling_params=sampling_dict(request.sampling),
                stream=True,
                rid=request.request_id,
            )
            async for output in stream:
                meta = output.get("meta_info", {})
                completion_tokens = int(meta.get("completion_tokens", 0))
                text, ids = delta.new(
                    output.get("text", ""), list(output.get("output_ids", [])), completion_tokens
                )
                chunk = Chunk(token_ids=ids, text=text)
                reason = meta.get("finish_reason")
                if reason:
                    chunk.finish_reason = FINISH_REASONS.get(reason.get("type", ""), FinishReason.STOP)
                    chunk.usage = Usage(int(meta.get("prompt_tokens", 0)), completion_tokens)
                yield chunk

        async for chunk in self.guarded(request.request_id, chunks()):
            yield chunk

    async def abort_in_library(self, request_id: str) -> None:
        self.engine.tokenizer_manager.abort_request(rid=request_id)


ENGINE = SGLangEngine
