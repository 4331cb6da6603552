"""Domain errors: what went wrong, in terms of the request, never of gRPC.

The contract's error vocabulary, shared by every side: engines, the engine manager and
validation raise these; the server turns each into a gRPC status through the one table in
`llmgrpc.server.status`; callers branch on ``Reason`` (exported by ``llmgrpc.clients``). Messages say what was
wrong and what is valid, because they reach the caller as the status details.

Each error may also carry a stable ``reason`` (one of ``Reason``), set where it is raised,
which callers read from the status's ``google.rpc.ErrorInfo`` instead of parsing the
message; ``retry_after_s`` becomes a ``google.rpc.RetryInfo`` where waiting helps.
"""

from __future__ import annotations

from dataclasses import dataclass, field


class Reason:
    """Stable, machine-readable causes (google.rpc.ErrorInfo.reason, domain ``ERROR_DOMAIN``).

    Callers may branch on these; they never change meaning. An error raised without one
    gets its status code's name as its reason.
    """

    MALFORMED_REQUEST = "MALFORMED_REQUEST"  # the request message could not be parsed
    INVALID_FIELD = "INVALID_FIELD"  # field values out of range (with google.rpc.BadRequest)
    MODEL_FAMILY_NOT_FOUND = "MODEL_FAMILY_NOT_FOUND"
    SPEC_NOT_FOUND = "SPEC_NOT_FOUND"  # no spec of the family has this format or size
    QUANTIZATION_NOT_SUPPORTED = "QUANTIZATION_NOT_SUPPORTED"
    ENGINE_NOT_SUPPORTED = "ENGINE_NOT_SUPPORTED"  # the engine does not serve this spec
    ENGINE_UNAVAILABLE = "ENGINE_UNAVAILABLE"  # the engine cannot run on this server
    UNKNOWN_ENGINE = "UNKNOWN_ENGINE"
    ENGINE_OPTION_INVALID = "ENGINE_OPTION_INVALID"  # unknown key, wrong type, out of range, not a choice
    DEVICE_UNAVAILABLE = "DEVICE_UNAVAILABLE"  # the device asked for is not there
    PROMPT_EMPTY = "PROMPT_EMPTY"
    PROMPT_TOO_LONG = "PROMPT_TOO_LONG"  # prompt plus one token exceeds the context
    TOKEN_OUT_OF_VOCABULARY = "TOKEN_OUT_OF_VOCABULARY"
    MODEL_NOT_FOUND = "MODEL_NOT_FOUND"  # no launched model has this uid
    MODEL_UID_TAKEN = "MODEL_UID_TAKEN"
    MODEL_LOADING = "MODEL_LOADING"  # retry after RetryInfo's delay
    MODEL_FAILED = "MODEL_FAILED"  # its worker died: terminate and launch again
    MODEL_TERMINATED = "MODEL_TERMINATED"  # terminated while loading or serving
    INSUFFICIENT_MEMORY = "INSUFFICIENT_MEMORY"
    QUEUE_FULL = "QUEUE_FULL"  # retry after RetryInfo's delay
    WORKER_UNAVAILABLE = "WORKER_UNAVAILABLE"  # the model's worker process died or did not start
    ENGINE_START_FAILED = "ENGINE_START_FAILED"  # the engine library would not start the model
    MODEL_PATH_NOT_ALLOWED = "MODEL_PATH_NOT_ALLOWED"
    ADAPTER_NOT_FOUND = "ADAPTER_NOT_FOUND"  # the model has no LoRA adapter of that name
    ADAPTER_INCOMPATIBLE = "ADAPTER_INCOMPATIBLE"  # rank, architecture, hidden size or target modules
    ADAPTER_IN_USE = "ADAPTER_IN_USE"  # streams of the adapter are in flight: unload it after them
    TRUST_REMOTE_CODE_DISABLED = "TRUST_REMOTE_CODE_DISABLED"
    HUB_NOT_LISTED = "HUB_NOT_LISTED"  # download_hub names a hub the spec does not list
    HUB_UNAVAILABLE = "HUB_UNAVAILABLE"  # the hub's client library is not installed here
    HUB_UNREACHABLE = "HUB_UNREACHABLE"  # the hub did not answer, or failed (5xx); retry later
    HUB_ACCESS_DENIED = "HUB_ACCESS_DENIED"  # gated or private: set the hub's token variable
    WEIGHTS_NOT_FOUND = "WEIGHTS_NOT_FOUND"  # the hub has no such repository, revision or file
    WEIGHTS_MISSING = "WEIGHTS_MISSING"  # not on disk, and nothing may be fetched (offline, model_path)
    # A model folder's config.json or tokenizer files are missing, not JSON, or impossible (zero heads)
    MODEL_FILES_INVALID = "MODEL_FILES_INVALID"
    INSUFFICIENT_DISK = "INSUFFICIENT_DISK"  # (metadata: needed and free bytes)
    TOKEN_MISSING = "TOKEN_MISSING"
    TOKEN_INVALID = "TOKEN_INVALID"
    ROLE_NOT_ALLOWED = "ROLE_NOT_ALLOWED"
    SHUTTING_DOWN = "SHUTTING_DOWN"  # the server is draining: call another replica
    STREAM_NOT_READ = "STREAM_NOT_READ"  # a response stream's caller read nothing for too long
    INTERNAL = "INTERNAL"  # a bug: see the server log for the request id


ERROR_DOMAIN = "llmgrpc.v1"


class LlmgrpcError(Exception):
    """Base of every error a caller can be told about.

    reason: a ``Reason`` constant; retry_after_s: how long a retry should wait, where
    retrying helps; metadata: facts for ErrorInfo.metadata (e.g. the model uid).
    """

    def __init__(
        self,
        message: str = "",
        *,
        reason: str | None = None,
        retry_after_s: float | None = None,
        metadata: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.reason = reason
        self.retry_after_s = retry_after_s
        self.metadata = dict(metadata or {})


@dataclass
class FieldViolation:
    """One invalid field of a request, and why."""

    field: str
    description: str


class InvalidArgument(LlmgrpcError):
    """The request itself is wrong: fix it and retry."""

    def __init__(self, message: str, violations: list[FieldViolation] | None = None, **why):
        super().__init__(message, **why)
        self.violations = violations or []


class NotFound(LlmgrpcError):
    """A model family, spec or launched model that does not exist."""


class AlreadyExists(LlmgrpcError):
    """A model uid already in use."""


class FailedPrecondition(LlmgrpcError):
    """The request is valid but the system is not in a state to serve it (engine not
    installed, model still loading or failed, weights missing offline)."""


class ResourceExhausted(LlmgrpcError):
    """Not enough memory or disk, or too many requests queued."""


class Unavailable(LlmgrpcError):
    """A dependency is down: a worker process died, a hub cannot be reached."""


class Cancelled(LlmgrpcError):
    """The work was cancelled (by the caller or by terminating its model)."""


class DeadlineExceeded(LlmgrpcError):
    """The caller's deadline passed before the work finished."""


class Unimplemented(LlmgrpcError):
    """The server does not implement what was asked (an RPC of a contract it serves in part)."""


class PermissionDenied(LlmgrpcError):
    """A hub refused access (gated model), or the caller's role may not do this."""


class Unauthenticated(LlmgrpcError):
    """The caller gave no credentials, or ones the server does not know."""


@dataclass
class RemoteError(LlmgrpcError):
    """An error a worker process reported, carried over with its status code name."""

    code_name: str
    message: str
    details: dict = field(default_factory=dict)
    reason: str | None = None
    retry_after_s: float | None = None
    metadata: dict = field(default_factory=dict)
    violations: list[FieldViolation] = field(default_factory=list)  # as the worker's BadRequest said

    def __post_init__(self) -> None:
        super().__init__(
            self.message, reason=self.reason, retry_after_s=self.retry_after_s, metadata=self.metadata
        )

    def __str__(self) -> str:
        return self.message


# Status code names, as gRPC spells them, for every domain error. The server maps these
# names to grpc.StatusCode (llmgrpc.server.status); workers use them to report errors
# over their channel without importing grpc's enums into engine code.
CODE_NAMES: dict[type[LlmgrpcError], str] = {
    InvalidArgument: "INVALID_ARGUMENT",
    NotFound: "NOT_FOUND",
    AlreadyExists: "ALREADY_EXISTS",
    FailedPrecondition: "FAILED_PRECONDITION",
    ResourceExhausted: "RESOURCE_EXHAUSTED",
    Unavailable: "UNAVAILABLE",
    Cancelled: "CANCELLED",
    DeadlineExceeded: "DEADLINE_EXCEEDED",
    PermissionDenied: "PERMISSION_DENIED",
    Unauthenticated: "UNAUTHENTICATED",
    Unimplemented: "UNIMPLEMENTED",
}


def code_name(error: BaseException) -> str:
    """The gRPC status code name for an error; INTERNAL only for what is not a domain error."""
    if isinstance(error, RemoteError):
        return error.code_name
    for error_type in type(error).__mro__:
        if error_type in CODE_NAMES:
            return CODE_NAMES[error_type]
    if isinstance(error, MemoryError):
        return "RESOURCE_EXHAUSTED"
    return "INTERNAL"


def reason_of(error: BaseException) -> str:
    """The stable reason of an error: the one it was raised with, else its code's name."""
    return getattr(error, "reason", None) or code_name(error)
