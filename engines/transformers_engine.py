"""Transformers engine: Hugging Face transformers + torch, on the CPU or a CUDA GPU.

Concurrent requests share forward passes, through one of two runners chosen by
``engine_options.decode``:

- ``plain`` (the CPU default): one batched KV cache in preallocated buffers that a step
  writes in place, each sequence right-aligned to a shared write column (left padding
  masked), each with its own position ids.
- ``compiled`` (the CUDA default), or ``static`` (the same without compiling): a KV cache
  of fixed size and a decode step compiled by torch.compile, with CUDA graphs on CUDA.

Either way the prompts that start in one batcher step are prefilled together, in one
forward pass over their parts packed end to end (a block-diagonal causal mask keeps them
apart), each into a KV cache of its own; a long prompt's later parts are fed alone, after
its own cache. A prefilled sequence joins the batch at its first decode step, and a
finished or aborted one leaves it at the next step.

On the CPU the linear layers run through oneDNN with weights prepacked once
(``engine_options.cpu_matmul``): torch's default CPU matmul is several times slower at
the few rows of a decode step (measured in docs/benchmarks-vllm.md's setting)."""

from __future__ import annotations

import gc
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from llmgrpc.clients.errors import FailedPrecondition, InvalidArgument, Reason
from llmgrpc.engines.base import EngineStats, GenerationRequest, LoadPlan, ProgressReport, SamplingParams
from llmgrpc.engines.batched_engine import BatchedEngine
from llmgrpc.engines.cpu_threads import usable_cores
from llmgrpc.engines.lora import LoraModule
from llmgrpc.engines.model_folder import check_tokenizer_files, read_model_config
from llmgrpc.engines.onednn import use_onednn_linears
from llmgrpc.engines.transformers_attention import attention_implementation
from llmgrpc.engines.transformers_lora import LoraSlots
from llmgrpc.engines.transformers_plain import DynamicCacheRunner
from llmgrpc.engines.transformers_runner import HuggingFaceRunner
from llmgrpc.engines.transformers_static import StaticCacheRunner

STATIC_CONTEXT_DEFAULT = 4096
# Memory for the prefix cache's KV, by default (engine_options.prefix_cache_tokens sets tokens).
PREFIX_CACHE_BYTES = 1 << 30
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def default_prefix_cache_tokens(model) -> int:
    """Tokens of finished sequences' KV kept for prompts that share their prefix, by default:
    as many as fit in PREFIX_CACHE_BYTES at the model's KV size per token."""
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    per_token = 2 * config.num_hidden_layers * heads * head_dim * model.dtype.itemsize
    return PREFIX_CACHE_BYTES // per_token


def _int_option(options: dict, name: str, default: int) -> int:
    value = options.get(name)
    return default if value is None else int(value)


def _sliding_window(config) -> int:
    """The attention window of a model with sliding-window layers (Mistral's kind); 0 if none."""
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if not window or (layer_types is not None and "sliding_attention" not in layer_types):
        return 0
    return int(window)


class TransformersEngine(BatchedEngine):
    """A transformers causal LM behind the continuous batcher."""

    # Deep in a long prompt a part's attention costs more than a decode step however small the
    # part, and the first chunk of the waiting prompt goes in every step that feeds parts:
    # smaller chunks keep the streams beside it quicker (the tiny model, 12,000 tokens in: 8
    # tokens 6 ms, 32 tokens 11 ms, a decode step 1.5 ms; docs/engines.md, "The step budget").
    CHUNK_TOKENS = 8

    @classmethod
    def load(cls, plan: LoadPlan, weights: str, report: ProgressReport) -> TransformersEngine:
        options = plan.engine_options  # as the server admitted them (engines.catalogue, TRANSFORMERS)
        # A broken folder would fail deep inside transformers (a JSONDecodeError, a division by zero).
        read_model_config(Path(weights))
        check_tokenizer_files(Path(weights))
        torch.set_num_threads(int(options.get("n_threads") or usable_cores()))
        device = torch.device(plan.device)
        dtype_name = options.get("dtype", "auto")
        if dtype_name == "auto":
            dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        else:
            dtype = DTYPES[dtype_name]
        attention = attention_implementation(options.get("attn_implementation", "sdpa"), device)

        report("loading weights", 0, 0)
        # The server passes trust_remote_code only where the operator allows it (allow_trust_remote_code).
        remote_code = bool(options.get("trust_remote_code", False))
        tokenizer = AutoTokenizer.from_pretrained(weights, trust_remote_code=remote_code)
        model = AutoModelForCausalLM.from_pretrained(
            weights,
            dtype=dtype,
            attn_implementation=attention,
            trust_remote_code=remote_code,
            use_safetensors=True,  # never unpickle a .bin checkpoint found in model_path
            # Several GPUs: accelerate spreads the layers over all the worker sees.
            **({"device_map": "auto"} if plan.gpu_count > 1 else {}),
        )
        model = (model if plan.gpu_count > 1 else model.to(device)).eval()
        model_context = int(getattr(model.config, "max_position_embeddings", 0) or 2048)
        window = _sliding_window(model.config)
        if window:
            # Both runners hand the attention one mask for all its layers: a model with
            # sliding-window layers is served within its window, where that mask is exact.
            model_context = min(model_context, window)
        decode = options.get("decode", "compiled" if device.type == "cuda" else "plain")
        # A static cache is allocated whole up front: bound its default size.
        default_context = model_context if decode == "plain" else min(model_context, STATIC_CONTEXT_DEFAULT)
        context_length = int(options.get("context_length") or default_context)
        if not 1 < context_length <= model_context:
            raise InvalidArgument(
                f"engine_options.context_length {context_length} must be in [2, {model_context}] "
                "for this model"
            )
        # torch.compile lowers the linear layers itself (and cannot take prepacked weights).
        if device.type == "cpu" and decode != "compiled" and options.get("cpu_matmul", "onednn") == "onednn":
            use_onednn_linears(model)
        prefix_cache_tokens = (
            _int_option(options, "prefix_cache_tokens", default_prefix_cache_tokens(model))
            if options.get("prefix_cache", True)
            else 0
        )
        if decode == "plain":
            runner: HuggingFaceRunner = DynamicCacheRunner(
                model, tokenizer, context_length, prefix_cache_tokens
            )
        else:  # static or compiled, with sdpa attention
            compiled = decode == "compiled"
            runner = StaticCacheRunner(
                model, tokenizer, context_length, plan.max_batch_size, compiled, prefix_cache_tokens
            )

        report("warming up", 0, 0)  # also compiles the decode step, when it is compiled
        warm_up = runner.tokenize("warm up")
        runner.admit(0, warm_up, GenerationRequest("warm-up", SamplingParams(), cache_prompt=False))
        runner.prefill([(0, warm_up)])
        for _ in range(StaticCacheRunner.WARM_STEPS_BEFORE_GRAPH + 1):  # compiles and records the graph
            runner.decode({0: 0})
        runner.release(0)
        if decode == "plain":  # the static runners' compiled step and CUDA graph have no adapter path yet
            runner.lora = LoraSlots(model, plan.max_loras, plan.max_lora_rank)
        return cls(runner, plan.max_batch_size, str(device), **cls.step_budget(options))

    def load_adapter(self, module: LoraModule, path: str) -> int:
        if self.runner.lora is None:
            raise FailedPrecondition(
                "LoRA adapters are served by the Transformers engine's plain decode path only: launch "
                'with engine_options {"decode": "plain"} (the static and compiled paths have none yet)',
                reason=Reason.ADAPTER_INCOMPATIBLE,
            )
        return self.runner.lora.load(module, path)

    def unload_adapter(self, name: str) -> None:
        if self.runner.lora is not None:
            self.runner.lora.unload(name)

    def stats(self) -> EngineStats:
        stats = super().stats()
        if self.runner.lora is not None:
            stats.resident_adapters = self.runner.lora.resident()
            stats.adapter_ranks = self.runner.lora.ranks()
        return stats

    def gpu_memory_bytes(self) -> int:
        device = self.runner.device
        return int(torch.cuda.memory_reserved(device)) if device.type == "cuda" else 0

    def close(self) -> None:
        super().close()
        device = self.runner.device
        del self.runner
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()


ENGINE = TransformersEngine
