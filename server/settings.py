"""The server's settings: one typed object from LLMGRPC_* environment variables and flags.

Each field is one setting; ``llmgrpc serve --help`` lists them all as flags, built from
these definitions (see ``cli.py``). The object is passed down to whatever needs it.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


def _default_cache_dir() -> Path:
    return Path.home() / ".cache" / "llmgrpc"


class Settings(BaseSettings):
    """Settings of one llmgrpc server."""

    model_config = SettingsConfigDict(env_prefix="LLMGRPC_", extra="forbid")

    host: str = Field("127.0.0.1", description="address to listen on (0.0.0.0 for every interface)")
    port: int = Field(50051, ge=0, le=65535, description="port to listen on (0: any free port)")
    launch: list[str] = Field(
        default_factory=list,
        description="model names to launch at start, e.g. tiny-llama-3.1 (repeat the flag for more)",
    )
    cache_dir: Path = Field(
        default_factory=_default_cache_dir, description="where generated models and downloads are kept"
    )
    families_dir: Path | None = Field(None, description="extra folder of model family JSON files")
    device: str = Field("auto", description="default device for launches: auto, cpu, cuda or cuda:N")
    default_max_tokens: int = Field(256, ge=1, description="max_tokens of a Generate request that sets none")
    max_running_requests: int = Field(
        16, ge=1, description="Generate requests a model decodes at once (its batch size)"
    )
    max_waiting_requests: int = Field(
        64, ge=0, description="Generate requests a model queues beyond those; more get RESOURCE_EXHAUSTED"
    )
    memory_overhead: float = Field(
        1.2, ge=1.0, description="factor on a model's weight bytes for its KV cache and activations"
    )
    worker_python: dict[str, str] = Field(
        default_factory=dict,
        description='Python interpreter of each engine\'s workers, as JSON: {"vLLM": "/opt/vllm/bin/python"} '
        "(default: this server's own)",
    )
    worker_start_timeout_s: float = Field(
        60.0, gt=0, description="seconds a worker may take to start listening"
    )
    shutdown_grace_s: float = Field(
        30.0, ge=0, description="seconds streams in flight get to finish on shutdown"
    )
    log_level: str = Field("INFO", description="logging level: DEBUG, INFO, WARNING or ERROR")

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"
