"""The public calls a loaded model answers in its worker (WorkerService.CallModel), by request type.

A unary llmgrpc.v1 RPC that a model serves (Tokenize, Detokenize) reaches the worker as the
caller's own message packed in an Any: the server's path to the worker is the same for every such
call, and a new one is a function here and an entry in MODEL_CALLS.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from google.protobuf import any_pb2
from google.protobuf.message import Message

from llmgrpc.clients.errors import Unimplemented
from llmgrpc.engines.base import Engine
from llmgrpc.v1 import generate_pb2


async def tokenize(engine: Engine, request: generate_pb2.TokenizeRequest) -> generate_pb2.TokenizeResponse:
    tokens = await engine.tokenize(request.text, request.parse_special_tokens)
    return generate_pb2.TokenizeResponse(token_ids=tokens.token_ids, tokens=tokens.tokens)


async def detokenize(
    engine: Engine, request: generate_pb2.DetokenizeRequest
) -> generate_pb2.DetokenizeResponse:
    return generate_pb2.DetokenizeResponse(text=await engine.detokenize(list(request.token_ids)))


ModelCall = Callable[[Engine, Message], Awaitable[Message]]
MODEL_CALLS: dict[type[Message], ModelCall] = {
    generate_pb2.TokenizeRequest: tokenize,
    generate_pb2.DetokenizeRequest: detokenize,
}


async def answer(engine: Engine, packed: any_pb2.Any) -> any_pb2.Any:
    """The packed answer to a packed public request."""
    for request_type, call in MODEL_CALLS.items():
        if packed.Is(request_type.DESCRIPTOR):
            request = request_type()
            packed.Unpack(request)
            answer = any_pb2.Any()
            answer.Pack(await call(engine, request))
            return answer
    known = ", ".join(request_type.DESCRIPTOR.full_name for request_type in MODEL_CALLS)
    raise Unimplemented(f"{packed.TypeName() or '(no type)'} is not a model call: known are {known}")
