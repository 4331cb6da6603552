"""SGLang engine: SGLang's public offline API (sglang.Engine), streaming, aborting on cancel.

Written against SGLang's API (``Engine(...)``, ``async_generate(..., stream=True, rid=...)``,
``tokenizer_manager.abort_request(rid)``) and tested against a test double of it: SGLang
has no CPU build, so this project has not yet run it on a real SGLang.

structured_output maps onto SGLang's ``json_schema``, ``regex`` and ``ebnf`` sampling
parameters, compiled by its ``llguidance`` grammar backend (the library of the Transformers
and llama.cpp engines, so grammars are in the same dialect); logprobs onto
``return_logprob`` / ``top_logprobs_num``, the model's raw logprobs
(``SGLANG_RETURN_ORIGINAL_LOGPROB``), as on every engine.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from typing import Any

from llmgrpc.clients.errors import FailedPrecondition, Reason
from llmgrpc.engines import base
from llmgrpc.engines.library_engine import (
    FINISH_REASONS,
    LibraryEngine,
    choice_grammar,
    whole_numbers_as_ints,
)
from llmgrpc.engines.lora import LoraModule

# SGLang's grammar backend: llguidance, as on the Transformers and llama.cpp engines.
GRAMMAR_BACKEND = "llguidance"


def engine_kwargs(plan: base.LoadPlan, weights: str) -> dict[str, Any]:
    """sglang.Engine keyword arguments for a plan: the model, then the engine options."""
    options = whole_numbers_as_ints(plan.engine_options, keep_float=frozenset({"mem_fraction_static"}))
    lora = {}
    if plan.lora_modules or options.get("enable_lora"):  # in SGLang's words
        lora = {
            "enable_lora": True,
            "max_loras_per_batch": plan.max_loras,
            "max_lora_rank": plan.max_lora_rank,
        }
    return {
        "model_path": weights,
        "max_running_requests": plan.max_batch_size,
        "grammar_backend": GRAMMAR_BACKEND,
        **lora,
        **options,
    }


def sampling_dict(params: base.SamplingParams) -> dict[str, Any]:
    """SGLang's sampling_params for the contract's sampling fields (the knobs under SGLang's
    names, SamplingParams.library_arguments)."""
    sampling = {
        **params.library_arguments("sglang"),
        "top_k": params.top_k if params.top_k > 0 else -1,  # SGLang: -1 keeps every token
        "stop": list(params.stop),
        "stop_token_ids": list(params.stop_token_ids),
        "ignore_eos": params.ignore_eos,
        "skip_special_tokens": True,
    }
    if params.logit_bias:
        sampling["logit_bias"] = {str(token): bias for token, bias in params.logit_bias.items()}
    if params.constraint is not None:
        sampling.update(constraint_params(params.constraint))
    return sampling


def constraint_params(constraint: base.Constraint) -> dict[str, str]:
    """SGLang's sampling_params for the contract's structured_output."""
    if constraint.kind == "json_schema":
        return {"json_schema": constraint.spec}  # type: ignore[dict-item]
    if constraint.kind == "json_object":
        return {"json_schema": '{"type": "object"}'}
    if constraint.kind == "regex":
        return {"regex": constraint.spec}  # type: ignore[dict-item]
    if constraint.kind == "choice":
        return {"ebnf": choice_grammar(constraint.spec)}  # type: ignore[arg-type]
    return {"ebnf": constraint.spec}  # type: ignore[dict-item]


def logprob_args(params: base.SamplingParams) -> dict[str, Any]:
    """async_generate's logprob arguments: the generated tokens' only, with their text."""
    if params.logprobs is None:
        return {}
    return {
        "return_logprob": True,
        "logprob_start_len": -1,
        "top_logprobs_num": params.logprobs,
        "return_text_in_logprobs": True,
    }


def _logprobs(tokens: list, tops: list | None) -> list[base.TokenLogprob]:
    """SGLang's (logprob, token id, text) tuples, and each position's top list, as the contract's."""
    entries = []
    for index, (logprob, token, text) in enumerate(tokens):
        top = (tops or [])[index] if tops and index < len(tops) else []
        entries.append(
            base.TokenLogprob(
                int(token),
                text or "",
                float(logprob),
                [(int(t), tt or "", float(lp)) for lp, t, tt in (top or [])],
            )
        )
    return entries


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
    def load(cls, plan: base.LoadPlan, weights: str, report: base.ProgressReport) -> SGLangEngine:
        import sglang

        report("loading weights", 0, 0)
        # The model's raw logprobs, before temperature, as on every engine (SGLang's default
        # is after it); its scheduler processes read it from the environment they inherit.
        os.environ.setdefault("SGLANG_RETURN_ORIGINAL_LOGPROB", "1")
        kwargs = engine_kwargs(plan, weights)
        engine = sglang.Engine(**kwargs)
        context_length = int(engine.tokenizer_manager.context_len)
        return cls.started(engine, context_length, plan, weights, lora=bool(kwargs.get("enable_lora")))

    def load_adapter(self, module: LoraModule, path: str) -> int:
        """Checked here, then loaded by SGLang's load_lora_adapter; requests name it as lora_path."""
        rank = self.served_adapters().load(module, path, self.base_layers)
        result = self.engine.load_lora_adapter(lora_name=module.name, lora_path=path)
        if getattr(result, "success", True) is False:
            self.adapters.unload(module.name)
            raise FailedPrecondition(
                f"SGLang refused adapter {module.name!r}: {getattr(result, 'error_message', '')}",
                reason=Reason.ADAPTER_INCOMPATIBLE,
            )
        return rank

    def unload_adapter(self, name: str) -> None:
        super().unload_adapter(name)
        self.engine.unload_lora_adapter(lora_name=name)

    async def generate(self, request: base.GenerationRequest) -> AsyncIterator[base.Chunk]:
        truncated = await self.prompt_ids(request)
        prompt_args: dict[str, Any] = (
            {"input_ids": truncated}
            if truncated is not None
            else {"input_ids": list(request.prompt_token_ids)}
            if request.prompt_token_ids is not None
            else {"prompt": request.prompt}
        )
        lora = {"lora_path": request.adapter} if self.adapter_path(request.adapter) else {}
        delta = _Delta()
        logprobs_seen = 0  # SGLang's logprob lists grow with the output, like its default text

        async def chunks() -> AsyncIterator[base.Chunk]:
            stream = await self.engine.async_generate(
                **prompt_args,
                sampling_params=sampling_dict(request.sampling),
                stream=True,
                rid=request.request_id,
                **logprob_args(request.sampling),
                **lora,
            )
            nonlocal logprobs_seen
            async for output in stream:
                meta = output.get("meta_info", {})
                completion_tokens = int(meta.get("completion_tokens", 0))
                text, ids = delta.new(
                    output.get("text", ""), list(output.get("output_ids", [])), completion_tokens
                )
                chunk = base.Chunk(token_ids=ids, text=text)
                if request.sampling.logprobs is not None and ids:
                    tokens = list(meta.get("output_token_logprobs") or [])
                    tops = meta.get("output_top_logprobs")
                    if len(tokens) == completion_tokens:  # cumulative: keep what is new
                        tokens, tops = tokens[logprobs_seen:], (tops or [])[logprobs_seen:]
                    logprobs_seen += len(tokens)
                    chunk.logprobs = _logprobs(tokens, tops)
                reason = meta.get("finish_reason")
                if reason:
                    chunk.finish_reason = FINISH_REASONS.get(reason.get("type", ""), base.FinishReason.STOP)
                    chunk.usage = base.Usage(
                        int(meta.get("prompt_tokens", 0)),
                        completion_tokens,
                        int(meta.get("cached_tokens", 0)),  # served by SGLang's radix cache
                    )
                    if chunk.finish_reason is base.FinishReason.STOP and reason.get("matched") is not None:
                        chunk.stop = reason["matched"]  # the stop string, or the token id
                yield chunk

        async for chunk in self.guarded(request.request_id, chunks()):
            yield chunk

    def hugging_face_tokenizer(self) -> Any:
        return self.engine.tokenizer_manager.tokenizer

    async def abort_in_library(self, request_id: str) -> None:
        self.engine.tokenizer_manager.abort_request(rid=request_id)


ENGINE = SGLangEngine
