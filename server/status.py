"""Domain errors to gRPC statuses, in one place.

``llmgrpc.engines.errors.CODE_NAMES`` is the table; ``grpc_errors`` applies it around
every RPC, so servicers raise domain errors and never pick a status themselves. Only a
real bug becomes INTERNAL, and it is logged with its traceback.
"""

from __future__ import annotations

import functools
import inspect
import logging

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from llmgrpc.engines.errors import InvalidArgument, LlmgrpcError, RemoteError, code_name

log = logging.getLogger(__name__)


def status_code(error: BaseException) -> grpc.StatusCode:
    return grpc.StatusCode[code_name(error)]


def to_rpc_status(error: BaseException) -> grpc.Status:
    """The status a caller gets for error, with machine-readable details where there are any."""
    code = status_code(error)
    message = str(error) if isinstance(error, LlmgrpcError) else "internal error; see the server log"
    details = []
    if isinstance(error, InvalidArgument) and error.violations:
        bad_request = error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(field=v.field, description=v.description)
                for v in error.violations
            ]
        )
        detail = any_pb2.Any()
        detail.Pack(bad_request)
        details.append(detail)
    return rpc_status.to_status(
        status_pb2.Status(code=getattr(code_pb2, code.name), message=message, details=details)
    )


def from_rpc_error(error: grpc.aio.AioRpcError) -> RemoteError:
    """An error a worker process answered with, as a domain error keeping its code."""
    return RemoteError(code_name=error.code().name, message=error.details() or error.code().name)


def grpc_errors(method):
    """Wrap a servicer method (unary or server-streaming) so domain errors become statuses."""

    async def fail(context: grpc.aio.ServicerContext, error: Exception) -> None:
        if not isinstance(error, LlmgrpcError):
            log.exception("unexpected error in %s", method.__name__, exc_info=error)
        await context.abort_with_status(to_rpc_status(error))

    if inspect.isasyncgenfunction(method):

        @functools.wraps(method)
        async def stream(self, request, context):
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
        try:
            return await method(self, request, context)
        except grpc.aio.AbortError:
            raise
        except Exception as error:
            await fail(context, error)

    return unary
