"""The in-process baselines: an engine called directly, with no service around it.

The suite runs ``python benchmarks/inprocess.py MODE PLAN_JSON`` as a process of its own,
loads the model once, then sends one JSON line per level on standard input
(``{"concurrency": 4, "max_tokens": 128}``) and reads one JSON line of stream records
back. Modes:

- ``engine``: what a worker does, without the worker: ``Engine.load(plan, weights, report)``
  (weights resolved as the worker resolves them), then ``engine.generate`` for each
  stream, concurrently, in asyncio, with the very GenerateRequest the service gets.
- ``runner``: the engine's forward passes alone: every prompt prefilled in one call, then
  greedy decode steps over all sequences together, with no batcher, sampler or
  detokenizer (for llama.cpp: llama-cpp-python decoding N sequences in one context).
- ``hf-generate``: transformers' own ``model.generate``, greedy, one stream at a time, with
  a streamer that timestamps each token.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time

from streams import Level, StreamRecord, prompts

from llmgrpc.engines import weights
from llmgrpc.engines.base import GenerationRequest, LoadPlan, SamplingParams
from llmgrpc.engines.catalogue import engine_info
from llmgrpc.engines.cpu_threads import on_a_thread_of_its_own
from llmgrpc.v1 import generate_pb2


def generate_request(prompt: str, max_tokens: int) -> generate_pb2.GenerateRequest:
    """What the service's clients send, field for field."""
    return generate_pb2.GenerateRequest(
        model_uid="inprocess", prompt=prompt, max_tokens=max_tokens, temperature=0, ignore_eos=True
    )


def load_engine(plan: LoadPlan):
    report = lambda phase, done, total: None  # noqa: E731
    return engine_info(plan.engine).load_class().load(plan, weights.resolve(plan, report), report)


def engine_level(engine, concurrency: int, max_tokens: int) -> Level:
    async def run() -> list[StreamRecord]:
        start = time.perf_counter()

        async def one(index: int, prompt: str) -> StreamRecord:
            record = StreamRecord(sent=time.perf_counter() - start, expected=max_tokens)
            request = GenerationRequest.from_pb(generate_request(prompt, max_tokens), f"inprocess-{index}")
            async for chunk in engine.generate(request):
                record.arrivals.append((time.perf_counter() - start, len(chunk.token_ids)))
                if chunk.finish_reason is not None:
                    record.finish = chunk.finish_reason.name.lower()
            return record

        return await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts(concurrency))))

    return Level(asyncio.run(run()))


def runner_level(runner, concurrency: int, max_tokens: int) -> Level:
    start = time.perf_counter()
    ids = list(range(1, concurrency + 1))
    records = {i: StreamRecord(sent=0.0, expected=max_tokens, finish="length") for i in ids}
    prompt_ids = {i: runner.tokenize(p) for i, p in zip(ids, prompts(concurrency), strict=True)}
    cold = GenerationRequest("baseline", SamplingParams(), cache_prompt=False)  # one context, no cache
    for sequence_id, tokens in prompt_ids.items():
        runner.admit(sequence_id, tokens, cold)
    rows = runner.prefill(list(prompt_ids.items()))
    last = {}
    for step in range(max_tokens):
        if step:
            rows = runner.decode(last)
        now = time.perf_counter() - start
        for sequence_id, row in zip(ids, rows, strict=True):
            last[sequence_id] = int(row.argmax())
            records[sequence_id].arrivals.append((now, 1))
    for sequence_id in ids:
        runner.release(sequence_id)
    return Level(list(records.values()))


class HfGenerate:
    """transformers' model.generate on the plan's weights, loaded as the engine loads them."""

    def __init__(self, plan: LoadPlan):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        options = plan.engine_options
        if options.get("n_threads"):
            torch.set_num_threads(int(options["n_threads"]))
        path = weights.resolve(plan, lambda *_: None)
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModelForCausalLM.from_pretrained(
            path, dtype=torch.float32, attn_implementation="sdpa"
        ).eval()
        self.torch = torch

    def level(self, concurrency: int, max_tokens: int) -> Level:
        from transformers.generation.streamers import BaseStreamer

        if concurrency != 1:
            raise ValueError("hf-generate runs one stream at a time")
        start = time.perf_counter()
        record = StreamRecord(sent=0.0, expected=max_tokens)

        class Clock(BaseStreamer):
            prompt_seen = False

            def put(self, value) -> None:  # first the prompt, then each new token
                if self.prompt_seen:
                    record.arrivals.append((time.perf_counter() - start, int(value.numel())))
                self.prompt_seen = True

            def end(self) -> None:
                record.finish = "length" if record.tokens == max_tokens else "stop"

        inputs = self.tokenizer(prompts(1)[0], return_tensors="pt")
        with self.torch.inference_mode():
            self.model.generate(
                **inputs,
                max_new_tokens=max_tokens,
                min_new_tokens=max_tokens,
                do_sample=False,
                streamer=Clock(),
                pad_token_id=self.tokenizer.pad_token_id or 0,
            )
        return Level([record])


def main() -> None:
    mode, plan = sys.argv[1], LoadPlan.from_json_dict(json.loads(sys.argv[2]))
    started = time.perf_counter()
    if mode == "engine":
        engine = asyncio.run(on_a_thread_of_its_own(load_engine, plan))  # as the worker loads it
        run = lambda c, m: engine_level(engine, c, m)  # noqa: E731
    elif mode == "runner":
        engine = load_engine(plan)
        engine.batcher.close()  # its thread stops: the runner is this loop's alone
        run = lambda c, m: runner_level(engine.runner, c, m)  # noqa: E731
    elif mode == "hf-generate":
        run = HfGenerate(plan).level
    else:
        raise SystemExit(f"unknown mode {mode!r}: engine, runner or hf-generate")
    print(json.dumps({"ready": True, "load_s": time.perf_counter() - started}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        print(json.dumps(run(request["concurrency"], request["max_tokens"]).to_json()), flush=True)


if __name__ == "__main__":
    main()
