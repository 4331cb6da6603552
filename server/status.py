"""Domain errors to gRPC statuses, in one place.

``llmgrpc.clients.errors.CODE_NAMES`` is the table; ``grpc_errors`` applies it around
every RPC, so servicers raise domain errors and never pick a status themselves. Only a
real bug becomes INTERNAL, and it is logged with its traceback.

Every status carries ``google.rpc.Status`` details: an ``ErrorInfo`` (the error's stable
reason, domain ``llmgrpc.v1``), a ``BadRequest`` for invalid fields, and a ``RetryInfo``
where waiting helps (queue full, model loading). Messages and details are clipped: they
may quote what the caller sent, and trailers have a size limit.
"""

from __future__ import annotations

import functools
import inspect
import logging

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from llmgrpc.clients.errors import (
    ERROR_DOMAIN,
    FieldViolation,
    LlmgrpcError,
    RemoteError,
    code_name,
    reason_of,
)
from llmgrpc.server import logs

log = logging.getLogger(__name__)


def status_code(error: BaseException) -> grpc.StatusCode:
    return grpc.StatusCode[code_name(error)]


# Trailers above about 8 KiB are refused by gRPC clients: keep every part well below.
MESSAGE_LIMIT = 1536  # bytes once percent-encoded as grpc-message
DESCRIPTION_LIMIT = 200  # bytes of one BadRequest field violation
METADATA_VALUE_LIMIT = 128  # bytes of one ErrorInfo metadata value
MAX_VIOLATIONS = 32


def clip(text: str, limit: int, *, percent_encoded: bool = False) -> str:
    """text cut to at most limit bytes (counting grpc-message's percent-encoding if asked)."""
    data = text.encode("utf-8", "replace")
    cost = 0
    for end, byte in enumerate(data):
        cost += 1 if not percent_encoded or (0x20 <= byte <= 0x7E and byte != 0x25) else 3
        if cost > limit - 3:  # room for the ellipsis
            return data[:end].decode("utf-8", "ignore") + "..."
    return text


def _pack(message) -> any_pb2.Any:
    detail = any_pb2.Any()
    detail.Pack(message)
    return detail


def to_rpc_status(error: BaseException) -> grpc.Status:
    """The status a caller gets for error, with machine-readable details."""
    return rpc_status.to_status(to_status_proto(error))


def status_of(error: BaseException, where: str) -> status_pb2.Status:
    """The status a caller gets for error that escaped where (an RPC, a stream). One that is not
    a domain error is a bug: logged here with its traceback, and the caller gets INTERNAL."""
    if not isinstance(error, LlmgrpcError):
        log.error("unexpected error in %s", where, exc_info=error)
    return to_status_proto(error)


def to_status_proto(error: BaseException) -> status_pb2.Status:
    """error as a google.rpc.Status: its code, clipped message and details."""
    code = status_code(error)
    message = str(error) if isinstance(error, LlmgrpcError) else "internal error; see the server log"
    message = clip(message, MESSAGE_LIMIT, percent_encoded=True)
    metadata = getattr(error, "metadata", None) or {}
    details = [
        _pack(
            error_details_pb2.ErrorInfo(
                reason=reason_of(error),
                domain=ERROR_DOMAIN,
                metadata={str(k): clip(str(v), METADATA_VALUE_LIMIT) for k, v in metadata.items()},
            )
        )
    ]
    violations = getattr(error, "violations", None)  # InvalidArgument's, or a worker's relayed
    if violations:
        details.append(
            _pack(
                error_details_pb2.BadRequest(
                    field_violations=[
                        error_details_pb2.BadRequest.FieldViolation(
                            field=clip(v.field, DESCRIPTION_LIMIT),
                            description=clip(v.description, DESCRIPTION_LIMIT),
                        )
                        for v in violations[:MAX_VIOLATIONS]
                    ]
                )
            )
        )
    retry_after_s = getattr(error, "retry_after_s", None)
    if retry_after_s is not None:
        delay = duration_pb2.Duration()
        delay.FromNanoseconds(int(retry_after_s * 1e9))
        details.append(_pack(error_details_pb2.RetryInfo(retry_delay=delay)))
    return status_pb2.Status(code=getattr(code_pb2, code.name), message=message, details=details)


def from_rpc_error(error: grpc.aio.AioRpcError) -> RemoteError:
    """An error a worker process answered with, as a domain error keeping its code, reason and
    field violations."""
    try:
        status = rpc_status.from_call(error)
    except ValueError:  # trailers that disagree with the status: keep the code and message
        status = None
    if status is None:
        return RemoteError(code_name=error.code().name, message=error.details() or error.code().name)
    return from_status_proto(status)


def from_status_proto(status: status_pb2.Status) -> RemoteError:
    """A worker's google.rpc.Status as a domain error keeping its code, reason and field violations."""
    reason, retry_after_s, metadata = None, None, {}
    violations: list[FieldViolation] = []
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            reason, metadata = info.reason, dict(info.metadata)
        elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            retry = error_details_pb2.RetryInfo()
            detail.Unpack(retry)
            retry_after_s = retry.retry_delay.ToNanoseconds() / 1e9
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad_request = error_details_pb2.BadRequest()
            detail.Unpack(bad_request)
            violations = [FieldViolation(v.field, v.description) for v in bad_request.field_violations]
    code_name = code_pb2.Code.Name(status.code) if status.code in code_pb2.Code.values() else "UNKNOWN"
    return RemoteError(
        code_name=code_name,
        message=status.message or code_name,
        reason=reason,
        retry_after_s=retry_after_s,
        metadata=metadata,
        violations=violations,
    )


def grpc_errors(method):
    """Wrap a servicer method (unary or server-streaming) so it runs under its caller's request id
    and domain errors become statuses: for the worker's servicer. The server's own servicers need
    none: its interceptor maps what escapes them, the one place it is done there."""

    async def fail(context: grpc.aio.ServicerContext, error: Exception) -> None:
        await context.abort_with_status(rpc_status.to_status(status_of(error, method.__name__)))

    if inspect.isasyncgenfunction(method):

        @functools.wraps(method)
        async def stream(self, request, context):
            _adopt_callers_request_id(context)
            try:
                async for response in method(self, request, context):
                    yield response
            except grpc.aio.AbortError:
                raise
            except Exception as error:
                await fail(context, error)

        return stream

    @functools.wraps(method)
    async def unary(self, request, context):
        _adopt_callers_request_id(context)
        try:
            return await method(self, request, context)
        except grpc.aio.AbortError:
            raise
        except Exception as error:
            await fail(context, error)

    return unary


def _adopt_callers_request_id(context: grpc.aio.ServicerContext) -> None:
    """The caller's request id (the server's, in a worker) for this call, set for every log line of it.

    Set before anything can fail: grpc_errors logs an unexpected error in this context, and
    the threads a call starts copy it, so the traceback of a failed load
    carries the id of the server's call that asked for it.
    """
    metadata = context.invocation_metadata() or ()
    sent = next((v for k, v in metadata if k == logs.REQUEST_ID_METADATA and isinstance(v, str)), "")
    logs.REQUEST_ID.set(sent)
