"""What one benchmark stream recorded, how a level of concurrent streams is summed up, and
the clients that record them: llmgrpc's Generate over gRPC, and OpenAI-style completions
streamed as server-sent events over HTTP (from a peer server, or through the model gateway smg).

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


def check_prompt_tokens(prompt: str, token_ids: dict[str, list[int]] | None, counted: int) -> None:
    """Where prompts go as given token ids, the server must have counted exactly those."""
    if token_ids is not None and counted != len(token_ids[prompt]):
        raise RuntimeError(f"the server counted {counted} prompt tokens, {len(token_ids[prompt])} were sent")


class GrpcStreams:
    """Streams from llmgrpc's Generate on one channel, greedy with end-of-text ignored; each
    prompt as its text, or as the token ids token_ids gives it (the prompt count is checked)."""

    def __init__(self, endpoint: str, model_uid: str, token_ids: dict[str, list[int]] | None = None):
        self.endpoint = endpoint
        self.channel = grpc.aio.insecure_channel(endpoint)
        self.stub = generate_pb2_grpc.GenerateServiceStub(self.channel)
        self.model_uid = model_uid
        self.token_ids = token_ids

    async def close(self) -> None:
        await self.channel.close()

    def opener(self, max_tokens: int):
        async def open_stream(record: StreamRecord, prompt: str, start: float) -> None:
            request = generate_pb2.GenerateRequest(
                model_uid=self.model_uid, max_tokens=max_tokens, temperature=0, ignore_eos=True
            )
            if self.token_ids is None:
                request.prompt = prompt
            else:
                request.prompt_token_ids.extend(self.token_ids[prompt])
            async for response in self.stub.Generate(request, timeout=600):
                record.arrivals.append((time.perf_counter() - start, len(response.token_ids)))
                if response.finish_reason:
                    record.finish = generate_pb2.FinishReason.Name(response.finish_reason)[14:].lower()
                if response.HasField("usage"):
                    check_prompt_tokens(prompt, self.token_ids, response.usage.prompt_tokens)

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


class GatewayStreams:
    """Streams from the model gateway smg's OpenAI /v1/completions, as server-sent events read
    by aiohttp on one pooled session, greedy with end of text ignored (``ignore_eos``, which smg
    hands to the worker).

    smg tokenizes the text with the worker's tokenizer and adds no beginning-of-text token:
    token_ids holds those ids for each prompt, which the direct Generate streams send, and the
    prompt count smg reports must match them. smg sends one event per detokenized piece of text,
    not per token (a piece waits for the next token where a UTF-8 character is incomplete): the
    stream's token count is its ``usage`` (asked for with ``include_usage``), each text event
    carrying an equal share; a stream without usage, or ending without ``[DONE]``, is an error.
    """

    def __init__(self, base_url: str, model: str, token_ids: dict[str, list[int]]):
        import aiohttp  # the bench extra's; only the gateway runs need it

        self.url = f"{base_url}/v1/completions"
        self.model = model
        self.token_ids = token_ids
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0), timeout=aiohttp.ClientTimeout(total=600)
        )

    async def close(self) -> None:
        await self.session.close()

    def opener(self, max_tokens: int):
        async def open_stream(record: StreamRecord, prompt: str, start: float) -> None:
            body = {
                "model": self.model,
                "prompt": prompt,
                "max_tokens": max_tokens,
                "temperature": 0,
                "ignore_eos": True,
                "stream": True,
                "stream_options": {"include_usage": True},
            }
            usage, done = None, False
            async with self.session.post(self.url, json=body) as response:
                if response.status != 200:
                    raise RuntimeError(f"HTTP {response.status}: {(await response.text())[:200]}")
                async for line in response.content:  # aiohttp splits the body into lines
                    if not line.startswith(b"data:"):
                        continue
                    data = line[5:].strip()
                    if data == b"[DONE]":
                        done = True
                        break
                    event = json.loads(data)
                    if "error" in event:
                        raise RuntimeError(f"error event: {event['error']}")
                    for choice in event.get("choices") or ():
                        if choice.get("text"):
                            record.arrivals.append((time.perf_counter() - start, 1))
                        if choice.get("finish_reason"):
                            record.finish = choice["finish_reason"]
                    usage = event.get("usage") or usage
            if not done:
                raise RuntimeError("the stream ended without [DONE]")
            if usage is None:
                raise RuntimeError("the stream carried no usage")
            check_prompt_tokens(prompt, self.token_ids, usage["prompt_tokens"])
            share = usage["completion_tokens"] / max(len(record.arrivals), 1)
            record.arrivals = [(at, share) for at, _ in record.arrivals]

        return open_stream
