"""The server's settings: one typed object from LLMGRPC_* environment variables and flags.

Each field is one setting; ``llmgrpc serve --help`` lists them all as flags, built from
these definitions (see ``cli.py``). The object is passed down to whatever needs it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

MIB = 1024 * 1024

# The kinds of setting that recur, with their valid values.
Port = Annotated[int, Field(ge=0, le=65535)]  # 0: any free port
Seconds = Annotated[float, Field(ge=0)]
PositiveSeconds = Annotated[float, Field(gt=0)]


def _default_cache_dir() -> Path:
    return Path.home() / ".cache" / "llmgrpc"


class Settings(BaseSettings):
    """Settings of one llmgrpc server."""

    model_config = SettingsConfigDict(env_prefix="LLMGRPC_", extra="forbid")

    host: str = Field("127.0.0.1", description="address to listen on (0.0.0.0 for every interface)")
    port: Port = Field(50051, description="port to listen on (0: any free port)")
    launch: list[str] = Field(
        default_factory=list,
        description="model names to launch at start, e.g. tiny-llama-3.1 (repeat the flag for more)",
    )
    models_file: Path | None = Field(
        None,
        description="YAML or JSON file of models to launch at start, in LaunchModelRequest's words "
        "(models: [{model_name: ..., model_uid: ..., ...}]); readiness waits for all of them",
    )
    cache_dir: Path = Field(default_factory=_default_cache_dir, description="where generated models are kept")
    hub_cache_dir: Path | None = Field(
        None,
        description="one folder for hub downloads (huggingface/ and modelscope/ inside); unset: the hub "
        "libraries' own caches (HF_HOME, MODELSCOPE_CACHE), where weights already downloaded are found",
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
    priority_ageing_per_s: float = Field(
        1.0,
        ge=0,
        description="a queued Generate request's priority value falls by this much for each second it "
        "waits, so a stream of more urgent requests delays it only so long (0: strict priority)",
    )
    max_stream_pending: int = Field(
        64,
        ge=1,
        description="requests one ModelStreamInfer call may have in progress, and answers it may have "
        "waiting to be sent; beyond, its next requests are not read until the caller reads (backpressure)",
    )
    stream_unread_timeout_s: PositiveSeconds = Field(
        30.0,
        description="a response stream whose caller has read nothing for this long while its responses "
        "wait to be sent ends with RESOURCE_EXHAUSTED (STREAM_NOT_READ), freeing its decode slot",
    )
    memory_overhead: float = Field(
        1.2, ge=1.0, description="factor on a model's weight bytes for its KV cache and activations"
    )
    engine_plugins: list[str] = Field(
        default_factory=list,
        description="engines defined outside llmgrpc: module:attribute naming an EngineInfo (repeat the "
        "flag); the module must import in the server's and the engine's environments",
    )
    worker_python: dict[str, str] = Field(
        default_factory=dict,
        description='Python interpreter of each engine\'s workers, as JSON: {"vLLM": "/opt/vllm/bin/python"} '
        "(default: this server's own)",
    )
    worker_environment_names: list[str] = Field(
        default_factory=list,
        description="more environment variables workers may see (repeat the flag); workers get only "
        "what the interpreter, engine libraries and hub clients read, never the server's tokens",
    )
    worker_start_timeout_s: PositiveSeconds = Field(
        60.0, description="seconds a worker may take to start listening"
    )
    engine_api_ports: dict[str, int] = Field(
        default_factory=dict,
        description="vLLM engine contract (for model gateways such as smg) on a port of its own per model, "
        'as JSON: {"MODEL_UID": 50061}; the main port serves it for the one model without a port here',
    )
    idle_unload_s: Seconds | None = Field(
        None,
        description="unload a model after this many seconds without requests (its next Generate loads it "
        "again); a launch's idle_unload_s overrides it; unset or 0: never",
    )
    worker_ping_interval_s: PositiveSeconds = Field(
        2.0, description="seconds between pings of a READY model's worker"
    )
    worker_ping_timeout_s: PositiveSeconds = Field(
        5.0,
        description="a worker that does not answer a ping this long makes its model NOT_SERVING "
        "until it answers again",
    )
    replica_restart_backoff_s: PositiveSeconds = Field(
        1.0,
        description="seconds before restarting a replica whose worker died while its model has "
        "others (doubled on each failure in a row)",
    )
    replica_restart_backoff_max_s: PositiveSeconds = Field(
        30.0, description="the longest wait before restarting a replica whose worker died"
    )
    shutdown_grace_s: Seconds = Field(30.0, description="seconds streams in flight get to finish on shutdown")
    log_level: str = Field("INFO", description="logging level: DEBUG, INFO, WARNING or ERROR")
    log_format: Literal["json", "text"] = Field(
        "json", description="json (one object a line, with request_id and trace_id) or text"
    )

    # Security.
    tls_cert_file: Path | None = Field(
        None, description="PEM certificate chain of the server: serve TLS (with tls_key_file)"
    )
    tls_key_file: Path | None = Field(None, description="PEM private key of tls_cert_file")
    tls_client_ca_file: Path | None = Field(
        None, description="PEM CA bundle: require client certificates signed by it (mutual TLS)"
    )
    auth_tokens: dict[str, Literal["admin", "inference"]] = Field(
        default_factory=dict,
        repr=False,
        description='bearer tokens and their roles, as JSON: {"TOKEN": "admin"} (prefer auth_tokens_file); '
        "with none set, authentication is off",
    )
    auth_tokens_file: Path | None = Field(
        None, description="file of lines 'ROLE TOKEN' (admin or inference), e.g. a mounted Secret"
    )
    allowed_model_dirs: list[Path] = Field(
        default_factory=list,
        description="folders LaunchModel's model_path may point into (repeat the flag); "
        "none: model_path is off",
    )
    allow_trust_remote_code: bool = Field(
        False, description="let launches set engine_options.trust_remote_code (runs a repository's code)"
    )

    # Operation.
    health_port: Port | None = Field(
        None,
        description="also serve grpc.health.v1 alone, in plaintext, on this port (for probes when TLS is on)",
    )
    metrics_port: Port | None = Field(
        None, description="serve Prometheus /metrics over HTTP on this port (unset: off)"
    )
    trace_exporter: Literal["none", "console", "otlp"] = Field(
        "none", description="where spans go: none, console, or otlp (OTEL_EXPORTER_OTLP_* variables)"
    )
    keepalive_time_s: PositiveSeconds = Field(
        60.0, description="ping a client after this long without activity, to find dead connections"
    )
    keepalive_timeout_s: PositiveSeconds = Field(
        20.0, description="close a connection whose ping goes unanswered"
    )
    min_client_ping_interval_s: Seconds = Field(
        10.0, description="clients that ping more often than this are told too_many_pings"
    )
    max_connection_age_s: PositiveSeconds | None = Field(
        None,
        description="ask clients to reconnect after this long (spreads load across replicas); unset: never",
    )
    max_connection_age_grace_s: Seconds = Field(
        600.0, description="time a connection past its age gets for streams in flight"
    )
    max_receive_message_bytes: int = Field(4 * MIB, ge=1024, description="largest request message accepted")
    max_send_message_bytes: int = Field(16 * MIB, ge=1024, description="largest response message sent")

    @model_validator(mode="after")
    def _tls_files_go_together(self) -> Settings:
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("tls_cert_file and tls_key_file are set together")
        if self.tls_client_ca_file is not None and self.tls_cert_file is None:
            raise ValueError("tls_client_ca_file (mutual TLS) needs tls_cert_file and tls_key_file")
        return self

    def grpc_options(self) -> list[tuple[str, int]]:
        """gRPC server options from these settings."""
        options = [
            ("grpc.keepalive_time_ms", int(self.keepalive_time_s * 1000)),
            ("grpc.keepalive_timeout_ms", int(self.keepalive_timeout_s * 1000)),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.min_ping_interval_without_data_ms", int(self.min_client_ping_interval_s * 1000)),
            ("grpc.http2.max_pings_without_data", 0),
            ("grpc.max_receive_message_length", self.max_receive_message_bytes),
            ("grpc.max_send_message_length", self.max_send_message_bytes),
        ]
        if self.max_connection_age_s is not None:
            options += [
                ("grpc.max_connection_age_ms", int(self.max_connection_age_s * 1000)),
                ("grpc.max_connection_age_grace_ms", int(self.max_connection_age_grace_s * 1000)),
            ]
        return options

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"
