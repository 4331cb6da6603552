"""Small helpers the service tests share for calling through the generated stubs."""

from __future__ import annotations

import time
import urllib.request

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from llmgrpc.v1 import generate_pb2


def rpc_error(call, *args, **kwargs) -> grpc.RpcError:
    """The error a call fails with; a stream is read to the end, since it fails when read."""
    with pytest.raises(grpc.RpcError) as caught:
        result = call(*args, **kwargs)
        if hasattr(result, "__iter__") and not isinstance(result, (str, bytes)):
            list(result)
    return caught.value


def collect(responses) -> tuple[list[int], str, list[generate_pb2.GenerateResponse]]:
    """A Generate stream read to the end: its token ids, its text and its messages."""
    messages = list(responses)
    token_ids = [token for message in messages for token in message.token_ids]
    return token_ids, "".join(message.text for message in messages), messages


def wait_until(predicate, timeout: float = 15.0, interval: float = 0.05) -> bool:
    """Whether predicate() became true within timeout seconds (asked every interval)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


def scrape(port: int) -> dict[str, dict[tuple, float]]:
    """Every sample of /metrics: name -> {sorted labels: value}."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    samples: dict[str, dict[tuple, float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return samples


def value(samples, name: str, **labels) -> float:
    wanted = set(labels.items())
    return sum(v for key, v in samples.get(name, {}).items() if wanted <= set(key))
