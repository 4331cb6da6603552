"""Where a launch runs (which GPUs, or the CPU): decided once, before any worker starts or any
byte is fetched.

The inputs are the GPUs the engine's environment sees (total and free memory, read now), the
launch's words (``device``, ``n_gpu``, ``gpu_idx``, the engine's parallel size option), what the
model needs (weights and KV cache) and what models still LOADING will take: their workers have
not allocated it yet, so free memory does not show it. A GPU's share of a launch is what the
engine really takes there: vLLM and SGLang reserve a fraction of each GPU's *total* memory
(``gpu_memory_utilization``, ``mem_fraction_static``) whatever the model, and the model's weights
and one full context of KV cache must fit inside it; other engines take the model's bytes
spread evenly over their GPUs.

Everything here is a pure function of those inputs, so it is tested with a stand-in inventory.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from llmgrpc.clients.errors import (
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    Reason,
    ResourceExhausted,
)
from llmgrpc.engines.catalogue import EngineInfo
from llmgrpc.server.resources import check_fits

GIB = 1024**3
AUTO = "auto"
COUNT = re.compile(r"^[0-9]+$")
MAX_REPLICAS = 64  # worker processes one launch may ask for


@dataclass(frozen=True)
class Gpu:
    """One CUDA device as the engine's environment reports it (llmgrpc.engines.probe)."""

    index: int
    name: str
    total_bytes: int
    free_bytes: int

    @classmethod
    def from_report(cls, report: Mapping[str, Any]) -> Gpu:
        return cls(
            index=int(report["index"]),
            name=str(report.get("name", "")),
            total_bytes=int(report["total_bytes"]),
            free_bytes=int(report["free_bytes"]),
        )


@dataclass(frozen=True)
class GpuWords:
    """A launch's words about GPUs, as ``xinference launch`` names them."""

    device: str = AUTO  # auto, cpu, cuda or cuda:N
    n_gpu: str = ""  # "": one GPU; "auto": the fewest that fit; or a count
    gpu_idx: tuple[int, ...] = ()

    @property
    def indices(self) -> tuple[int, ...]:
        """The GPUs asked for by index: gpu_idx, or the N of device cuda:N."""
        if self.gpu_idx:
            return self.gpu_idx
        if self.device.startswith("cuda:"):
            return (int(self.device.partition(":")[2]),)
        return ()

    @property
    def count(self) -> int | None:
        """The number of GPUs asked for; None: auto, or not said."""
        if COUNT.match(self.n_gpu):
            return int(self.n_gpu)
        return len(self.indices) or None

    @property
    def asks_for_gpus(self) -> bool:
        return bool(self.n_gpu or self.gpu_idx) or self.device.startswith("cuda")

    def for_replica(self, index: int, replicas: int) -> GpuWords:
        """One replica's words: gpu_idx lists every replica's GPUs, replica after replica, in
        equal shares (the rest apply to each replica as they are)."""
        if not self.gpu_idx or replicas == 1:
            return self
        share = len(self.gpu_idx) // replicas
        return dataclasses.replace(self, gpu_idx=self.gpu_idx[index * share : (index + 1) * share])


@dataclass(frozen=True)
class ModelNeed:
    """What a model takes, wherever it runs."""

    weight_bytes: int
    kv_bytes: int = 0  # one full context, or the KV cache size the caller gave the engine
    overhead: float = 1.0  # factor on the weights for activations, for engines without a reservation
    attention_heads: int = 0  # 0: the model's configuration is not known yet

    @property
    def total_bytes(self) -> int:
        return int(self.weight_bytes * self.overhead) + self.kv_bytes


@dataclass(frozen=True)
class Placement:
    """The GPUs a launch gets (none: the CPU), what it takes on each, and the engine options
    that spread the model over them."""

    gpus: tuple[int, ...] = ()
    reserved_bytes: Mapping[int, int] = field(default_factory=dict)
    engine_options: Mapping[str, Any] = field(default_factory=dict)

    @property
    def device(self) -> str:
        """The device GetModel reports: cpu, cuda:0 or cuda:0,1 (the machine's indices)."""
        return f"cuda:{','.join(map(str, self.gpus))}" if self.gpus else "cpu"

    @property
    def visible_devices(self) -> str | None:
        """CUDA_VISIBLE_DEVICES for the worker: exactly its GPUs (None: the CPU)."""
        return ",".join(map(str, self.gpus)) if self.gpus else None


def word_violations(device: str, n_gpu: str, gpu_idx: Sequence[int]) -> list[FieldViolation]:
    """What is wrong with a launch's GPU words on their own (no inventory needed)."""
    violations: list[FieldViolation] = []
    if n_gpu and n_gpu != AUTO and not (COUNT.match(n_gpu) and int(n_gpu) >= 1):
        violations.append(FieldViolation("n_gpu", f"{n_gpu!r} is not valid: auto, or a count of at least 1"))
    negative = sorted({index for index in gpu_idx if index < 0})
    if negative:
        violations.append(FieldViolation("gpu_idx", f"GPU indices are 0 or more, not {negative}"))
    duplicates = sorted({index for index in gpu_idx if list(gpu_idx).count(index) > 1})
    if duplicates:
        violations.append(FieldViolation("gpu_idx", f"each GPU may be named once; repeated: {duplicates}"))
    if device == "cpu":
        for name, value in (("n_gpu", n_gpu), ("gpu_idx", list(gpu_idx))):
            if value:
                violations.append(FieldViolation(name, "GPUs cannot be asked for with device cpu"))
    elif device.startswith("cuda:") and (gpu_idx or (COUNT.match(n_gpu) and int(n_gpu) > 1)):
        violations.append(
            FieldViolation(
                "device", f"device {device} names one GPU: give gpu_idx (and n_gpu) instead to use several"
            )
        )
    if COUNT.match(n_gpu) and gpu_idx and int(n_gpu) != len(gpu_idx):
        violations.append(
            FieldViolation("n_gpu", f"n_gpu {n_gpu} contradicts gpu_idx, which names {len(gpu_idx)} GPU(s)")
        )
    return violations


def uses_gpus(words: GpuWords, inventory: Sequence[Gpu], engine: str) -> bool:
    """Whether the launch runs on GPUs: device auto runs on one when there is one; words that
    ask for GPUs on a machine without any are refused."""
    if words.device == "cpu":
        return False
    if not inventory and words.asks_for_gpus:
        raise FailedPrecondition(
            f"GPUs were asked for but the {engine} environment sees no CUDA GPU",
            reason=Reason.DEVICE_UNAVAILABLE,
        )
    return bool(inventory)


@dataclass(frozen=True)
class GpuAsk:
    """What one launch asks of the GPUs: its engine, GPU words and engine options, what one replica
    needs, and what the launch is called in messages."""

    info: EngineInfo
    words: GpuWords
    engine_options: Mapping[str, Any]
    need: ModelNeed
    what: str


def place(ask: GpuAsk, inventory: Sequence[Gpu], loading: Mapping[int, int]) -> Placement:
    """The GPUs a launch gets, from the inventory less loading (bytes per GPU index that
    models still LOADING will take). With n_gpu auto, the fewest GPUs it fits on, those with the
    most memory available; refused before anything starts when it fits nowhere."""
    info, words, engine_options, need = ask.info, ask.words, ask.engine_options, ask.need
    if words.device == "cpu" and words.asks_for_gpus:  # the server's default device is cpu
        raise InvalidArgument(
            "n_gpu and gpu_idx need a GPU device, and the launch runs on the CPU",
            [FieldViolation("device", "set auto or cuda to use n_gpu or gpu_idx")],
            reason=Reason.INVALID_FIELD,
        )
    by_index = {gpu.index: gpu for gpu in inventory}
    _check_indices_exist(words, by_index, info.name)
    counts = _counts_to_try(info, words, engine_options, need, len(inventory))
    available = {gpu.index: max(gpu.free_bytes - loading.get(gpu.index, 0), 0) for gpu in inventory}
    shortfall: list[_GpuShare] = []
    for count in counts:
        if words.indices:
            chosen = [by_index[index] for index in words.indices]
        else:  # the most memory available first, lower indices first among equals
            chosen = sorted(inventory, key=lambda gpu: (-available[gpu.index], gpu.index))[:count]
        shares = [_share(info, engine_options, need, gpu, count, available[gpu.index]) for gpu in chosen]
        if all(share.fits for share in shares):
            return Placement(
                gpus=tuple(gpu.index for gpu in chosen),
                reserved_bytes={share.gpu.index: share.reserved for share in shares},
                engine_options=_spread_options(info, engine_options, count),
            )
        shortfall = shares
    raise _does_not_fit(ask.what, info, shortfall)


def place_replicas(
    ask: GpuAsk, inventory: Sequence[Gpu], loading: Mapping[int, int], replicas: int
) -> list[Placement]:
    """Each replica's placement, one after another, each counting what the earlier ones take (so
    with n_gpu auto they spread over the GPUs with the most memory available); the whole launch
    is refused, with the per-GPU numbers, when any replica does not fit."""
    taken = dict(loading)
    placed: list[Placement] = []
    for index in range(replicas):
        try:
            words_here = ask.words.for_replica(index, replicas)
            one = place(dataclasses.replace(ask, words=words_here), inventory, taken)
        except ResourceExhausted as error:
            if replicas == 1:
                raise
            raise ResourceExhausted(
                f"replica {index + 1} of {replicas}, counting what the {index} before it take: {error}",
                reason=error.reason,
                metadata={**error.metadata, "replica": str(index)},
            ) from None
        for gpu, reserved in one.reserved_bytes.items():
            taken[gpu] = taken.get(gpu, 0) + reserved
        placed.append(one)
    return placed


def place_on_cpu(
    engine_options: Mapping[str, Any], need: ModelNeed, free: int, loading: int, what: str, replicas: int
) -> list[Placement]:
    """Every replica on the CPU: refused when they do not fit together in the memory free now
    (free) less what launches still loading will take (loading)."""
    label = f"{replicas} replicas of {what}" if replicas > 1 else what
    check_fits(need.total_bytes * replicas, max(free - loading, 0), label, "cpu")
    return [Placement(engine_options=engine_options)] * replicas


def replica_violations(replica: int, gpu_idx: Sequence[int]) -> list[FieldViolation]:
    """What is wrong with a launch's replica count, alone and with its gpu_idx."""
    if not 1 <= replica <= MAX_REPLICAS:
        return [FieldViolation("replica", f"{replica} is not valid: 1 to {MAX_REPLICAS} (unset: 1)")]
    if gpu_idx and len(gpu_idx) % replica:
        return [
            FieldViolation(
                "gpu_idx",
                f"lists every replica's GPUs in equal shares: {len(gpu_idx)} GPU(s) cannot be shared by "
                f"{replica} replicas",
            )
        ]
    return []


@dataclass(frozen=True)
class _GpuShare:
    gpu: Gpu
    model_bytes: int  # the model's part on this GPU
    reserved: int  # what the engine takes on this GPU
    available: int
    fraction: float = 0.0  # the engine's reservation, as a fraction of the total; 0: none

    @property
    def fits(self) -> bool:
        return self.reserved <= self.available and self.model_bytes <= self.reserved

    def describe(self, info: EngineInfo) -> str:
        gpu = f"GPU {self.gpu.index} ({self.gpu.name})" if self.gpu.name else f"GPU {self.gpu.index}"
        free = f"{self.available / GIB:.1f} GiB available"
        if not self.fraction:
            return f"{gpu}: needs {self.model_bytes / GIB:.1f} GiB, {free}"
        return (
            f"{gpu}: {info.name} reserves {self.reserved / GIB:.1f} GiB ({info.memory_fraction_option} "
            f"{self.fraction:g} of {self.gpu.total_bytes / GIB:.1f} GiB) and the model's share is "
            f"{self.model_bytes / GIB:.1f} GiB, {free}"
        )


def _share(
    info: EngineInfo, options: Mapping[str, Any], need: ModelNeed, gpu: Gpu, count: int, available: int
) -> _GpuShare:
    if info.memory_fraction_option:
        fraction = float(options.get(info.memory_fraction_option, info.memory_fraction_default))
        # Weights and one full context of KV cache must fit in the reservation (the engine
        # refuses to start otherwise); activations live outside it.
        model_bytes = math.ceil((need.weight_bytes + need.kv_bytes) / count)
        return _GpuShare(gpu, model_bytes, int(fraction * gpu.total_bytes), available, fraction)
    model_bytes = math.ceil(need.total_bytes / count)
    return _GpuShare(gpu, model_bytes, model_bytes, available)


def _check_indices_exist(words: GpuWords, by_index: Mapping[int, Gpu], engine: str) -> None:
    missing = [index for index in words.indices if index not in by_index]
    if missing:
        asked = f"device {words.device}" if words.device.startswith("cuda:") else f"gpu_idx {missing}"
        raise FailedPrecondition(
            f"{asked} was asked for but the {engine} environment sees {_inventory_words(by_index)}",
            reason=Reason.DEVICE_UNAVAILABLE,
        )


def _counts_to_try(
    info: EngineInfo, words: GpuWords, options: Mapping[str, Any], need: ModelNeed, gpus_here: int
) -> list[int]:
    """The GPU counts to try, fewest first: one when the words or the parallel sizes say it, else
    (auto) every count whose tensor parallel size divides the model's attention heads."""
    tensor, stages = _parallel_sizes(info, options)
    count = words.count
    if count is not None:
        _check_sizes_against(info, tensor, stages, count)
    elif tensor is not None or (stages is not None and words.n_gpu != AUTO):
        count = (tensor or 1) * (stages or 1)  # with n_gpu auto, a pipeline size alone tries each count
    if count is None and words.n_gpu != AUTO:
        count = 1  # no words: one GPU, as before GPUs could be counted
    # On a Ray cluster the count may exceed this host's GPUs: only this host's share is checked
    # here (the model's bytes over count GPUs, on as many of them as it has); other nodes' memory
    # is Ray's.
    if count is not None and count > gpus_here and not info.runs_across_hosts(options):
        raise FailedPrecondition(
            f"{count} GPUs were asked for but the {info.name} environment sees {gpus_here}",
            reason=Reason.DEVICE_UNAVAILABLE,
        )
    heads = need.attention_heads if info.parallel_size_option else 0  # tensor parallelism splits the heads
    per_stage = stages or 1
    if count is not None:
        shards = tensor if tensor is not None else count // per_stage
        if heads and heads % shards:
            name = f"engine_options.{info.parallel_size_option}" if tensor is not None else "n_gpu"
            raise InvalidArgument(
                f"{info.name} shards the model's {heads} attention heads over its GPUs: {shards} does not "
                f"divide them",
                [FieldViolation(name, f"must divide the model's {heads} attention heads")],
                reason=Reason.INVALID_FIELD,
            )
        return [count]
    counts = range(per_stage, gpus_here + 1, per_stage)
    return [n for n in counts if not heads or heads % (n // per_stage) == 0]


def _parallel_sizes(info: EngineInfo, options: Mapping[str, Any]) -> tuple[int | None, int | None]:
    """The tensor and pipeline parallel sizes the caller set (None: not set)."""
    sizes = []
    for option in (info.parallel_size_option, info.pipeline_size_option):
        sizes.append(int(options[option]) if option and option in options else None)
    return sizes[0], sizes[1]


def _check_sizes_against(info: EngineInfo, tensor: int | None, stages: int | None, count: int) -> None:
    """The GPUs a launch takes are its tensor parallel size times its pipeline parallel size:
    sizes the caller set must agree with the count asked for (one set alone must divide it)."""
    tp, pp = info.parallel_size_option, info.pipeline_size_option
    if tensor is not None and stages is not None and tensor * stages != count:
        wanted = f"times {{}} must be {count}, the GPUs asked for"
        raise InvalidArgument(
            f"engine_options.{tp} {tensor} times engine_options.{pp} {stages} contradicts the {count} "
            "GPU(s) asked for",
            [
                FieldViolation(f"engine_options.{tp}", wanted.format(pp)),
                FieldViolation(f"engine_options.{pp}", wanted.format(tp)),
            ],
            reason=Reason.INVALID_FIELD,
        )
    for option, size in ((tp, tensor), (pp, stages)):
        if size is None or not (count % size if pp else count != size):
            continue
        valid = f"must divide {count}, the GPUs asked for" if pp else f"must be {count}, the GPUs asked for"
        raise InvalidArgument(
            f"engine_options.{option} {size} contradicts the {count} GPU(s) asked for",
            [FieldViolation(f"engine_options.{option}", f"{valid}, or unset")],
            reason=Reason.INVALID_FIELD,
        )


def _spread_options(info: EngineInfo, options: Mapping[str, Any], count: int) -> dict[str, Any]:
    """The engine options with the parallel sizes that spread the model over count GPUs (the one
    the caller did not set follows from the other), and the memory fraction that was counted (so
    the engine reserves exactly that)."""
    spread = dict(options)
    tensor, stages = _parallel_sizes(info, options)
    if info.pipeline_size_option and stages is None and tensor is not None and tensor < count:
        stages = spread[info.pipeline_size_option] = count // tensor
    if info.parallel_size_option and (count > 1 or tensor is not None):
        spread[info.parallel_size_option] = count // (stages or 1)
    if info.memory_fraction_option and info.memory_fraction_option not in options:
        spread[info.memory_fraction_option] = info.memory_fraction_default
    return spread


def _inventory_words(by_index: Mapping[int, Gpu]) -> str:
    if not by_index:
        return "no CUDA GPU"
    listed = ", ".join(
        f"{gpu.index} ({gpu.name})" if gpu.name else str(gpu.index) for gpu in by_index.values()
    )
    return f"{len(by_index)} CUDA GPU(s): {listed}"


def _does_not_fit(what: str, info: EngineInfo, shares: Sequence[_GpuShare]) -> ResourceExhausted:
    lines = "; ".join(share.describe(info) for share in shares)
    metadata = {"device": "cuda:" + ",".join(str(share.gpu.index) for share in shares)}
    for share in shares:
        metadata[f"gpu_{share.gpu.index}_needed_bytes"] = str(max(share.model_bytes, share.reserved))
        metadata[f"gpu_{share.gpu.index}_free_bytes"] = str(share.available)
    return ResourceExhausted(
        f"{what} does not fit on {len(shares)} GPU(s): {lines}; use more GPUs (n_gpu), a smaller size "
        "or a quantized format, or free memory",
        reason=Reason.INSUFFICIENT_MEMORY,
        metadata=metadata,
    )
