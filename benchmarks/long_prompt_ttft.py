"""A long prompt's time to first token, alone and beside one endless stream.

Starts ``llmgrpc serve --launch MODEL`` and sends a new prompt of three quarters of the context
(a different one each time, so none is in the prefix cache) --prompts times alone, then as many
times while one greedy stream decodes beside it. What the step budget and the prefill pace
(``prefill_time_ratio``) trade: the stream's inter-token gaps (benchmarks/neighbour.py) against
this.

    python benchmarks/long_prompt_ttft.py [--model tiny-llama-3.1] [--prompts 2]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

import grpc
from soak import Server, wait_ready

from llmgrpc.v1 import generate_pb2, generate_pb2_grpc, models_pb2, models_pb2_grpc

WORDS = "the quick brown fox jumps over the lazy dog "


async def first_token_seconds(stub, model_uid: str, prompt: str) -> float:
    started = time.perf_counter()
    request = generate_pb2.GenerateRequest(model_uid=model_uid, prompt=prompt, max_tokens=1)
    async for _ in stub.Generate(request):
        break
    return round(time.perf_counter() - started, 2)


async def measure(endpoint: str, model_uid: str, prompts: int) -> dict[str, list[float]]:
    async with grpc.aio.insecure_channel(endpoint) as channel:
        await wait_ready(channel)
        stub = generate_pb2_grpc.GenerateServiceStub(channel)
        models = models_pb2_grpc.ModelServiceStub(channel)
        context = (
            await models.GetModel(models_pb2.GetModelRequest(model_uid=model_uid))
        ).model.context_length
        repeats = context * 3 // 4 // len(WORDS.split()) - 2  # about a token a word, and room for a label
        report = {}
        for beside in (False, True):
            stream = None
            if beside:
                endless = generate_pb2.GenerateRequest(
                    model_uid=model_uid, prompt="Once upon a time", max_tokens=context // 2, ignore_eos=True
                )
                stream = asyncio.ensure_future(_drain(stub.Generate(endless)))
                await asyncio.sleep(0.5)  # the stream decodes before the prompt comes
            label = "beside a stream" if beside else "alone"
            report[label] = [
                await first_token_seconds(stub, model_uid, f"{label} {i} " + WORDS * repeats)
                for i in range(prompts)
            ]
            if stream is not None:
                stream.cancel()
        return report


async def _drain(call) -> None:
    async for _ in call:
        pass


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="tiny-llama-3.1", help="model family to launch (its uid too)")
    parser.add_argument(
        "--prompts", type=int, default=2, help="prompts sent alone, and as many beside the stream"
    )
    args = parser.parse_args()
    server = Server(args.model, [])
    try:
        print(json.dumps(asyncio.run(measure(server.endpoint, args.model, args.prompts))))
    finally:
        server.stop()


if __name__ == "__main__":
    main()
