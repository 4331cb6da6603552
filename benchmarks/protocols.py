"""KServe v2's ModelStreamInfer against llmgrpc.v1's Generate: the same concurrent streams on
the same server and model, generated tokens per second through each.

Both are driven by gRPC asyncio clients in this process, so the comparison is of the server's
two paths, not of client libraries: Generate with one call per stream, ModelStreamInfer with
every request on one bidirectional call, as Triton's clients send them. --tritonclient also
times Triton's own client, whose per-message Python callback thread costs client CPU that
the server's cores share here. Rounds alternate between the paths so that none gets a warmer
machine; the medians are compared.

Usage: python benchmarks/protocols.py [--streams 16] [--max-tokens 64] [--rounds 3] [--min-ratio 0.95]
Exits 1 when ModelStreamInfer's tok/s falls below min-ratio times Generate's.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import queue
import statistics
import struct
import sys
import tempfile
import time
from pathlib import Path

import grpc
import numpy as np
from servers import Llmgrpc
from streams import GrpcStreams, prompts, run_level

MODEL = "tiny-llama-3.1"


def generate_round(endpoint: str, streams: int, max_tokens: int) -> float:
    async def run() -> float:
        client = GrpcStreams(endpoint, MODEL)
        try:
            started = time.perf_counter()
            level = await run_level(client.opener(max_tokens), streams, max_tokens)
            seconds = (
                time.perf_counter() - started
            )  # timed as ModelStreamInfer's: from first send to last token
        finally:
            await client.close()
        problems = [stream.problem for stream in level.streams if stream.problem]
        if problems:
            raise RuntimeError(f"Generate streams failed: {problems[:3]}")
        return level.tokens / seconds

    return asyncio.run(run())


def stream_infer_round(endpoint: str, streams: int, max_tokens: int) -> float:
    """All the requests on one ModelStreamInfer call from a gRPC asyncio client, as Generate's are."""
    # Triton's own stubs of the protocol (tritonclient's), driven by a gRPC asyncio channel.
    from tritonclient.grpc import service_pb2 as pb
    from tritonclient.grpc import service_pb2_grpc as pb_grpc

    def encode_bytes(element: bytes) -> bytes:  # a raw BYTES element: its length, then itself
        return struct.pack("<I", len(element)) + element

    sampling = json.dumps({"temperature": 0, "max_tokens": max_tokens, "ignore_eos": True}).encode()

    def request(index: int, prompt: str) -> pb.ModelInferRequest:
        message = pb.ModelInferRequest(model_name=MODEL, id=str(index))
        for name, datatype, raw in (
            ("text_input", "BYTES", encode_bytes(prompt.encode())),
            ("stream", "BOOL", b"\x01"),
            ("sampling_parameters", "BYTES", encode_bytes(sampling)),
        ):
            message.inputs.add(name=name, datatype=datatype, shape=[1])
            message.raw_input_contents.append(raw)
        return message

    async def run() -> float:
        async with grpc.aio.insecure_channel(endpoint) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            started = time.perf_counter()
            call = stub.ModelStreamInfer(iter([request(i, p) for i, p in enumerate(prompts(streams))]))
            tokens = 0
            async for answer in call:
                if answer.error_message:
                    raise RuntimeError(answer.error_message)
                parameters = answer.infer_response.parameters
                if parameters["triton_final_response"].bool_param:
                    tokens += parameters["completion_tokens"].int64_param
            return tokens / (time.perf_counter() - started)

    return asyncio.run(run())


def tritonclient_round(endpoint: str, streams: int, max_tokens: int) -> float:
    """The same through Triton's own client (a thread per stream and a Python callback per message)."""
    import tritonclient.grpc as triton

    sampling = json.dumps({"temperature": 0, "max_tokens": max_tokens, "ignore_eos": True}).encode()

    def tensor(name: str, datatype: str, value) -> triton.InferInput:
        item = triton.InferInput(name, [1], datatype)
        item.set_data_from_numpy(np.array([value], dtype=object if datatype == "BYTES" else bool))
        return item

    client = triton.InferenceServerClient(endpoint)
    answers: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    started = time.perf_counter()
    for index, prompt in enumerate(prompts(streams)):
        inputs = [
            tensor("text_input", "BYTES", prompt.encode()),
            tensor("stream", "BOOL", True),
            tensor("sampling_parameters", "BYTES", sampling),
        ]
        client.async_stream_infer(MODEL, inputs, request_id=str(index))
    finished = tokens = 0
    while finished < streams:
        result, error = answers.get(timeout=600)
        if error is not None:
            raise RuntimeError(error)
        parameters = result.get_response().parameters
        if parameters["triton_final_response"].bool_param:
            finished += 1
            tokens += parameters["completion_tokens"].int64_param
    seconds = time.perf_counter() - started
    client.stop_stream()
    client.close()
    return tokens / seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--min-ratio", type=float, default=0.95)
    parser.add_argument(
        "--tritonclient", action="store_true", help="also time ModelStreamInfer through Triton's client"
    )
    parser.add_argument("--out", type=Path, default=Path("build") / "bench-protocols.json")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a smoke run (one short round) that reports the ratio, never fails on it",
    )
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.max_tokens, args.min_ratio = 1, 16, 0.0

    log_dir = Path(tempfile.mkdtemp(prefix="bench-protocols-"))
    server = Llmgrpc(log_dir / "llmgrpc.log", "--launch", MODEL, "--device", "cpu")
    try:
        server.wait_ready(timeout=300)
        rounds = {"generate": generate_round, "model_stream_infer": stream_infer_round}
        if args.tritonclient:
            rounds["tritonclient"] = tritonclient_round
        for run in rounds.values():  # warm-up: every path, short
            run(server.endpoint, args.streams, 8)
        measured: dict[str, list[float]] = {name: [] for name in rounds}
        for _ in range(args.rounds):
            for name, run in rounds.items():
                measured[name].append(run(server.endpoint, args.streams, args.max_tokens))
    finally:
        server.stop()
    result = {
        "streams": args.streams,
        "max_tokens": args.max_tokens,
        **{f"{name}_tok_s": statistics.median(values) for name, values in measured.items()},
        "rounds": measured,
    }
    result["ratio"] = result["model_stream_infer_tok_s"] / result["generate_tok_s"]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(
        f"{args.streams} streams x {args.max_tokens} tokens: Generate {result['generate_tok_s']:.0f} tok/s, "
        f"ModelStreamInfer {result['model_stream_infer_tok_s']:.0f} tok/s, ratio {result['ratio']:.3f} "
        f"(at least {args.min_ratio})"
        + (f"; through tritonclient {result['tritonclient_tok_s']:.0f} tok/s" if args.tritonclient else "")
    )
    return 0 if result["ratio"] >= args.min_ratio else 1


if __name__ == "__main__":
    sys.exit(main())
