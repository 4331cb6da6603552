"""Admitting a launch: every check that can refuse it, and where it runs, decided before any
worker starts or any byte is fetched: the spec and its engine, the engine's options, the
caller's rights, the hub, the device, and the memory it needs (the model's estimate against
what is free, less what launches still loading will take)."""

from __future__ import annotations

import asyncio
import dataclasses
import functools
from collections.abc import Callable
from pathlib import Path

from llmgrpc.clients.errors import FailedPrecondition, Reason
from llmgrpc.engines.base import LoadPlan
from llmgrpc.engines.catalogue import engine_info
from llmgrpc.engines.lora import LoraModule
from llmgrpc.engines.model_folder import CONFIG_FILE, read_model_config
from llmgrpc.engines.options import validate_engine_options
from llmgrpc.engines.weights import hubs
from llmgrpc.engines.weights.adapters import is_local
from llmgrpc.server import placement, resources
from llmgrpc.server.auth import check_engine_options, check_model_path
from llmgrpc.server.availability import EngineAvailability
from llmgrpc.server.launched import LaunchedModel, ModelState
from llmgrpc.server.models.requests import LaunchRequest
from llmgrpc.server.models.table import ModelTable
from llmgrpc.server.registry import Registry, Selection
from llmgrpc.server.settings import Settings
from llmgrpc.server.worker_client import WorkerProcess
from llmgrpc.server.worker_environment import worker_environment

# The key of the CPU's reservations among the GPU indices (see loading_reservations).
CPU = "cpu"


class Admission:
    def __init__(
        self,
        settings: Settings,
        registry: Registry,
        availability: EngineAvailability,
        table: ModelTable,
        tracer=None,
    ):
        self.settings = settings
        self.registry = registry
        self.availability = availability
        self.table = table
        self.tracer = tracer

    async def check_and_place(self, model: LaunchedModel, request: LaunchRequest) -> None:
        """Everything that can refuse a launch; then each replica gets its plan and the maker of
        its worker. File system work runs in a thread: a slow or strange file never blocks the
        event loop."""
        settings = self.settings
        check_engine_options(request.engine_options, settings.allow_trust_remote_code)
        # The worker gets the resolved path: what was checked is what is loaded.
        model_path = await asyncio.to_thread(
            check_model_path, request.model_path, settings.allowed_model_dirs
        )
        lora_modules = await asyncio.to_thread(checked_adapter_paths, request.lora_modules, settings)
        request = dataclasses.replace(request, model_path=model_path, lora_modules=lora_modules)
        selection = self.registry.select(request.query, await self.first_available_engine())
        info = engine_info(selection.engine)
        await self.availability.require(info.name)
        validate_engine_options(info, request.engine_options)
        if not request.model_path:
            await self.check_hubs(selection, request.download_hub)
        words = placement.GpuWords(model.device, request.n_gpu, request.gpu_idx)
        inventory = await self._gpu_inventory(info.name, words)
        on_gpus = placement.uses_gpus(words, inventory, info.name)
        info.check_option_rules(request.engine_options, "cuda" if on_gpus else "cpu")
        model.selection = selection
        need = await asyncio.to_thread(self._estimate_need, selection, request, on_gpus)
        # No await from here until this launch is counted in: concurrent launches each see
        # the others' reservations (see loading_reservations).
        loading = self.loading_reservations()
        if on_gpus:
            ask = placement.GpuAsk(info, words, request.engine_options, need, _label(selection))
            placed = placement.place_replicas(ask, inventory, loading, request.replica)
        else:
            placed = placement.place_on_cpu(
                request.engine_options,
                need,
                resources.free_cpu_bytes(),
                loading.get(CPU, 0),
                _label(selection),
                request.replica,
            )
        python = self.availability.python_for(info.name)
        for replica, place in zip(model.replicas, placed, strict=True):
            replica.device = place.device
            replica.gpu_reserved_bytes = dict(place.reserved_bytes)
            replica.estimated_bytes = sum(place.reserved_bytes.values()) or need.total_bytes
            plan = LoadPlan(
                model_uid=model.uid,
                engine=info.name,
                spec=selection.spec.ref(selection.family.model_name, selection.quantization),
                device="cuda:0" if place.gpus else "cpu",  # the worker sees its GPUs numbered from 0
                gpu_count=len(place.gpus),
                cache_dir=str(settings.cache_dir),
                max_batch_size=settings.max_running_requests,
                model_path=request.model_path,
                engine_options=dict(place.engine_options),
                download_hub=request.download_hub or hubs.AUTO,
                hub_cache_dir=str(settings.hub_cache_dir or ""),
                lora_modules=[module.to_json_dict() for module in request.lora_modules],
                max_loras=request.max_loras,
                max_lora_rank=request.max_lora_rank,
                default_max_tokens=settings.default_max_tokens,
            )
            env = worker_environment(
                settings,
                info.cpu_environment if plan.device == "cpu" else (),
                hub_credentials=_may_download(plan),
            )
            replica.new_worker = functools.partial(
                WorkerProcess, plan, python, place.visible_devices, tracer=self.tracer, env=env
            )
        model.device = model.replicas[0].device
        model.estimated_bytes = sum(replica.estimated_bytes for replica in model.replicas)

    async def check_adapter(self, module: LoraModule) -> LoraModule:
        """A run-time adapter with its local path checked against the allowed folders."""
        (checked,) = await asyncio.to_thread(checked_adapter_paths, (module,), self.settings, "adapter.path")
        return checked

    async def check_hubs(self, selection: Selection, download_hub: str) -> None:
        """Refuse, before any worker starts, a hub download that cannot happen in the environment
        of the engine whose worker would fetch it."""
        spec = selection.spec
        if not spec.generator:
            reasons = await self.availability.hub_reasons(selection.engine)
            hubs.hub_order([hub.name for hub in spec.hubs], download_hub, reasons)

    async def first_available_engine(self) -> Callable[[tuple[str, ...]], str]:
        reasons = await self.availability.reasons()

        def first(engines: tuple[str, ...]) -> str:
            for engine in engines:
                if reasons.get(engine) is None:
                    return engine
            why = "; ".join(f"{engine}: {reasons.get(engine)}" for engine in engines)
            raise FailedPrecondition(
                f"no engine for this spec can run on this server ({why})", reason=Reason.ENGINE_UNAVAILABLE
            )

        return first

    def loading_reservations(self) -> dict[int | str, int]:
        """What models still LOADING will take, per GPU index (and CPU): not yet allocated, so
        not yet missing from what the devices report free."""
        reserved: dict[int | str, int] = {}
        for other in self.table.list():
            for replica in other.replicas:
                if replica.state is not ModelState.LOADING or other.state is ModelState.TERMINATING:
                    continue
                if replica.gpu_reserved_bytes:
                    for index, taken in replica.gpu_reserved_bytes.items():
                        reserved[index] = reserved.get(index, 0) + taken
                else:
                    reserved[CPU] = reserved.get(CPU, 0) + replica.estimated_bytes
        return reserved

    async def _gpu_inventory(self, engine: str, words: placement.GpuWords) -> list[placement.Gpu]:
        """The GPUs engine's environment sees, free memory read now (none asked for on the CPU)."""
        if words.device == "cpu":
            return []
        return [placement.Gpu.from_report(gpu) for gpu in await self.availability.cuda_devices(engine)]

    def _estimate_need(
        self, selection: Selection, request: LaunchRequest, on_gpus: bool
    ) -> placement.ModelNeed:
        """Weights at the chosen dtype, an overhead factor, and the KV cache of one full context
        when the model's configuration is on disk (local weights, or a generated model)."""
        device = "cuda" if on_gpus else "cpu"
        spec = selection.spec
        local = Path(request.model_path) if request.model_path else None
        if local is None and spec.generator:
            local = Path(self.settings.cache_dir) / spec.generator / spec.model_format
        if local is not None and local.is_dir() and spec.model_file_name_template:
            # A folder of GGUF files: only the quantization's own file is loaded.
            local = local / spec.model_file_name_template.format(quantization=selection.quantization)
        on_disk = resources.weight_bytes_on_disk(local) if local else 0
        dtype = str(request.engine_options.get("dtype", "auto"))
        if dtype == "auto":
            dtype = "float32" if device == "cpu" else "bfloat16"
        weights = on_disk or resources.weight_bytes_from_size(
            spec.size_billions, spec.model_format, selection.quantization, dtype
        )
        need = placement.ModelNeed(weights, overhead=self.settings.memory_overhead)
        # A folder of Hugging Face weights: the caller's own must have a sound config.json (a
        # generated model's has one once it is generated).
        has_config = (
            local is not None
            and local.is_dir()
            and (bool(request.model_path) or (local / CONFIG_FILE).is_file())
        )
        if "kv_cache_memory_bytes" in request.engine_options:  # an engine told its KV cache size
            return dataclasses.replace(need, kv_bytes=int(request.engine_options["kv_cache_memory_bytes"]))
        if not has_config:
            return need
        assert local is not None
        config = read_model_config(local)
        context = int(
            request.engine_options.get("context_length")
            or request.engine_options.get("max_model_len")
            or min(
                config.get("max_position_embeddings", 0) or selection.family.context_length,
                selection.family.context_length,
            )
        )
        return dataclasses.replace(
            need,
            kv_bytes=resources.kv_cache_bytes(config, context, dtype),
            attention_heads=int(config.get("num_attention_heads") or 0),
        )


def _may_download(plan: LoadPlan) -> bool:
    """Whether a worker may fetch weights from a hub (and so needs the hub tokens)."""
    return not plan.model_path and not plan.spec.generator


def checked_adapter_paths(
    modules: tuple[LoraModule, ...], settings: Settings, field_name: str = "lora_modules[{index}].path"
) -> tuple[LoraModule, ...]:
    """The adapters with each local path resolved and confined to allowed_model_dirs, as model_path
    is (a hub id is left to the worker's download)."""
    return tuple(
        dataclasses.replace(
            module,
            path=check_model_path(module.path, settings.allowed_model_dirs, field_name.format(index=index)),
        )
        if is_local(module.path)
        else module
        for index, module in enumerate(modules)
    )


def _label(selection: Selection) -> str:
    spec = selection.spec
    return (
        f"{selection.family.model_name} {spec.size_in_billions}B {spec.model_format} "
        f"{selection.quantization} on {selection.engine}"
    )
