"""Prometheus metrics of one server, named as vLLM names its own (``vllm:`` becomes ``llmgrpc:``).

A ``Metrics`` object owns its registry; the server makes one and passes it down, so two
servers in one process (the tests) never share counters. Per-model gauges (requests
running and waiting, memory) are read from the engine manager when scraped, so a
terminated model disappears from them instead of leaving a stale value behind.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram, ProcessCollector, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from llmgrpc.server import resources
from llmgrpc.v1 import generate_pb2

if TYPE_CHECKING:
    from llmgrpc.server.launched import LaunchedModel
    from llmgrpc.server.manager import EngineManager

# Latency buckets as vLLM uses them (seconds), so dashboards built for vLLM read these unchanged.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
REQUEST_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0)
TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000)
LOAD_BUCKETS = (0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)


class Metrics:
    """Every metric of one server, registered in its own registry."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        ProcessCollector(registry=self.registry)  # process_resident_memory_bytes etc. of the server itself

        def counter(name: str, documentation: str, *labels: str) -> Counter:
            return Counter(name, documentation, labels, registry=self.registry)

        def histogram(name: str, documentation: str, *labels: str, buckets: Sequence[float]) -> Histogram:
            return Histogram(name, documentation, labels, buckets=buckets, registry=self.registry)

        self.rpc_requests = counter(
            "llmgrpc:rpc_requests",
            "RPCs finished, by service, method and status code",
            "service",
            "method",
            "code",
        )
        self.rpc_duration = histogram(
            "llmgrpc:rpc_duration_seconds",
            "RPC duration from arrival to status, by method",
            "service",
            "method",
            buckets=REQUEST_BUCKETS,
        )
        self.time_to_first_token = histogram(
            "llmgrpc:time_to_first_token_seconds",
            "Generate: arrival to the first generated token",
            "model_uid",
            buckets=TTFT_BUCKETS,
        )
        self.inter_token_latency = histogram(
            "llmgrpc:inter_token_latency_seconds",
            "Generate: time between consecutive generated tokens",
            "model_uid",
            buckets=ITL_BUCKETS,
        )
        self.e2e_latency = histogram(
            "llmgrpc:e2e_request_latency_seconds",
            "Generate: arrival to the last message",
            "model_uid",
            buckets=REQUEST_BUCKETS,
        )
        self.queue_time = histogram(
            "llmgrpc:request_queue_time_seconds",
            "Generate: time waiting for a batch slot",
            "model_uid",
            buckets=REQUEST_BUCKETS,
        )
        self.prompt_tokens = counter(
            "llmgrpc:prompt_tokens", "Prompt tokens of finished Generate requests", "model_uid"
        )
        self.generation_tokens = counter(
            "llmgrpc:generation_tokens", "Tokens generated (streamed to callers)", "model_uid"
        )
        self.request_prompt_tokens = histogram(
            "llmgrpc:request_prompt_tokens",
            "Prompt tokens per finished request",
            "model_uid",
            buckets=TOKEN_BUCKETS,
        )
        self.request_generation_tokens = histogram(
            "llmgrpc:request_generation_tokens",
            "Generated tokens per request",
            "model_uid",
            buckets=TOKEN_BUCKETS,
        )
        self.request_success = counter(
            "llmgrpc:request_success",
            "Generate requests that finished, by finish reason",
            "model_uid",
            "finished_reason",
        )
        self.model_load_time = histogram(
            "llmgrpc:model_load_time_seconds",
            "Launch to READY, by family and engine",
            "model_name",
            "engine",
            buckets=LOAD_BUCKETS,
        )
        self.lora_requests = counter(
            "llmgrpc:lora_requests",
            "Generate requests that named a LoRA adapter, when they ended",
            "model_uid",
            "adapter",
        )
        self.lora_generation_tokens = counter(
            "llmgrpc:lora_generation_tokens", "Tokens generated under a LoRA adapter", "model_uid", "adapter"
        )
        self._http = None

    def watch(self, manager: EngineManager) -> None:
        """Report the manager's models (running, waiting, memory, load time) at every scrape."""
        self.registry.register(_ModelCollector(manager.list))

    # Hooks the engine manager (its routing: every Generate of every protocol) and the interceptor call.

    def observe_queue_time(self, model_uid: str, seconds: float) -> None:
        self.queue_time.labels(model_uid).observe(seconds)

    def observe_model_load(self, model_name: str, engine: str, seconds: float) -> None:
        self.model_load_time.labels(model_name, engine).observe(seconds)

    def observe_rpc(self, service: str, method: str, code: str, seconds: float) -> None:
        self.rpc_requests.labels(service, method, code).inc()
        self.rpc_duration.labels(service, method).observe(seconds)

    async def track_generation(
        self, model_uid: str, responses: AsyncIterator[generate_pb2.GenerateResponse], adapter: str = ""
    ) -> AsyncIterator[generate_pb2.GenerateResponse]:
        """Pass a Generate stream through, timing its tokens (first, between, last) and counting them
        (also per LoRA adapter, when it names one)."""
        started = last = time.monotonic()
        generated = 0
        finished = None
        try:
            async for response in responses:
                now = time.monotonic()
                count = len(response.token_ids)
                if count:
                    if generated == 0:
                        # This model's series: looked up once per stream, not per token, and only
                        # once it has output (a call for a model that does not exist makes none).
                        between_tokens = self.inter_token_latency.labels(model_uid)
                        tokens = self.generation_tokens.labels(model_uid)
                        self.time_to_first_token.labels(model_uid).observe(now - started)
                    else:
                        # A message may settle several tokens at once: spread the wait over them.
                        for _ in range(count):
                            between_tokens.observe((now - last) / count)
                    generated += count
                    tokens.inc(count)
                    last = now
                if response.finish_reason:
                    finished = response
                yield response
        finally:
            if adapter and (finished is not None or generated):
                self.lora_requests.labels(model_uid, adapter).inc()
                self.lora_generation_tokens.labels(model_uid, adapter).inc(generated)
            if finished is not None:
                self.e2e_latency.labels(model_uid).observe(time.monotonic() - started)
                self.prompt_tokens.labels(model_uid).inc(finished.usage.prompt_tokens)
                self.request_prompt_tokens.labels(model_uid).observe(finished.usage.prompt_tokens)
                self.request_generation_tokens.labels(model_uid).observe(generated)
                reason = generate_pb2.FinishReason.Name(finished.finish_reason)
                self.request_success.labels(model_uid, reason.removeprefix("FINISH_REASON_").lower()).inc()

    # The HTTP endpoint.

    def serve_http(self, host: str, port: int) -> int:
        """Serve /metrics on host:port (0: a free port) in a background thread; returns the port."""
        self._http, _ = start_http_server(port, addr=host, registry=self.registry)
        return self._http.server_port

    def stop_http(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None


class _ModelCollector(Collector):
    """Gauges read from the launched models when scraped."""

    def __init__(self, models: Callable[[], Iterable[LaunchedModel]]):
        self._models = models

    def collect(self) -> Iterable[Metric]:
        running = GaugeMetricFamily(
            "llmgrpc:num_requests_running", "Generate requests decoding now", labels=["model_uid"]
        )
        waiting = GaugeMetricFamily(
            "llmgrpc:num_requests_waiting", "Generate requests queued for a batch slot", labels=["model_uid"]
        )
        memory = GaugeMetricFamily(
            "llmgrpc:model_memory_bytes",
            "Memory of each model: rss (its worker processes, every replica's), gpu (the engines' CUDA "
            "memory), estimated",
            labels=["model_uid", "kind"],
        )
        # The Gateway API Inference Extension's KVCacheUtilization (its endpoint picker reads the
        # two gauges above as TotalRunningRequests and TotalQueuedRequests).
        kv_cache = GaugeMetricFamily(
            "llmgrpc:kv_cache_usage_perc",
            "Fraction (0 to 1) of the engines' KV-cache capacity held by live sequences",
            labels=["model_uid"],
        )
        # vLLM's prefix_cache_queries and prefix_cache_hits: hits over queries is the share of
        # prompt tokens served from the prefix cache.
        cache_queries = CounterMetricFamily(
            "llmgrpc:prefix_cache_queries",
            "Prompt tokens looked up in the engines' prefix caches",
            labels=["model_uid"],
        )
        cache_hits = CounterMetricFamily(
            "llmgrpc:prefix_cache_hits",
            "Prompt tokens found in the engines' prefix caches, and not prefilled",
            labels=["model_uid"],
        )
        load = GaugeMetricFamily(
            "llmgrpc:model_load_seconds", "How long each READY model took to load", labels=["model_uid"]
        )
        info = GaugeMetricFamily(
            "llmgrpc:model_info",
            "1 per launched model, with its family, engine, device and state",
            labels=["model_uid", "model_name", "engine", "device", "state"],
        )
        # The Inference Extension's LoRA affinity signal, as vLLM exports it: one sample per model,
        # its value the time it was taken, its labels the adapters decoding and queued now.
        lora = GaugeMetricFamily(
            "llmgrpc:lora_requests_info",
            "LoRA adapters with Generate requests decoding (running_lora_adapters) and queued "
            "(waiting_lora_adapters), comma-separated, and the adapters resident at once (max_lora)",
            labels=["model_uid", "max_lora", "running_lora_adapters", "waiting_lora_adapters"],
        )
        models = list(self._models())
        for model in models:
            running_adapters, waiting_adapters = model.adapters.busy()
            labels = [
                model.uid,
                str(model.adapters.max_loras),
                ",".join(running_adapters),
                ",".join(waiting_adapters),
            ]
            lora.add_metric(labels, time.time())
            uid = model.uid
            running.add_metric([uid], model.gate.running)
            waiting.add_metric([uid], model.gate.waiting)
            stats = model.engine_stats
            kv_cache.add_metric([uid], stats.kv_cache_usage)
            cache_queries.add_metric([uid], stats.prefix_cache_queries)
            cache_hits.add_metric([uid], stats.prefix_cache_hits)
            pids = [replica.pid for replica in model.replicas if replica.pid]
            memory.add_metric([uid, "rss"], sum(resources.process_memory_bytes(pid) for pid in pids))
            memory.add_metric([uid, "gpu"], stats.gpu_memory_bytes)
            memory.add_metric([uid, "estimated"], model.estimated_bytes)
            load.add_metric([uid], model.load_seconds)
            described = model.to_pb()  # names from the request while the spec is being chosen
            info.add_metric(
                [uid, described.model_name, described.model_engine, model.device, model.state.name], 1
            )
        loaded = GaugeMetricFamily(
            "llmgrpc:models_loaded",
            "Launched models whose weights are in memory (READY; not UNLOADED, FAILED or LOADING)",
            value=sum(model.state.name == "READY" for model in models),
        )
        return [running, waiting, kv_cache, cache_queries, cache_hits, memory, load, info, loaded, lora]
