"""vLLM engine: vLLM's public async API (AsyncLLM), streaming deltas, aborting on cancel.

vLLM does its own continuous batching, so this adapter only maps the contract onto
vLLM's ``SamplingParams`` (one to one; structured_output onto ``StructuredOutputsParams``,
compiled by vLLM's ``guidance`` backend, llguidance, so formats and grammars mean what
they mean on the other engines), streams ``RequestOutputKind.DELTA`` outputs as chunks,
and aborts the request in vLLM when the caller goes away or passes its deadline. vLLM's
logprobs are its raw model logprobs by default, as the contract's. Priority is the
server's admission order, so vLLM schedules first come first served.
It runs in the worker process of an environment that has vLLM (settings.worker_python),
so vLLM's pinned torch and transformers never meet the server's.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Collection, Mapping
from typing import Any

from llmgrpc.clients.errors import FailedPrecondition, Reason
from llmgrpc.engines.base import (
    Chunk,
    Constraint,
    EngineStats,
    FinishReason,
    GenerationRequest,
    LoadPlan,
    ProgressReport,
    SamplingParams,
    TokenLogprob,
    Usage,
)
from llmgrpc.engines.catalogue import runs_on_ray
from llmgrpc.engines.library_engine import (
    FINISH_REASONS,
    LibraryEngine,
    whole_numbers_as_ints,
)
from llmgrpc.engines.lora import LoraModule

# vLLM's structured-output backend: llguidance, the library of the Transformers and llama.cpp
# engines (vLLM's "auto" picks xgrammar, whose grammar dialect is another).
STRUCTURED_OUTPUT_BACKEND = "guidance"

# On the CPU, vLLM reserves gpu_memory_utilization (0.92) of the host's memory unless told a
# KV cache size, and refuses to start when that much is not free: a server that holds several
# models takes a fixed KV cache instead (vLLM's former CPU default), unless either option is given.
CPU_KV_CACHE_BYTES = 4 * 2**30


def engine_args(plan: LoadPlan, weights: str) -> dict[str, Any]:
    """AsyncEngineArgs keyword arguments for a plan: the model, then the engine options (as the
    server admitted them, see engines.catalogue's VLLM). ray_address is not one of vLLM's: it goes
    to the environment (see process_environment) and means distributed_executor_backend ray."""
    options = whole_numbers_as_ints(plan.engine_options, keep_float=frozenset({"gpu_memory_utilization"}))
    memory_told = {"kv_cache_memory_bytes", "gpu_memory_utilization"} & options.keys()
    if plan.device == "cpu" and not memory_told:
        options["kv_cache_memory_bytes"] = CPU_KV_CACHE_BYTES
    if options.pop("ray_address", None) is not None:
        options["distributed_executor_backend"] = "ray"
    if plan.lora_modules:
        options.setdefault("enable_lora", True)
    if options.get("enable_lora"):
        options.update(max_loras=plan.max_loras, max_lora_rank=plan.max_lora_rank)
    return {"model": weights, "tokenizer": weights, "max_num_seqs": plan.max_batch_size, **options}


def process_environment(plan: LoadPlan, environ: Mapping[str, str], cpus: Collection[int]) -> dict[str, str]:
    """Variables this worker process sets before vLLM starts (vLLM reads them, and hands them
    to the processes it starts).

    RAY_ADDRESS: the cluster of engine option ray_address (vLLM joins the Ray cluster that
    ray.init finds). VLLM_CPU_OMP_THREADS_BIND: on the CPU, vLLM binds each model worker's
    OpenMP threads to a NUMA node of its own, and refuses more workers on this host than it
    has NUMA nodes; unless the operator binds them, the host's cores are split between the
    workers instead (with Ray, each node binds its own workers)."""
    options = plan.engine_options
    variables: dict[str, str] = {}
    if "ray_address" in options:
        variables["RAY_ADDRESS"] = str(options["ray_address"])
    on_ray = runs_on_ray(options)
    workers = int(options.get("tensor_parallel_size", 1)) * int(options.get("pipeline_parallel_size", 1))
    if plan.device == "cpu" and workers > 1 and not on_ray and "VLLM_CPU_OMP_THREADS_BIND" not in environ:
        variables["VLLM_CPU_OMP_THREADS_BIND"] = cpu_binding(sorted(cpus), workers)
    return variables


def cpu_binding(cpus: list[int], workers: int) -> str:
    """VLLM_CPU_OMP_THREADS_BIND for workers model workers on these cores: contiguous equal
    shares ("0,1|2,3"), or no binding when there are fewer cores than workers."""
    share = len(cpus) // workers
    if share == 0:
        return "nobind"
    return "|".join(",".join(map(str, cpus[rank * share : (rank + 1) * share])) for rank in range(workers))


def sampling_kwargs(params: SamplingParams) -> dict[str, Any]:
    """vLLM SamplingParams keyword arguments for the contract's sampling fields (the knobs under
    vLLM's names, SamplingParams.library_arguments; vLLM's top_k 0 keeps every token, as ours)."""
    kwargs: dict[str, Any] = {
        "n": 1,
        **params.library_arguments("vllm"),
        "stop": list(params.stop),
        "stop_token_ids": list(params.stop_token_ids),
        "ignore_eos": params.ignore_eos,
        "skip_special_tokens": True,
    }
    if params.logit_bias:
        kwargs["logit_bias"] = dict(params.logit_bias)
    return kwargs


def structured_outputs_kwargs(constraint: Constraint) -> dict[str, Any]:
    """vLLM StructuredOutputsParams keyword arguments for the contract's structured_output."""
    if constraint.kind == "json_schema":
        return {"json": constraint.spec}
    if constraint.kind == "choice":
        return {"choice": list(constraint.spec)}
    if constraint.kind == "json_object":
        return {"json_object": True}
    return {constraint.kind: constraint.spec}  # regex, grammar


def token_logprobs(position: dict[int, Any], token: int, alternatives: int) -> TokenLogprob:
    """One position of vLLM's logprobs (token id -> Logprob with rank and decoded text; the
    sampled token and the top alternatives) in the contract's terms."""
    chosen = position[token]
    top = sorted(
        ((token_id, entry) for token_id, entry in position.items() if (entry.rank or 0) <= alternatives),
        key=lambda item: item[1].rank or 0,
    )
    return TokenLogprob(
        token,
        chosen.decoded_token or "",
        float(chosen.logprob),
        [(token_id, entry.decoded_token or "", float(entry.logprob)) for token_id, entry in top],
    )


class VllmEngine(LibraryEngine):
    """One model served by vLLM's AsyncLLM in this worker process."""

    library = "vLLM"

    @classmethod
    def load(cls, plan: LoadPlan, weights: str, report: ProgressReport) -> VllmEngine:
        from vllm import AsyncEngineArgs
        from vllm.config import StructuredOutputsConfig
        from vllm.v1.engine.async_llm import AsyncLLM

        report("loading weights", 0, 0)
        args = engine_args(plan, weights)
        os.environ.update(process_environment(plan, os.environ, os.sched_getaffinity(0)))
        args["structured_outputs_config"] = StructuredOutputsConfig(backend=STRUCTURED_OUTPUT_BACKEND)
        try:
            engine = AsyncLLM.from_engine_args(AsyncEngineArgs(**args))
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
        return cls.started(engine, context_length, plan, weights, lora=bool(args.get("enable_lora")))

    def load_adapter(self, module: LoraModule, path: str) -> int:
        rank = self.served_adapters().load(module, path, self.base_layers)
        self._lora_ids.setdefault(module.name, len(self._lora_ids) + 1)  # vLLM's int id, never reused
        return rank

    def lora_request(self, name: str) -> Any:
        """vLLM's LoRARequest for a request's adapter (None: the base model)."""
        path = self.adapter_path(name)
        if path is None:
            return None
        from vllm.lora.request import LoRARequest

        return LoRARequest(name, self._lora_ids[name], path)

    def __init__(self, engine: Any, context_length: int, device: str):
        super().__init__(engine, context_length, device)
        self._lora_ids: dict[str, int] = {}

    def stats(self) -> EngineStats:
        stats = super().stats()
        # vLLM's own count, so that a request whose caller left but which vLLM still decodes shows.
        stats.running_requests = int(self.engine.get_num_unfinished_requests())
        return stats

    async def generate(self, request: GenerationRequest) -> AsyncIterator[Chunk]:
        from vllm import SamplingParams as VllmSamplingParams
        from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams

        sampling = request.sampling
        structured = {}
        if sampling.constraint is not None:
            structured["structured_outputs"] = StructuredOutputsParams(
                **structured_outputs_kwargs(sampling.constraint)
            )
        params = VllmSamplingParams(
            **sampling_kwargs(sampling), **structured, output_kind=RequestOutputKind.DELTA
        )
        if sampling.constraint is not None:
            self._check_format(sampling.constraint, params)
        lora_request = self.lora_request(request.adapter)
        truncated = await self.prompt_ids(request)
        prompt: Any = (
            {"prompt_token_ids": truncated if truncated is not None else list(request.prompt_token_ids or ())}
            if request.prompt_token_ids is not None or truncated is not None
            else request.prompt
        )

        async def chunks() -> AsyncIterator[Chunk]:
            generated = 0
            last_token: int | None = None
            async for output in self.engine.generate(
                prompt, params, request.request_id, lora_request=lora_request
            ):
                completion = output.outputs[0]
                token_ids = list(completion.token_ids)
                generated += len(token_ids)
                last_token = token_ids[-1] if token_ids else last_token
                chunk = Chunk(token_ids=token_ids, text=completion.text)
                if sampling.logprobs is not None and completion.logprobs and token_ids:
                    chunk.logprobs = [
                        token_logprobs(position, token, sampling.logprobs)
                        for position, token in zip(
                            completion.logprobs[-len(token_ids) :], token_ids, strict=True
                        )
                    ]
                if output.finished:
                    chunk.finish_reason = FINISH_REASONS.get(
                        completion.finish_reason or "", FinishReason.STOP
                    )
                    # num_cached_tokens: the prompt tokens vLLM's own prefix cache served.
                    cached = getattr(output, "num_cached_tokens", None) or 0
                    chunk.usage = Usage(len(output.prompt_token_ids or ()), generated, cached)
                    if chunk.finish_reason is FinishReason.STOP:
                        # vLLM's stop_reason: the stop string or token id; None for end-of-text.
                        stop_reason = getattr(completion, "stop_reason", None)
                        chunk.stop = stop_reason if stop_reason is not None else last_token
                yield chunk

        async for chunk in self.guarded(request.request_id, chunks()):
            yield chunk

    def _check_format(self, constraint: Constraint, params: Any) -> None:
        """A format that does not compile is INVALID_ARGUMENT naming its field, through vLLM's
        own check for its guidance backend (its refusal at admission names no field)."""
        try:
            from vllm.v1.structured_output.backend_guidance import validate_guidance_grammar
        except ImportError:  # another vLLM layout: its refusal at admission still says why
            return
        try:
            from vllm.exceptions import VLLMValidationError
        except ImportError:  # older vLLM: its validation errors are ValueErrors
            VLLMValidationError = ValueError  # noqa: N806
        try:
            validate_guidance_grammar(params)
        except (ValueError, VLLMValidationError) as error:
            raise constraint.invalid(str(error)) from None

    def hugging_face_tokenizer(self) -> Any:
        return self.engine.get_tokenizer()

    async def abort_in_library(self, request_id: str) -> None:
        await self.engine.abort(request_id)


ENGINE = VllmEngine
