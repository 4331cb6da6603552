"""Reading the google.rpc.Status details of a failed call, as a client would."""

from __future__ import annotations

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status


def _details(error: grpc.RpcError, kind):
    status = rpc_status.from_call(error)
    if status is None:
        return None
    for detail in status.details:
        if detail.Is(kind.DESCRIPTOR):
            message = kind()
            detail.Unpack(message)
            return message
    return None


def error_info(error: grpc.RpcError) -> error_details_pb2.ErrorInfo | None:
    return _details(error, error_details_pb2.ErrorInfo)


def retry_info(error: grpc.RpcError) -> error_details_pb2.RetryInfo | None:
    return _details(error, error_details_pb2.RetryInfo)


def bad_request(error: grpc.RpcError) -> error_details_pb2.BadRequest | None:
    return _details(error, error_details_pb2.BadRequest)


def reason(error: grpc.RpcError) -> str:
    info = error_info(error)
    return info.reason if info is not None else ""
