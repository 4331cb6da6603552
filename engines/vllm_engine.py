"""vLLM engine: vLLM's public async API (AsyncLLM), streaming deltas, aborting on cancel.

vLLM does its own continuous batching, so this adapter only maps the contract onto
vLLM's ``SamplingParams`` (one to one), streams ``RequestOutputKind.DELTA`` outputs as
chunks, and aborts the request in vLLM when the caller goes away or passes its deadline.
It runs in the worker process of an environment that has vLLM (settings.worker_python),
so vLLM's pinned torch and transformers never meet the server's.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from llmgrpc.clients.errors import FailedPrecondition, Reason
from llmgrpc.engines.base import (
    Chunk,
    EngineStats,
    FinishReason,
    GenerationRequest,
    LoadPlan,
    ProgressReport,
    SamplingParams,
    Usage,
)
from llmgrpc.engines.library_engine import FINISH_REASONS, LibraryEngine, whole_numbers_as_ints

# On the CPU, vLLM reserves gpu_memory_utilization (0.92) of the host's memory unless told a
# KV cache size, and refuses to start when that much is not free: a server that holds several
# models takes a fixed KV cache instead (vLLM's former CPU default), unless either option is given.
CPU_KV_CACHE_BYTES = 4 * 2**30


def engine_args(plan: LoadPlan, weights: str) -> dict[str, Any]:
    """AsyncEngineArgs keyword arguments for a plan: the model, then the engine options
    (already checked against the catalogue)."""
    options = whole_numbers_as_ints(plan.engine_options, keep_float=frozenset({"gpu_memory_utilization"}))
    memory_told = {"kv_cache_memory_bytes", "gpu_memory_utilization"} & options.keys()
    if plan.device == "cpu" and not memory_told:
        options["kv_cache_memory_bytes"] = CPU_KV_CACHE_BYTES
    return {"model": weights, "tokenizer": weights, "max_num_seqs": plan.max_batch_size, **options}


def sampling_kwargs(params: SamplingParams) -> dict[str, Any]:
    """vLLM SamplingParams keyword arguments for the contract's sampling fields."""
    return {
        "n": 1,
        "max_tokens": params.max_tokens,
        "temperature": params.temperature,
        "top_p": params.top_p,
        "top_k": params.top_k if params.top_k > 0 else 0,  # vLLM: 0 keeps every token
        "min_p": params.min_p,
        "repetition_penalty": params.repetition_penalty,
        "presence_penalty": params.presence_penalty,
        "frequency_penalty": params.frequency_penalty,
        "stop": list(params.stop),
        "stop_token_ids": list(params.stop_token_ids),
        "seed": params.seed,
        "ignore_eos": params.ignore_eos,
        "min_tokens": params.min_tokens,
        "skip_special_tokens": True,
    }


class VllmEngine(LibraryEngine):
    """One model served by vLLM's AsyncLLM in this worker process."""

    library = "vLLM"

    @classmethod
    def load(cls, plan: LoadPlan, weights: str, report: ProgressReport) -> VllmEngine:
        from vllm import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        report("loading weights", 0, 0)
        try:
            engine = AsyncLLM.from_engine_args(AsyncEngineArgs(**engine_args(plan, weights)))
        except Exception as error:
            # vLLM's engine core and workers are processes of their own: the cause is in their
            # log lines (the server's log), the exception here only says that they failed.
            raise FailedPrecondition(
                f"vLLM could not start this model ({error}); its engine processes logged the cause in "
                "the server log. On the CPU, a common one is memory: set engine_options "
                "kv_cache_memory_bytes (or gpu_memory_utilization, the fraction of host memory)",
                reason=Reason.ENGINE_START_FAILED,
            ) from None
        context_length = int(engine.model_config.max_model_len)
        return cls(engine, context_length, plan.device)

    def stats(self) -> EngineStats:
        stats = super().stats()
        # vLLM's own count, so that a request whose caller left but which vLLM still decodes shows.
        stats.running_requests = int(self.engine.get_num_unfinished_requests())
        return stats

    async def generate(self, request: GenerationRequest) -> AsyncIterator[Chunk]:
        from vllm import SamplingParams as VllmSamplingParams
        from vllm.sampling_params import RequestOutputKind

        params = VllmSamplingParams(**sampling_kwargs(request.sampling), output_kind=RequestOutputKind.DELTA)
        prompt: Any = (
            {"prompt_token_ids": list(request.prompt_token_ids)}
            if request.prompt_token_ids is not None
            else request.prompt
        )

        async def chunks() -> AsyncIterator[Chunk]:
            generated = 0
            async for output in self.engine.generate(prompt, params, request.request_id):
                completion = output.outputs[0]
                generated += len(completion.token_ids)
                chunk = Chunk(token_ids=list(completion.token_ids), text=completion.text)
                if output.finished:
                    chunk.finish_reason = FINISH_REASONS.get(
                        completion.finish_reason or "", FinishReason.STOP
                    )
                    chunk.usage = Usage(len(output.prompt_token_ids or ()), generated)
                yield chunk

        async for chunk in self.guarded(request.request_id, chunks()):
            yield chunk

    async def abort_in_library(self, request_id: str) -> None:
        await self.engine.abort(request_id)


ENGINE = VllmEngine
