"""Clients of llmgrpc: the generated stubs of the llmgrpc.v1 contract and a thin typed client.

The generated modules live in ``llmgrpc.v1`` (the proto package's own name) and are
re-exported here, with ``Reason``: the stable causes a failed call's
``google.rpc.ErrorInfo`` carries (domain ``ERROR_DOMAIN``).
"""

from llmgrpc.clients.client import Client
from llmgrpc.clients.errors import ERROR_DOMAIN, Reason
from llmgrpc.v1 import generate_pb2, generate_pb2_grpc, models_pb2, models_pb2_grpc

__all__ = [
    "ERROR_DOMAIN",
    "Client",
    "Reason",
    "generate_pb2",
    "generate_pb2_grpc",
    "models_pb2",
    "models_pb2_grpc",
]
