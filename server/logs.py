"""Logs: one JSON object a line (or plain text), each carrying the request it belongs to.

The request id of each call travels in one channel, a context variable: the interceptor
decides it (``adopt_request_id``), everything the call runs reads it (``request_id``), the
worker client sends it to the worker, and every record logged while serving the call carries
it, with the trace id of the current span, so a request can be followed across log lines and
traces. Metadata values (credentials among them) are never logged.
"""

from __future__ import annotations

import contextvars
import json
import logging
import re
import sys
import time
import uuid

from opentelemetry import trace

# The request id of the call being served, "" outside a call. Context-local, not shared.
REQUEST_ID: contextvars.ContextVar[str] = contextvars.ContextVar("llmgrpc_request_id", default="")
# The metadata key of a request id: a caller may send one, the server answers with it, and a
# worker takes the server's from it for its own log lines.
REQUEST_ID_METADATA = "x-request-id"
# A request id a caller may choose: short, and nothing that could forge a log line or a header.
SANE_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:=+/-]{1,128}$")


def adopt_request_id(given: str = "") -> str:
    """Decide the id of the request this context serves, and set it: given, when it is a sane
    id (a caller's x-request-id), else a new one."""
    request_id = given if SANE_REQUEST_ID.match(given) else uuid.uuid4().hex
    REQUEST_ID.set(request_id)
    return request_id


def request_id() -> str:
    """The id of the request this context serves: the one the interceptor adopted (on a worker,
    the server's); a call that came through neither adopts a new one here."""
    return REQUEST_ID.get() or adopt_request_id()


def adopt_part_id(index: int) -> str:
    """The id of one of several generations a call makes (a batch's prompts, a stream's
    requests, n samples): the call's id and the index. Call it first thing in the generation's
    own task, so that the call's other generations keep theirs."""
    part_id = f"{request_id()}.{index}"
    REQUEST_ID.set(part_id)
    return part_id


# Attributes every LogRecord has; anything else was passed through `extra=` and is logged as a field.
_STANDARD = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}


class RequestContext(logging.Filter):
    """Adds request_id and trace_id to every record."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = REQUEST_ID.get()
        span = trace.get_current_span().get_span_context()
        record.trace_id = format(span.trace_id, "032x") if span.is_valid else ""
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_") and value not in ("", None):
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str, ensure_ascii=False)


TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"


def handler(log_format: str, stream=None) -> logging.Handler:
    """A handler writing to stream (stderr) as JSON lines or text, with request and trace ids."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.addFilter(RequestContext())
    handler.setFormatter(JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT))
    return handler


def configure(level: str, log_format: str, stream=None) -> None:
    """Route every log record of this process through one such handler."""
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler(log_format, stream))
    root.setLevel(level.upper())
