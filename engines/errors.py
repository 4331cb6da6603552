"""Domain errors: what went wrong, in terms of the request, never of gRPC.

Engines, the engine manager and validation raise these; the server turns each into a
gRPC status through the one table in `llmgrpc.server.status`. Messages say what was
wrong and what is valid, because they reach the caller as the status details.
"""

from __future__ import annotations

from dataclasses import dataclass, field


class LlmgrpcError(Exception):
    """Base of every error a caller can be told about."""


@dataclass
class FieldViolation:
    """One invalid field of a request, and why."""

    field: str
    description: str


class InvalidArgument(LlmgrpcError):
    """The request itself is wrong: fix it and retry."""

    def __init__(self, message: str, violations: list[FieldViolation] | None = None):
        super().__init__(message)
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


class PermissionDenied(LlmgrpcError):
    """A hub refused access (gated model), or the caller's role may not do this."""


@dataclass
class RemoteError(LlmgrpcError):
    """An error a worker process reported, carried over with its status code name."""

    code_name: str
    message: str
    details: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        super().__init__(self.message)

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
