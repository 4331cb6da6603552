"""Multi-turn conversations on llama.cpp: time to first token per turn, with and without a prefix cache.

The workload (conversations.py): a 10-turn chat sent as raw text prompts, each turn's prompt
holding the whole history with the real earlier answers, once as one conversation and once as
8 conversations of 6 turns at once; every system gets the same conversations.

Systems, on the 100M bench model's GGUF (Q4_K_M), every core:

- llmgrpc, llama.cpp engine, with its prefix cache (the default);
- llmgrpc, the same model, every request with ``cache_prompt: false``: the whole prompt
  prefilled each turn, as before the cache;
- xllamacpp (llama.cpp's own server), ``cache_prompt`` on, one slot per conversation.

The same workload on Transformers against vLLM's CPU build is part of ``make bench-vllm``
(vllm_cpu.py, docs/benchmarks-vllm.md).

    python benchmarks/multiturn.py [--quick] [--reps N] [--out DIR] [--work-dir DIR]

Writes multiturn.json into the work folder and benchmarks-multiturn.md into --out (docs, or
build/bench-quick with --quick); exits 1 if an llmgrpc answer ends short.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from functools import partial
from pathlib import Path

import models
from conversations import (
    CONCURRENT,
    CONCURRENT_TURNS,
    CONTEXT_PER_CONVERSATION,
    TURNS,
    CompletionsChat,
    LlmgrpcChat,
    Script,
    TextOf,
    llmgrpc_problems,
    load_line,
    measure,
    table_lines,
    workload_line,
)
from models import BENCH_MODEL, QUANTIZATION, TINY
from servers import XllamacppServer
from suite import FULL, QUICK, ROOT, Bench

from llmgrpc.clients import Client


def write_report(results: dict, out: Path, meta: dict) -> Path:
    lines = [
        "# Multi-turn conversations: the prefix cache",
        "",
        f"Written by `{meta['command']}` ({meta['duration_s']:.0f} s, {meta['machine']}). "
        f"Model: {meta['model']} (GGUF {QUANTIZATION}), every system on {meta['threads']} threads. "
        f"{workload_line()} Prompts are sent as text.",
        "",
        *table_lines(results, meta["turns"], meta["concurrent_turns"]),
        "",
        "Further targets (issue: prefix caching): llmgrpc's turn-10 TTFT at most xllamacpp's; llmgrpc's "
        "tokens/s in the concurrent case at least xllamacpp's. The same workload on Transformers against "
        "vLLM's CPU build: [benchmarks-vllm.md](benchmarks-vllm.md).",
        "",
        meta["load"],
        "",
    ]
    out.mkdir(parents=True, exist_ok=True)
    path = out / "benchmarks-multiturn.md"
    path.write_text("\n".join(lines))
    return path


async def run(bench: Bench, quick: bool, threads: int, reps: int) -> dict:
    model = TINY if quick else BENCH_MODEL
    if quick:
        model_file = bench.cache_dir / TINY / "ggufv2" / f"{TINY}.{QUANTIZATION}.gguf"
        hf_dir = bench.cache_dir / TINY / "pytorch"
    else:
        hf_dir, gguf_dir = models.build_bench_model(bench.work / "models")
        model_file = gguf_dir / f"{BENCH_MODEL}.{QUANTIZATION}.gguf"
    turns, concurrent_turns = (3, 2) if quick else (TURNS, CONCURRENT_TURNS)
    server = bench.keep(bench.llmgrpc("llmgrpc-multiturn", CONCURRENT))
    server.wait_ready()
    chats: dict = {}
    try:
        with Client(server.endpoint) as client:
            uid = "multiturn-llama.cpp"
            options = {"context_length": CONTEXT_PER_CONVERSATION * CONCURRENT}
            bench.launch(client, model, "llama.cpp", uid, options)
            chats["llmgrpc, prefix cache"] = LlmgrpcChat(server.endpoint, uid, cache_prompt=True)
            chats["llmgrpc, cache_prompt false"] = LlmgrpcChat(server.endpoint, uid, cache_prompt=False)
            log = bench.logs / "xllamacpp-multiturn.log"
            peer = bench.keep(XllamacppServer(log, model_file, threads, CONCURRENT, CONTEXT_PER_CONVERSATION))
            never_end = {str(token): -100.0 for token in models.end_of_text_ids(hf_dir)}
            chats["xllamacpp, cache_prompt"] = CompletionsChat(
                peer.port, cache_prompt=True, logit_bias=never_end
            )
            text_of, load_before = TextOf(hf_dir), os.getloadavg()
            results = await measure(chats, partial(Script, text_of), reps, turns, concurrent_turns)
            meta = {"model": model, "turns": turns, "concurrent_turns": concurrent_turns}
            return results | {"_meta": meta | {"load": load_line(results, load_before)}}
    finally:
        for chat in chats.values():
            await chat.close()
        await bench.close()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="a smoke run: the tiny model, 3 turns")
    parser.add_argument("--out", type=Path, help="report folder (default: docs, or build/bench-quick)")
    parser.add_argument("--work-dir", type=Path, default=ROOT / "build" / "bench")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--reps", type=int, help="repetitions (default 3, or 1 with --quick)")
    args = parser.parse_args()
    reps = args.reps or (1 if args.quick else 3)
    out = args.out or (ROOT / "build" / "bench-quick" if args.quick else ROOT / "docs")
    args.work_dir.mkdir(parents=True, exist_ok=True)
    bench = Bench(QUICK if args.quick else FULL, args.work_dir, args.threads)
    started = time.perf_counter()
    results = asyncio.run(run(bench, args.quick, args.threads, reps))
    meta = results.pop("_meta")
    meta.update(
        command=" ".join([os.path.relpath(sys.executable), os.path.relpath(sys.argv[0]), *sys.argv[1:]]),
        duration_s=time.perf_counter() - started,
        machine=f"{os.cpu_count()} CPU cores",
        threads=args.threads,
    )
    (args.work_dir / "multiturn.json").write_text(json.dumps({"results": results, **meta}, indent=1))
    print(f"report: {write_report(results, out, meta)}")
    problems = llmgrpc_problems(results)
    if problems:
        print("llmgrpc problems:", *problems[:10], sep="\n  ")
        sys.exit(1)


if __name__ == "__main__":
    main()
