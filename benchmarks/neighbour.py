"""Noisy neighbours: a victim stream's inter-token p99 alone and beside heavy requests.

Starts ``llmgrpc serve --launch MODEL`` (or uses --endpoint) and streams one victim
request (greedy, a fixed number of tokens) several times: alone, then while a neighbour
keeps sending, one after another,

- a 4 MB prompt (refused: longer than the context; it is tokenized off the decode loop),
- a request with 10,000 stop strings (refused: at most 64),
- a prompt of most of the context (prefilled in parts between the victim's decode steps).

It reports each run's inter-token p50/p99 and what the neighbour's calls ended with, and
fails (exit 1) when the victim's p99 beside the 4 MB prompt or the stop strings is more
than --limit times (default 2) its p99 alone.

    python benchmarks/neighbour.py [--tokens 400] [--runs 3] [--json neighbour.json]
        [--engine llama.cpp] [--engine-option max_num_batched_tokens=256 ...]

--engine or --engine-option launch the model on that engine with those options (llama.cpp: the
Q8_0 GGUF) beside the server's default one, and measure it instead.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import time
from collections import Counter
from pathlib import Path

import grpc
from soak import Server, percentile, wait_ready

from llmgrpc.clients import Client
from llmgrpc.v1 import generate_pb2, generate_pb2_grpc, models_pb2, models_pb2_grpc

FOUR_MB = 4_000_000
STOP_STRINGS = 10_000


def neighbours(model_uid: str, context_length: int) -> dict[str, generate_pb2.GenerateRequest | None]:
    words = "the quick brown fox jumps over the lazy dog "
    return {
        "alone": None,
        "4 MB prompt": generate_pb2.GenerateRequest(
            model_uid=model_uid, prompt=(words * (FOUR_MB // len(words) + 1))[:FOUR_MB], max_tokens=4
        ),
        "10,000 stop strings": generate_pb2.GenerateRequest(
            model_uid=model_uid,
            prompt="Hello",
            max_tokens=4,
            stop=[f"stop {i}" for i in range(STOP_STRINGS)],
        ),
        # About one word a token: three quarters of the context, so it is accepted.
        "long prompt": generate_pb2.GenerateRequest(
            model_uid=model_uid, prompt=words * (context_length * 3 // 4 // len(words.split())), max_tokens=4
        ),
    }


async def victim(stub, model_uid: str, tokens: int) -> list[float]:
    """Seconds between the victim's messages after the first."""
    request = generate_pb2.GenerateRequest(
        model_uid=model_uid, prompt="Once upon a time", max_tokens=tokens, temperature=0, ignore_eos=True
    )
    gaps: list[float] = []
    last = None
    async for _ in stub.Generate(request):
        now = time.perf_counter()
        if last is not None:
            gaps.append(now - last)
        last = now
    return gaps


def neighbour(endpoint: str, request: bytes, until, outcomes) -> None:
    """Sends request again and again until told to stop (in a process of its own, so its
    work never delays the victim's reader); puts the count of each outcome in outcomes."""

    async def calls() -> Counter:
        counts: Counter[str] = Counter()
        options = [("grpc.max_send_message_length", 2 * FOUR_MB)]
        async with grpc.aio.insecure_channel(endpoint, options=options) as channel:
            stub = generate_pb2_grpc.GenerateServiceStub(channel)
            message = generate_pb2.GenerateRequest.FromString(request)
            while not until.is_set():
                try:
                    async for _ in stub.Generate(message):
                        pass
                    counts["OK"] += 1
                except grpc.aio.AioRpcError as error:
                    counts[error.code().name] += 1
        return counts

    outcomes.put(dict(asyncio.run(calls())))


def launch(endpoint: str, model_name: str, engine: str, options: dict) -> str:
    """The model on engine with options, launched and READY; its uid."""
    gguf = {"model_format": "ggufv2", "quantization": "Q8_0"} if engine == "llama.cpp" else {}
    uid = f"{model_name}-neighbour"
    with Client(endpoint) as client:
        client.launch(
            model_name, model_engine=engine, model_uid=uid, engine_options=options, timeout=600, **gguf
        )
    return uid


async def measure(
    endpoint: str,
    model_uid: str,
    tokens: int,
    runs: int,
    engine: str = "",
    options: dict | None = None,
    cases: tuple[str, ...] = (),
) -> dict:
    async with grpc.aio.insecure_channel(endpoint) as victim_channel:
        await wait_ready(victim_channel)
        victim_stub = generate_pb2_grpc.GenerateServiceStub(victim_channel)
        models = models_pb2_grpc.ModelServiceStub(victim_channel)
        if engine or options:
            engine = engine or "Transformers"
            model_uid = await asyncio.to_thread(launch, endpoint, model_uid, engine, options or {})
        model = (await models.GetModel(models_pb2.GetModelRequest(model_uid=model_uid))).model
        await victim(victim_stub, model_uid, 8)  # warm up
        report = {}
        processes = multiprocessing.get_context("spawn")  # a forked child would share gRPC's threads
        for name, request in neighbours(model_uid, model.context_length).items():
            if cases and name != "alone" and name not in cases:
                continue
            gaps: list[float] = []
            outcomes: Counter[str] = Counter()
            neighbour_seconds = 0.0
            for _ in range(runs):
                until, results = processes.Event(), processes.Queue()
                noisy = None
                if request is not None:
                    noisy = processes.Process(
                        target=neighbour, args=(endpoint, request.SerializeToString(), until, results)
                    )
                    noisy.start()
                    started = time.perf_counter()
                    await asyncio.sleep(1.0)  # let the neighbour's first call get going
                gaps += await victim(victim_stub, model_uid, tokens)
                if noisy is not None:
                    until.set()
                    neighbour_seconds += time.perf_counter() - started
                    outcomes.update(await asyncio.to_thread(results.get, timeout=120))
                    noisy.join()
            report[name] = {
                "itl_p50_ms": round(percentile(gaps, 50) * 1000, 2),
                "itl_p99_ms": round(percentile(gaps, 99) * 1000, 2),
                "itl_max_ms": round(max(gaps) * 1000, 2),
                "neighbour_calls": dict(outcomes),
                # How fast the neighbour was served (from its first second, alone, to the victim's end).
                "neighbour_calls_per_s": round(sum(outcomes.values()) / max(neighbour_seconds, 1e-9), 1),
            }
        return report


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="tiny-llama-3.1", help="model family to launch (its uid too)")
    parser.add_argument("--endpoint", help="use this running server instead of starting one")
    parser.add_argument("--tokens", type=int, default=400, help="tokens the victim streams per run")
    parser.add_argument("--runs", type=int, default=3, help="victim streams per case")
    parser.add_argument("--limit", type=float, default=2.0, help="largest p99 ratio to alone that passes")
    parser.add_argument("--json", type=Path, help="also write the report here")
    parser.add_argument("--engine", default="", help="launch the model on this engine and measure it")
    parser.add_argument(
        "--engine-option", action="append", default=[], metavar="KEY=VALUE", help="engine option (JSON value)"
    )
    parser.add_argument(
        "--case",
        action="append",
        default=[],
        help="measure only these neighbours (and alone): e.g. 'long prompt'",
    )
    args = parser.parse_args()
    options = {key: json.loads(value) for key, value in (o.split("=", 1) for o in args.engine_option)}

    server = None if args.endpoint else Server(args.model, [])
    try:
        endpoint = args.endpoint or server.endpoint
        report = asyncio.run(
            measure(endpoint, args.model, args.tokens, args.runs, args.engine, options, tuple(args.case))
        )
    finally:
        if server is not None:
            server.stop()
    alone = report["alone"]["itl_p99_ms"]
    for case in report.values():
        case["p99_vs_alone"] = round(case["itl_p99_ms"] / alone, 2)
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    gated = ("4 MB prompt", "10,000 stop strings")
    raise SystemExit(
        1 if any(report[name]["p99_vs_alone"] > args.limit for name in gated if name in report) else 0
    )


if __name__ == "__main__":
    main()
