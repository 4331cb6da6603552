"""The one server interceptor: what every call goes through before and after its servicer.

In order: a request id (the caller's ``x-request-id`` when it is a sane one, else a new
one), sent back in the initial metadata and set for the logs; a SERVER span continuing
the caller's ``traceparent``; refusal while draining (UNAVAILABLE, reason SHUTTING_DOWN);
authentication and the role check (UNAUTHENTICATED, PERMISSION_DENIED); messages that do
not parse become INVALID_ARGUMENT (gRPC itself would answer UNKNOWN); an unexpected
exception becomes INTERNAL with the request id to look up in the log. A response stream
whose caller reads nothing for ``stream_unread_timeout_s`` while a response waits to be sent
ends with RESOURCE_EXHAUSTED (STREAM_NOT_READ), its servicer closed (which frees its decode
slot). When the call ends: its status code counted and timed, one log line, the span closed.

Health and reflection stay open (no token), are never refused while draining (probes
must see NOT_SERVING), and are not waited for when draining (Watch streams never end).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import grpc
from opentelemetry import context as otel_context
from opentelemetry import trace

from llmgrpc.clients.errors import InvalidArgument, LlmgrpcError, Reason, ResourceExhausted, Unavailable
from llmgrpc.server import logs, tracing
from llmgrpc.server.auth import OPEN_METHODS, OPEN_SERVICES, TokenTable, authorize, service_of
from llmgrpc.server.metrics import Metrics
from llmgrpc.server.status import to_rpc_status

log = logging.getLogger("llmgrpc.rpc")

# Request ids are echoed in response metadata and logs: take the caller's only if it is plain.


@dataclass
class _Undecodable:
    """What a request deserializer gives for bytes that are not the message they should be."""

    message: str

    def error(self) -> InvalidArgument:
        return InvalidArgument(
            f"the request message could not be parsed: {self.message}", reason=Reason.MALFORMED_REQUEST
        )


def _tolerant(deserializer):
    if deserializer is None:
        return None

    def deserialize(data: bytes):
        try:
            return deserializer(data)
        except Exception as error:  # DecodeError, bad UTF-8, nesting too deep
            return _Undecodable(str(error))

    return deserialize


async def _checked(requests):
    async for request in requests:
        if isinstance(request, _Undecodable):
            raise request.error()
        yield request


# What a handler sees when gRPC gives up on its call (the caller cancelled, or its deadline
# passed): its task is cancelled, or its response stream is dropped and later closed.
_ABANDONED = (asyncio.CancelledError, GeneratorExit)


@dataclass
class _Call:
    method: str
    service: str
    open: bool
    request_id: str
    span: trace.Span
    started: float = field(default_factory=time.monotonic)
    counted: bool = False
    # The caller went away (cancelled, or its deadline passed) before the servicer finished.
    abandoned: bool = False


class ServerInterceptor(grpc.aio.ServerInterceptor):
    """Request ids, tracing, draining, authentication and authorization, statuses, metrics, logs."""

    def __init__(
        self,
        tokens: TokenTable,
        metrics: Metrics,
        tracer: trace.Tracer,
        *,
        stream_unread_timeout_s: float | None = None,
    ):
        self.tokens = tokens
        self.metrics = metrics
        self.tracer = tracer
        self.stream_unread_timeout_s = stream_unread_timeout_s  # None: a stream may wait forever
        self.draining = False
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()

    async def wait_idle(self, timeout: float) -> bool:
        """Wait until no call of the product's services is in flight; False if timeout passed first."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
            return True
        except asyncio.TimeoutError:
            return False

    @property
    def in_flight(self) -> int:
        return self._in_flight

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:  # unknown method: gRPC answers UNIMPLEMENTED
            return None
        return self._wrap(handler, handler_call_details.method)

    # Wrapping each kind of handler.

    def _wrap(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        deserializer = _tolerant(handler.request_deserializer)
        serializer = handler.response_serializer
        if handler.request_streaming and handler.response_streaming:
            behavior, factory = handler.stream_stream, grpc.stream_stream_rpc_method_handler
        elif handler.request_streaming:
            behavior, factory = handler.stream_unary, grpc.stream_unary_rpc_method_handler
        elif handler.response_streaming:
            behavior, factory = handler.unary_stream, grpc.unary_stream_rpc_method_handler
        else:
            behavior, factory = handler.unary_unary, grpc.unary_unary_rpc_method_handler
        streaming_requests = handler.request_streaming

        if inspect.isasyncgenfunction(behavior):

            async def streaming(request, context):
                async with self._call(method, request, context, streaming_requests) as request:
                    async with contextlib.aclosing(behavior(request, context)) as responses:
                        unread = _UnreadWatch(self.stream_unread_timeout_s, responses)
                        try:
                            async for response in responses:
                                unread.sending_since = unread.now()
                                yield response
                                unread.sending_since = None
                                if unread.fired:
                                    break
                        finally:
                            unread.stop()
                        if unread.fired:
                            await unread.closed()
                            raise unread.error()

            return factory(streaming, request_deserializer=deserializer, response_serializer=serializer)

        async def unary(request, context):
            async with self._call(method, request, context, streaming_requests) as request:
                return await behavior(request, context)

        return factory(unary, request_deserializer=deserializer, response_serializer=serializer)

    # The steps of a call.

    @contextlib.asynccontextmanager
    async def _call(
        self, method: str, request, context: grpc.aio.ServicerContext, streaming_requests: bool
    ) -> AsyncIterator[Any]:
        """One call from arrival to status, around the servicer's part: the request it is handed
        (or the call is refused), then what escapes it mapped to a status, then the books closed."""
        call = self._enter(method, context)
        token = otel_context.attach(trace.set_span_in_context(call.span))
        try:
            await self._send_request_id(call, context)
            yield self._admit(call, request, context, streaming_requests)
        except StreamNotRead as error:
            _end_unread(call, context, error)
        except BaseException as error:
            await self._fail(call, context, error)
        finally:
            self._exit(call, context, token)

    def _enter(self, method: str, context: grpc.aio.ServicerContext) -> _Call:
        """Open the call's books (request id, span, in-flight count); nothing here may fail or
        wait, so that _exit always closes them: a call whose deadline passes as it arrives is
        counted, logged and uncounted like any other."""
        metadata = context.invocation_metadata() or ()
        given = next((v for k, v in metadata if k == logs.REQUEST_ID_METADATA and isinstance(v, str)), "")
        request_id = logs.adopt_request_id(given)
        service = service_of(method)
        span = self.tracer.start_span(
            method.lstrip("/"),
            context=tracing.extract(metadata),
            kind=trace.SpanKind.SERVER,
            attributes={
                "rpc.system": "grpc",
                "rpc.service": service,
                "rpc.method": method.rpartition("/")[2],
                "llmgrpc.request_id": request_id,
            },
        )
        is_open = service in OPEN_SERVICES or method in OPEN_METHODS
        call = _Call(method=method, service=service, open=is_open, request_id=request_id, span=span)
        if not call.open:
            self._in_flight += 1
            self._idle.clear()
            call.counted = True
        return call

    async def _send_request_id(self, call: _Call, context: grpc.aio.ServicerContext) -> None:
        if self.draining and not call.open:
            # Refused below: no headers, so the refusal goes out Trailers-Only, which a client's
            # retry policy retries on another replica (response headers would commit the call).
            return
        await context.send_initial_metadata(((logs.REQUEST_ID_METADATA, call.request_id),))

    def _admit(self, call: _Call, request, context: grpc.aio.ServicerContext, streaming_requests: bool):
        """The request to hand the servicer, or a domain error refusing the call."""
        if not call.open:
            if self.draining:
                raise Unavailable(
                    "the server is shutting down and takes no new calls; call another replica",
                    reason=Reason.SHUTTING_DOWN,
                )
            if self.tokens.enabled:
                metadata = context.invocation_metadata() or ()
                authorization = next(
                    (v for k, v in metadata if k == "authorization" and isinstance(v, str)), None
                )
                role = self.tokens.role_of(authorization)
                call.span.set_attribute("llmgrpc.role", role)
                authorize(call.method, role)
        if streaming_requests:
            return _checked(request)
        if isinstance(request, _Undecodable):
            raise request.error()
        return request

    async def _fail(self, call: _Call, context: grpc.aio.ServicerContext, error: BaseException) -> None:
        """Turn what escaped the servicer into a status (re-raising what gRPC handles itself)."""
        if isinstance(error, _ABANDONED):
            call.abandoned = True
            raise error
        if isinstance(error, grpc.aio.AbortError):
            raise error
        if not isinstance(error, LlmgrpcError):
            log.error("unexpected error in %s", call.method, exc_info=error)
        if isinstance(error, Exception):
            await context.abort_with_status(to_rpc_status(error))
        raise error

    def _exit(self, call: _Call, context: grpc.aio.ServicerContext, token) -> None:
        code = _final_code(context, call.abandoned)
        seconds = time.monotonic() - call.started
        call.span.set_attribute("rpc.grpc.status_code", code.value[0])
        if code is not grpc.StatusCode.OK:
            call.span.set_status(trace.Status(trace.StatusCode.ERROR, code.name))
        call.span.end()
        tracing.detach(token)
        service = call.service.rpartition(".")[2]
        name = call.method.rpartition("/")[2]
        self.metrics.observe_rpc(call.service, name, code.name, seconds)
        level = logging.DEBUG if call.open else logging.INFO
        if log.isEnabledFor(level):
            log.log(
                level,
                "%s/%s %s in %.0f ms",
                service,
                name,
                code.name,
                seconds * 1000,
                extra={"rpc": call.method, "code": code.name, "duration_ms": round(seconds * 1000, 1)},
            )
        if call.counted:
            self._in_flight -= 1
            if self._in_flight == 0:
                self._idle.set()


class StreamNotRead(ResourceExhausted):
    """A response stream's caller stopped reading it."""


class _UnreadWatch:
    """Ends the work of a response stream whose caller has taken nothing for timeout_s while a
    response waits to be sent (gRPC's send waits once the flow-control window to the caller is
    full): the servicer's generator is closed, which frees its decode slot and stops the engine's
    work, and the stream then ends with STREAM_NOT_READ.

    One timer a stream, checking every timeout_s / 2, rather than a timeout around each send: a
    response then costs two attribute stores, and responses stay yielded to gRPC (sending them
    through context.write cost about a tenth of the transport's ceiling at one stream). The work
    stops within 1.5 x timeout_s of the caller's last read."""

    def __init__(self, timeout_s: float | None, responses):
        self.timeout_s = timeout_s
        self.sending_since: float | None = None
        self.fired = False
        self._responses = responses
        self._closing: asyncio.Future | None = None
        self._loop = asyncio.get_running_loop()
        self.now = self._loop.time
        self._timer = self._loop.call_later(timeout_s / 2, self._check) if timeout_s else None

    def _check(self) -> None:
        since = self.sending_since
        if since is not None and self._loop.time() - since >= self.timeout_s:
            # The servicer's generator is suspended at its yield while gRPC waits to send: closing
            # it runs its cleanup (the admission slot, the worker's stream) now.
            self.fired = True
            self._closing = asyncio.ensure_future(self._responses.aclose())
            self._timer = None
            return
        self._timer = self._loop.call_later(self.timeout_s / 2, self._check)

    async def closed(self) -> None:
        if self._closing is not None:
            with contextlib.suppress(Exception):
                await asyncio.shield(self._closing)

    def error(self) -> StreamNotRead:
        return StreamNotRead(
            f"the caller read nothing of this stream for {self.timeout_s:g} s while its responses "
            "waited to be sent: the stream was ended and its work stopped; read responses as they come",
            reason=Reason.STREAM_NOT_READ,
        )

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()


def _end_unread(call: _Call, context: grpc.aio.ServicerContext, error: StreamNotRead) -> None:
    """End a stream its caller does not read: its status is set, never awaited, since it can only
    follow the responses the caller has not taken (gRPC sends it once the caller reads them, or
    drops it with the call when the caller's deadline passes or its connection closes)."""
    status = to_rpc_status(error)
    context.set_code(status.code)
    context.set_details(status.details)
    context.set_trailing_metadata(status.trailing_metadata)
    log.warning("%s: %s", call.method, error)


def _final_code(context: grpc.aio.ServicerContext, abandoned: bool) -> grpc.StatusCode:
    """The status the call ended with, as far as the server can tell."""
    code = context.code()
    if isinstance(code, grpc.StatusCode):
        return code
    # gRPC sets no code on a call its caller left (and context.cancelled() stays False while
    # its handler unwinds), but then it cancels the handler or drops its response stream.
    if abandoned or context.cancelled():
        remaining = context.time_remaining()
        if remaining is not None and remaining <= 0:
            return grpc.StatusCode.DEADLINE_EXCEEDED
        return grpc.StatusCode.CANCELLED
    return grpc.StatusCode.OK
