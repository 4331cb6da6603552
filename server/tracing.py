"""OpenTelemetry tracing: W3C trace context in gRPC metadata, spans per request.

The server opens a SERVER span per RPC, continuing the caller's ``traceparent``; the
call to a model's worker is a CLIENT span whose context travels in the worker call's
metadata; the worker opens a span around the engine's generation. Tracer providers
are made here from the settings and passed down (never installed globally), so tests
can hand the server a provider with an in-memory exporter.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
from collections.abc import Iterable, Iterator

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from llmgrpc.clients.errors import FailedPrecondition

log = logging.getLogger(__name__)

TRACER_NAME = "llmgrpc"
_PROPAGATOR = TraceContextTextMapPropagator()  # stateless: reads and writes traceparent/tracestate


def tracer_provider(exporter: str, service_name: str) -> trace.TracerProvider:
    """A provider exporting to exporter: none (spans are not recorded), console or otlp."""
    if exporter == "none":
        return trace.NoOpTracerProvider()
    provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
    if exporter == "console":
        provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter()))
    elif exporter == "otlp":
        try:
            # Reads OTEL_EXPORTER_OTLP_ENDPOINT and the other standard OTEL_* variables.
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        except ImportError:
            raise FailedPrecondition(
                "trace_exporter otlp needs the OTLP exporter: pip install 'llmgrpc[otlp]'"
            ) from None
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    else:
        raise FailedPrecondition(f"unknown trace_exporter {exporter!r}: none, console or otlp")
    return provider


def shutdown(provider: trace.TracerProvider) -> None:
    """Flush spans still buffered (a no-op for providers without exporters)."""
    if isinstance(provider, TracerProvider):
        provider.shutdown()


def extract(metadata: Iterable[tuple[str, str | bytes]] | None) -> otel_context.Context:
    """The caller's trace context from gRPC metadata (an empty context when there is none)."""
    carrier = {key: value for key, value in metadata or () if isinstance(value, str)}
    return _PROPAGATOR.extract(carrier)


def inject() -> tuple[tuple[str, str], ...]:
    """The current trace context as gRPC metadata, for a call made within the current span."""
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier)
    return tuple(carrier.items())


def detach(token: object) -> None:
    """Undo otel_context.attach. A response stream its caller left is closed later, from another
    task, whose context never had the span attached: there is nothing to undo there, and
    OpenTelemetry's own detach would log an ERROR ("Failed to detach context") for each one."""
    if isinstance(token, contextvars.Token):  # what OpenTelemetry's contextvars runtime returns
        with contextlib.suppress(ValueError):  # created in another context
            token.var.reset(token)
        return
    otel_context.detach(token)


@contextlib.contextmanager
def current_span(tracer: trace.Tracer, name: str, **span_options) -> Iterator[trace.Span]:
    """tracer.start_as_current_span for the body of an async generator (a response stream): the
    span ends and the context is restored quietly even when the stream is closed from another
    task because its caller went away. An exception escaping the body marks the span as failed."""
    span = tracer.start_span(name, **span_options)
    token = otel_context.attach(trace.set_span_in_context(span))
    try:
        yield span
    except Exception as error:
        span.record_exception(error)
        span.set_status(trace.Status(trace.StatusCode.ERROR, f"{type(error).__name__}: {error}"))
        raise
    finally:
        span.end()
        detach(token)
