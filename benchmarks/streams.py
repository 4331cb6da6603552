"""What one benchmark stream recorded, how a level of concurrent streams is summed up, and
the clients that record them: llmgrpc's Generate over gRPC, and OpenAI-style completions
streamed as server-sent events over HTTP.

Every time is taken in the process that receives the tokens, in seconds from the start of
the level (all its streams are sent at once), so records from different processes compare.
"""

from __future__ import annotations

import asyncio
import json
import math
import statistics
import time
from dataclasses import asdict, dataclass, field

import grpc

from llmgrpc.v1 import generate_pb2, generate_pb2_grpc

PROMPT = "Stream {index}: the quick brown fox jumps over the lazy dog"


def prompts(count: int) -> list[str]:
    return [PROMPT.format(index=i) for i in range(count)]


@dataclass
class StreamRecord:
    """One stream: when it was sent and when each message arrived, with its token count
    (a share of the stream's count where a server's messages are not one per token)."""

    sent: float
    expected: int
    arrivals: list[tuple[float, int]] = field(default_factory=list)
    finish: str = ""  # "length" when the stream ran to max_tokens
    error: str = ""

    @property
    def tokens(self) -> int:
        return round(sum(count for _, count in self.arrivals))

    @property
    def complete(self) -> bool:
        return not self.error and self.finish == "length" and self.tokens == self.expected

    @property
    def problem(self) -> str:
        if self.error:
            return self.error
        if not self.complete:
            return f"truncated: {self.tokens} of {self.expected} tokens, finish {self.finish or 'none'}"
        return ""

    @property
    def ttft(self) -> float:
        return self.arrivals[0][0] - self.sent if self.arrivals else float("nan")

    @property
    def end(self) -> float:
        return self.arrivals[-1][0] if self.arrivals else self.sent

    def inter_token_gaps(self) -> list[float]:
        """Time between consecutive messages, per token of the later one."""
        return [
            (later - earlier) / count
            for (earlier, _), (later, count) in zip(self.arrivals, self.arrivals[1:], strict=False)
            if count
        ]

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> StreamRecord:
        return cls(**{**data, "arrivals": [tuple(a) for a in data["arrivals"]]})


@dataclass
class Level:
    """Streams sent together to one system, and what they add up to."""

    streams: list[StreamRecord]

    @property
    def tokens(self) -> int:
        return sum(s.tokens for s in self.streams)

    @property
    def wall(self) -> float:
        return max(s.end for s in self.streams) - min(s.sent for s in self.streams)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.wall if self.wall > 0 else float("nan")

    @property
    def problems(self) -> list[str]:
        return [s.problem for s in self.streams if s.problem]

    def ttfts(self) -> list[float]:
        return [s.ttft for s in self.streams if s.arrivals]

    def gaps(self) -> list[float]:
        return [gap for s in self.streams for gap in s.inter_token_gaps()]

    def to_json(self) -> dict:
        return {"streams": [s.to_json() for s in self.streams]}

    @classmethod
    def from_json(cls, data: dict) -> Level:
        return cls([StreamRecord.from_json(s) for s in data["streams"]])


def percentile(values: list[float], p: float) -> float:
    """The p-th percentile (nearest rank); NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


async def run_level(open_stream, count: int, max_tokens: int) -> Level:
    """count streams at once; open_stream(record, prompt, start) fills in its record."""
    start = time.perf_counter()
    records = [StreamRecord(sent=0.0, expected=max_tokens) for _ in range(count)]

    async def one(record: StreamRecord, prompt: str) -> None:
        record.sent = time.perf_counter() - start
        try:
            await open_stream(record, prompt, start)
        except Exception as error:  # recorded, and reported as this stream's problem
            record.error = f"{type(error).__name__}: {error}"[:300]

    await asyncio.gather(*(one(r, p) for r, p in zip(records, prompts(count), strict=True)))
    return Level(records)


class GrpcStreams:
    """Streams from llmgrpc's Generate on one channel, greedy with end-of-text ignored."""

    def __init__(self, endpoint: str, model_uid: str):
        self.endpoint = endpoint
        self.channel = grpc.aio.insecure_channel(endpoint)
        self.stub = generate_pb2_grpc.GenerateServiceStub(self.channel)
        self.model_uid = model_uid

    async def close(self) -> None:
        await self.channel.close()

    def opener(self, max_tokens: int):
        async def open_stream(record: StreamRecord, prompt: str, start: float) -> None:
            request = generate_pb2.GenerateRequest(
                model_uid=self.model_uid, prompt=prompt, max_tokens=max_tokens, temperature=0, ignore_eos=True
            )
            async for response in self.stub.Generate(request, timeout=600):
                record.arrivals.append((time.perf_counter() - start, len(response.token_ids)))
                if response.finish_reason:
                    record.finish = generate_pb2.FinishReason.Name(response.finish_reason)[14:].lower()

        return open_stream


class SseStreams:
    """Streams from an OpenAI-style /v1/completions endpoint, as server-sent events.

    Both peers send about one event per sampled token, but not exactly (llama_cpp.server
    sends one more where it flushes held-back text at the end): a stream's token count is
    the server's ``usage`` where it sends one, else max_tokens when it finished with
    ``length``, else its events; each event carries an equal share of that count.
    end_of_text_ids are pushed down with logit_bias, as llmgrpc's ignore_eos does.
    """

    def __init__(self, host: str, port: int, end_of_text_ids: list[int], extra: dict | None = None):
        self.host, self.port = host, port
        self.logit_bias = {str(token): -100.0 for token in end_of_text_ids}
        self.extra = extra or {}

    def opener(self, max_tokens: int):
        async def open_stream(record: StreamRecord, prompt: str, start: float) -> None:
            body = json.dumps(
                {
                    "prompt": prompt,
                    "max_tokens": max_tokens,
                    "temperature": 0,
                    "stream": True,
                    "logit_bias": self.logit_bias,
                    **self.extra,
                }
            ).encode()
            reader, writer = await asyncio.open_connection(self.host, self.port)
            try:
                writer.write(
                    b"POST /v1/completions HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n"
                    b"Content-Length: %d\r\nConnection: close\r\n\r\n%s"
                    % (self.host.encode(), len(body), body)
                )
                status = await reader.readline()
                if b" 200 " not in status:
                    raise RuntimeError(f"HTTP {status.decode(errors='replace').strip()}")
                counted = None
                # The body, chunked or not: read lines, keep the "data: " ones.
                async for line in reader:
                    if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
                        continue
                    event = json.loads(line[6:])
                    choice = (event.get("choices") or [{}])[0]
                    if choice.get("finish_reason"):
                        record.finish = choice["finish_reason"]
                    elif "text" in choice:
                        record.arrivals.append((time.perf_counter() - start, 1))
                    counted = (event.get("usage") or {}).get("completion_tokens", counted)
            finally:
                writer.close()
            if counted is None:
                counted = max_tokens if record.finish == "length" else len(record.arrivals)
            share = counted / max(len(record.arrivals), 1)
            record.arrivals = [(at, share) for at, _ in record.arrivals]

        return open_stream
