"""The model-management requests in domain terms, converted from their protos at the boundary."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from google.protobuf.json_format import MessageToDict

from llmgrpc.engines.lora import DEFAULT_MAX_LORA_RANK, DEFAULT_MAX_LORAS, LoraModule
from llmgrpc.server.registry import SpecQuery
from llmgrpc.v1 import models_pb2


@dataclass(frozen=True)
class LaunchRequest:
    """A LaunchModel request in domain terms."""

    query: SpecQuery
    model_uid: str = ""
    model_path: str = ""
    device: str = ""
    engine_options: dict[str, Any] = field(default_factory=dict)
    download_hub: str = ""
    wait: bool = True  # return once READY; False: at once, LOADING
    idle_unload_s: float | None = None  # None: the server's setting; 0: never
    n_gpu: str = ""  # "": one GPU on a GPU device; "auto": the fewest that fit; or a count
    gpu_idx: tuple[int, ...] = ()  # every replica's GPUs, replica after replica
    replica: int = 1  # worker processes serving this uid
    engine_api_port: int | None = None  # a listener of the vLLM engine contract for this model alone
    lora_modules: tuple[LoraModule, ...] = ()
    max_loras: int = DEFAULT_MAX_LORAS
    max_lora_rank: int = DEFAULT_MAX_LORA_RANK

    @classmethod
    def from_pb(cls, pb: models_pb2.LaunchModelRequest) -> LaunchRequest:
        return cls(
            query=SpecQuery.from_pb(pb),
            model_uid=pb.model_uid,
            model_path=pb.model_path,
            device=pb.device,
            engine_options=MessageToDict(pb.engine_options) if pb.HasField("engine_options") else {},
            download_hub=pb.download_hub,
            wait=pb.wait if pb.HasField("wait") else True,
            idle_unload_s=pb.idle_unload_s if pb.HasField("idle_unload_s") else None,
            n_gpu=pb.n_gpu,
            gpu_idx=tuple(pb.gpu_idx),
            replica=pb.replica if pb.HasField("replica") else 1,
            lora_modules=tuple(LoraModule.from_pb(module) for module in pb.lora_modules),
            max_loras=pb.max_loras if pb.HasField("max_loras") else DEFAULT_MAX_LORAS,
            max_lora_rank=pb.max_lora_rank if pb.HasField("max_lora_rank") else DEFAULT_MAX_LORA_RANK,
        )


@dataclass(frozen=True)
class DownloadRequest:
    """A DownloadModel request in domain terms."""

    query: SpecQuery
    download_hub: str = ""

    @classmethod
    def from_pb(cls, pb: models_pb2.DownloadModelRequest) -> DownloadRequest:
        return cls(query=SpecQuery.from_pb(pb), download_hub=pb.download_hub)
