"""Server reflection that serves llmgrpc's protos with their comments.

protoc's Python output leaves the comments out of the descriptors it embeds, so plain
reflection would give ``grpcurl describe`` an undocumented contract. protos/generate.py
also writes the documented descriptors (``descriptors.binpb`` beside the stubs of llmgrpc.v1
and of the KServe v2 and TGIS protocols); this servicer
answers with those in place of the embedded ones. The worker's internal API
(llmgrpc/worker/v1) is in this process's descriptor pool too, but not part of the contract:
asked for, it is not found.
"""

from __future__ import annotations

from importlib import resources

import grpc
from google.protobuf import descriptor_pb2
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc

INTERNAL_PROTOS = "llmgrpc/worker/"
# The packages whose documented descriptors protos/generate.py writes: the contract and the
# standard inference protocols served beside it.
DOCUMENTED_PACKAGES = ("llmgrpc.v1", "llmgrpc.kserve.v2", "llmgrpc.tgis.v1")


def documented_descriptors() -> dict[str, bytes]:
    """Serialized FileDescriptorProto of each served proto file, comments included, by file name."""
    documented = {}
    for package in DOCUMENTED_PACKAGES:
        data = resources.files(package).joinpath("descriptors.binpb").read_bytes()
        for file in descriptor_pb2.FileDescriptorSet.FromString(data).file:
            documented[file.name] = file.SerializeToString()
    return documented


class DocumentedReflectionServicer(reflection.aio.ReflectionServicer):
    def __init__(self, service_names):
        super().__init__(service_names)
        self._documented = documented_descriptors()

    async def ServerReflectionInfo(self, request_iterator, context):
        async for response in super().ServerReflectionInfo(request_iterator, context):
            if response.HasField("file_descriptor_response"):
                files = response.file_descriptor_response.file_descriptor_proto
                names = [descriptor_pb2.FileDescriptorProto.FromString(data).name for data in files]
                if any(name.startswith(INTERNAL_PROTOS) for name in names):
                    yield _not_found(response.original_request)
                    continue
                for index, name in enumerate(names):
                    files[index] = self._documented.get(name, files[index])
            yield response


def _not_found(request: reflection_pb2.ServerReflectionRequest) -> reflection_pb2.ServerReflectionResponse:
    """The answer reflection gives for a symbol or file it does not know."""
    code, message = grpc.StatusCode.NOT_FOUND.value
    return reflection_pb2.ServerReflectionResponse(
        original_request=request,
        error_response=reflection_pb2.ErrorResponse(error_code=code, error_message=message),
    )


def enable_reflection(service_names, server) -> None:
    names = (*service_names, reflection.SERVICE_NAME)
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(DocumentedReflectionServicer(names), server)
