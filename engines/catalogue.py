"""Which engines exist, what they need, and why one cannot run: without importing any.

The server uses this table to list engines and to validate launches; a worker uses it to
import the one engine it runs. Each engine's ``EngineInfo`` holds all of its own policy: its
options and their rules (``llmgrpc.engines.options``), which the server applies once, on
admission, so that engines load the plan they are given without checking it again.
Availability is checked by ``llmgrpc.engines.probe``, run in each engine's own Python
environment.

Engines defined outside llmgrpc join the table as plugins: ``load_plugins`` imports each
``"module:attribute"`` naming an ``EngineInfo`` (its ``module`` holds the engine class as
``ENGINE``, imported by workers only). The server loads its ``engine_plugins`` setting
and hands the same list to its probes and workers in the ``LLMGRPC_ENGINE_PLUGINS``
environment variable (a JSON list), which they load with ``load_plugins_from_environment``.
"""

from __future__ import annotations

import importlib
import json
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from llmgrpc.clients.errors import FieldViolation, InvalidArgument, Reason
from llmgrpc.engines.base import Engine
from llmgrpc.engines.options import EngineOption

# Bounds shared by several engines' options.
MAX_THREADS = 1024
MAX_CONTEXT_TOKENS = 2**24
MAX_GPUS = 256


def _whole(name: str, help: str, minimum: int, maximum: int) -> EngineOption:
    """An engine option that takes a whole number in [minimum, maximum]."""
    return EngineOption(name, int, help, minimum=minimum, maximum=maximum)


def _fraction(name: str, help: str) -> EngineOption:
    """An engine option that takes a fraction in (0, 1]."""
    return EngineOption(name, float, help, minimum=0, maximum=1, exclusive_minimum=True)


# vLLM's and SGLang's own switch for LoRA adapters.
ENABLE_LORA = EngineOption(
    "enable_lora",
    bool,
    "serve LoRA adapters (on by itself when lora_modules are given; set it to load adapters at run "
    "time into a model launched without any)",
)
# The dtype option of the engines that choose their own precision (vLLM, SGLang).
LIBRARY_DTYPE = EngineOption(
    "dtype", str, "auto, bfloat16, float16 or float32", choices=("auto", "bfloat16", "float16", "float32")
)

# The step budget of the engines behind the continuous batcher (Transformers, llama.cpp).
MAX_NUM_BATCHED_TOKENS = _whole(
    "max_num_batched_tokens",
    "tokens one step computes: the decoding requests' first, then prompt parts (in chunks of "
    "8 on Transformers, 32 on llama.cpp) take the rest; bounds how long a long prompt delays the "
    "others' next token (default 128)",
    1,
    MAX_CONTEXT_TOKENS,
)
# The prefill pace of the same engines: how long prompt parts may take beside decoding requests.
PREFILL_TIME_RATIO = EngineOption(
    "prefill_time_ratio",
    float,
    "while requests decode, the time prompt parts may take per unit of time spent decoding, over "
    "the steps: a part that costs several decode steps (deep in a long prompt) is followed by "
    "decode-only steps; higher prefills a prompt beside streams sooner and slows them more "
    "(default 1)",
    minimum=0,
    maximum=100,
    exclusive_minimum=True,
)
# The prefix cache switch of the engines that keep one (Transformers, llama.cpp).
PREFIX_CACHE = EngineOption(
    "prefix_cache",
    bool,
    "keep finished sequences' KV and start a prompt from its longest cached prefix (default true)",
)


@dataclass(frozen=True)
class EngineInfo:
    """One engine: its registry spelling, its module and what it needs to run."""

    name: str
    key: str
    module: str
    extra: str
    required_modules: tuple[str, ...]
    formats: tuple[str, ...]
    # The engine_options keys the engine takes, with their types and valid values.
    options: tuple[EngineOption, ...] = ()
    needs_cuda: bool = False
    # Name of a check in llmgrpc.engines.probe that asks the engine which device it can use.
    platform_check: str = ""
    # Set while an engine's adapter is not yet written: launching it is refused with this.
    not_built: str = ""
    # How far the project has proven the adapter, when not fully (ListSpecs shows it).
    support_note: str = ""
    # Environment variables a worker of this engine starts with on the CPU, unless the
    # server's own environment sets them (the operator's choice wins).
    cpu_environment: tuple[tuple[str, str], ...] = ()
    # The engine_options key that shards the model over its GPUs (tensor parallel size), if any.
    parallel_size_option: str = ""
    # The engine_options key that splits the model's layers into stages (pipeline parallel size),
    # if any: the GPUs a launch takes are the tensor parallel size times this.
    pipeline_size_option: str = ""
    # The engine_options key naming the fraction of each GPU's total memory the engine reserves
    # (weights and KV cache), and its default; empty: the engine takes what the model needs.
    memory_fraction_option: str = ""
    memory_fraction_default: float = 0.0
    # The engine's rules between its options, and between them and the device a launch runs on
    # ("cpu" or "cuda"), beyond each option's own type and range: raise InvalidArgument.
    option_rules: Callable[[Mapping[str, object], str], None] | None = None
    # Whether a launch's options put its model workers on other hosts too (vLLM on a Ray
    # cluster): placement then checks only this host's share of the GPUs.
    spans_hosts: Callable[[Mapping[str, object]], bool] | None = None

    def check_option_rules(self, options: Mapping[str, object], device: str) -> None:
        """Apply the engine's option_rules for a launch on device ("cpu" or "cuda"); the server
        calls it once the device is known, after validate_engine_options."""
        if self.option_rules is not None:
            self.option_rules(options, device)

    def runs_across_hosts(self, options: Mapping[str, object]) -> bool:
        return self.spans_hosts is not None and self.spans_hosts(options)

    def load_class(self) -> type[Engine]:
        """Import the engine's module (heavy: only worker processes call this)."""
        return importlib.import_module(self.module).ENGINE

    @property
    def install_hint(self) -> str:
        return f"pip install 'llmgrpc[{self.extra}]'"


def _transformers_option_rules(options: Mapping[str, object], device: str) -> None:
    """decode static and compiled (compiled: the default on CUDA) attend with sdpa only."""
    decode = options.get("decode", "compiled" if device == "cuda" else "plain")
    if decode != "plain" and options.get("attn_implementation", "sdpa") != "sdpa":
        default = "" if "decode" in options else f" (decode {decode} is the default on {device})"
        raise InvalidArgument(
            f"engine_options.decode static and compiled need attn_implementation sdpa{default}",
            [
                FieldViolation(
                    "engine_options.attn_implementation", "sdpa, or unset, with decode static or compiled"
                )
            ],
            reason=Reason.ENGINE_OPTION_INVALID,
        )


TRANSFORMERS = EngineInfo(
    name="Transformers",
    key="transformers",
    module="llmgrpc.engines.transformers_engine",
    extra="transformers",
    required_modules=("torch", "transformers", "tokenizers", "safetensors"),
    formats=("pytorch",),
    option_rules=_transformers_option_rules,
    options=(
        EngineOption(
            "dtype",
            str,
            "auto (float32 on the CPU, bfloat16 on CUDA), float32, bfloat16 or float16",
            choices=("auto", "float32", "bfloat16", "float16"),
        ),
        _whole("n_threads", "CPU threads for torch (default: all cores)", 1, MAX_THREADS),
        _whole(
            "context_length", "longest prompt plus output, at most the model's own", 2, MAX_CONTEXT_TOKENS
        ),
        EngineOption("attn_implementation", str, "sdpa (default) or eager", choices=("sdpa", "eager")),
        EngineOption(
            "trust_remote_code", bool, "run the repository's own code (needs allow_trust_remote_code)"
        ),
        EngineOption(
            "decode",
            str,
            "plain (CPU default: batched KV cache in buffers that grow now and then, sized to the "
            "sequences), compiled (CUDA default: static KV cache and a decode step compiled with CUDA "
            "graphs) or static (static KV cache of context_length, not compiled; on the CPU each step "
            "attends to all of it)",
            choices=("plain", "static", "compiled"),
        ),
        EngineOption(
            "cpu_matmul",
            str,
            "onednn (default: linear layers through oneDNN, weights reordered once at load; about "
            "3 times faster than torch's own CPU matmul at decode batch sizes; not with decode compiled, "
            "which lowers them itself) or torch",
            choices=("onednn", "torch"),
        ),
        MAX_NUM_BATCHED_TOKENS,
        PREFILL_TIME_RATIO,
        PREFIX_CACHE,
        _whole(
            "prefix_cache_tokens",
            "tokens of finished sequences' KV the prefix cache keeps, least recently used out first "
            "(default: as many as fit in 1 GiB)",
            0,
            MAX_CONTEXT_TOKENS,
        ),
    ),
)


LLAMA_CPP = EngineInfo(
    name="llama.cpp",
    key="llama.cpp",
    module="llmgrpc.engines.llamacpp_engine",
    extra="llamacpp",
    required_modules=("llama_cpp", "gguf"),
    formats=("ggufv2",),
    options=(
        _whole(
            "n_threads",
            "CPU threads for a step of one token, one stream decoding (default: all cores); "
            "alone, it sets n_threads_batch too",
            1,
            MAX_THREADS,
        ),
        _whole(
            "n_threads_batch",
            "CPU threads for a larger step: several streams decoding together, or a prompt "
            "(default: all cores)",
            1,
            MAX_THREADS,
        ),
        _whole(
            "context_length",
            "KV cache size in tokens, shared by all sequences; each may use context_length divided by "
            "cache_slots (default: 4096 per sequence, at most the model's trained context)",
            2,
            MAX_CONTEXT_TOKENS,
        ),
        _whole(
            "n_gpu_layers",
            "layers offloaded to a CUDA GPU (default: -1, all, on CUDA; 0 on the CPU)",
            -1,
            10_000,
        ),
        EngineOption(
            "kv_cache_type",
            str,
            "f16 (default) or f32: element type of the KV cache",
            choices=("f16", "f32"),
        ),
        EngineOption("flash_attention", bool, "use flash attention (default: where llama.cpp supports it)"),
        EngineOption(
            "kv_unified",
            bool,
            "one KV buffer for all sequences instead of one stream each (default: false, which keeps "
            "each request's attention independent of the others)",
        ),
        MAX_NUM_BATCHED_TOKENS,
        PREFILL_TIME_RATIO,
        PREFIX_CACHE,
        _whole(
            "cache_slots",
            "sequences the context holds: one per request decoding at once, any more keep finished "
            "conversations' KV for the prefix cache (default: max_running_requests); each has "
            "context_length divided by cache_slots",
            1,
            256,
        ),
        EngineOption(
            "slot_prompt_similarity",
            float,
            "the share of a free slot's cached tokens a new prompt must begin with to be given that "
            "slot; below it, the least recently used free slot (default 0.5)",
            minimum=0,
            maximum=1,
        ),
    ),
)


def _library_engine(name: str, key: str, **details: Any) -> EngineInfo:
    """An engine that is one library of its own name, serving pytorch weights (vLLM, SGLang): its
    key names the library's module, its extra and its adapter (llmgrpc.engines.KEY_engine)."""
    return EngineInfo(
        name=name,
        key=key,
        module=f"llmgrpc.engines.{key}_engine",
        extra=key,
        required_modules=(key,),
        formats=("pytorch",),
        **details,
    )


# vLLM's multi-node way, which placement asks of it (EngineInfo.spans_hosts).
def runs_on_ray(options: Mapping[str, object]) -> bool:
    """Whether a launch's engine options put its model workers on a Ray cluster's nodes (vLLM's
    multi-node way): ray_address, which implies the ray backend, or that backend itself."""
    return "ray_address" in options or options.get("distributed_executor_backend") == "ray"


VLLM = _library_engine(
    "vLLM",
    "vllm",
    spans_hosts=runs_on_ray,
    options=(
        _whole("tensor_parallel_size", "GPUs to shard the model over", 1, MAX_GPUS),
        _whole(
            "pipeline_parallel_size",
            "stages to split the model's layers over, each on tensor_parallel_size GPUs",
            1,
            MAX_GPUS,
        ),
        EngineOption(
            "distributed_executor_backend",
            str,
            "where vLLM runs its model workers: mp, processes on this host (its default); ray, the "
            "nodes of a Ray cluster (docs/multi-node.md)",
            choices=("mp", "ray"),
        ),
        EngineOption(
            "ray_address",
            str,
            "the Ray cluster to run the model workers on (its head's host:port); implies "
            "distributed_executor_backend ray",
            implies=("distributed_executor_backend", "ray"),
        ),
        _fraction("gpu_memory_utilization", "fraction of GPU memory vLLM may take (weights and KV cache)"),
        _whole("max_model_len", "context length (default: the model's)", 1, MAX_CONTEXT_TOKENS),
        LIBRARY_DTYPE,
        EngineOption("enforce_eager", bool, "no CUDA graphs (faster start, slower decode)"),
        ENABLE_LORA,
        _whole(
            "max_num_seqs",
            "sequences decoded together (default: the server's max_running_requests)",
            1,
            65_536,
        ),
        EngineOption(
            "kv_cache_dtype",
            str,
            "auto, or fp8 (fp8_e4m3, fp8_e5m2): element type of the KV cache",
            choices=("auto", "fp8", "fp8_e4m3", "fp8_e5m2"),
        ),
        _whole(
            "kv_cache_memory_bytes",
            "KV cache size in bytes (on the CPU backend, instead of VLLM_CPU_KVCACHE_SPACE)",
            1,
            2**50,
        ),
    ),
    # The PyPI wheels run on CUDA only; a CPU build of vLLM reports the CPU platform.
    platform_check="vllm_platform",
    # vLLM's CPU layout expects cores of its own: its engine core and its model worker
    # process wait on each other by spinning on sched_yield, and OpenMP threads spin between
    # kernels. On a host it shares (with this server, its clients, health probes) that
    # spinning starved every other process of the CPU while a stream decoded (an idle 10 ms
    # sleeper went unscheduled for 25 s on 2 cores). So on the CPU: the model runs inside
    # the engine core process (no spinning queue between two processes), and OpenMP
    # threads sleep after a short spin.
    cpu_environment=(("VLLM_ENABLE_V1_MULTIPROCESSING", "0"), ("GOMP_SPINCOUNT", "10000")),
    parallel_size_option="tensor_parallel_size",
    pipeline_size_option="pipeline_parallel_size",
    memory_fraction_option="gpu_memory_utilization",
    memory_fraction_default=0.9,  # vLLM's own default
    support_note=(
        "run by this project's tests on vLLM 0.32.0 built for the CPU (make test-vllm); not yet on a CUDA GPU"
    ),
)


SGLANG = _library_engine(
    "SGLang",
    "sglang",
    options=(
        _whole("tp_size", "GPUs to shard the model over", 1, MAX_GPUS),
        ENABLE_LORA,
        _whole("pp_size", "stages to split the model's layers over, each on tp_size GPUs", 1, MAX_GPUS),
        _fraction("mem_fraction_static", "fraction of GPU memory for weights and KV cache"),
        _whole("context_length", "context length (default: the model's)", 1, MAX_CONTEXT_TOKENS),
        LIBRARY_DTYPE,
        EngineOption(
            "kv_cache_dtype",
            str,
            "auto, fp8_e5m2 or fp8_e4m3: element type of the KV cache",
            choices=("auto", "fp8_e5m2", "fp8_e4m3"),
        ),
    ),
    needs_cuda=True,
    parallel_size_option="tp_size",
    pipeline_size_option="pp_size",
    # SGLang's default depends on its version and the GPU; the server passes the fraction it
    # counted (see llmgrpc.server.placement), so what is counted is what SGLang reserves.
    memory_fraction_option="mem_fraction_static",
    memory_fraction_default=0.88,
    support_note=(
        "written against SGLang's public API (Engine.async_generate, abort_request) and tested "
        "against a double of it; not yet run by this project on a real SGLang"
    ),
)


ENGINES: tuple[EngineInfo, ...] = (TRANSFORMERS, LLAMA_CPP, VLLM, SGLANG)

_BY_KEY = {info.key: info for info in ENGINES}
PLUGINS_ENV = "LLMGRPC_ENGINE_PLUGINS"


def engines() -> tuple[EngineInfo, ...]:
    """Every engine this process knows: the built-in ones, then plugins in the order loaded."""
    return tuple(_BY_KEY.values())


def load_plugins(plugins: Iterable[str]) -> list[EngineInfo]:
    """Import each "module:attribute" naming an EngineInfo, and add it to this process's engines."""
    loaded = []
    for plugin in plugins:
        module_name, _, attribute = plugin.partition(":")
        if not module_name or not attribute:
            raise ValueError(f"engine plugin {plugin!r} is not of the form module:attribute")
        info = getattr(importlib.import_module(module_name), attribute, None)
        if not isinstance(info, EngineInfo):
            raise ValueError(f"engine plugin {plugin!r} names {type(info).__name__}, not an EngineInfo")
        if not all(isinstance(option, EngineOption) for option in info.options):
            raise ValueError(f"engine plugin {plugin!r}: each of its options must be an EngineOption")
        if _BY_KEY.get(info.key, info) != info:
            raise ValueError(f"engine plugin {plugin!r}: an engine called {info.name} exists already")
        _BY_KEY[info.key] = info
        loaded.append(info)
    return loaded


def load_plugins_from_environment() -> list[EngineInfo]:
    """The plugins the server passed to this process (a probe or a worker)."""
    return load_plugins(json.loads(os.environ.get(PLUGINS_ENV) or "[]"))


def engine_info(name: str) -> EngineInfo:
    """The engine called name, matched case-insensitively ("transformers", "LLAMA.CPP")."""
    info = _BY_KEY.get(name.strip().lower())
    if info is None:
        valid = ", ".join(info.name for info in engines())
        raise InvalidArgument(
            f"unknown engine {name!r}; valid engines: {valid}", reason=Reason.UNKNOWN_ENGINE
        )
    return info
