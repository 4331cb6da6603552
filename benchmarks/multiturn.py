"""Multi-turn conversations: time to first token per turn, with and without a prefix cache.

The workload is a chat sent as raw prompts: a system text of SYSTEM_TOKENS tokens, then per
turn about USER_TOKENS new user tokens and a greedy answer of ANSWER_TOKENS tokens, each
turn's prompt holding the whole history with the real earlier answers. It runs as one
conversation of TURNS turns, and as CONCURRENT conversations of CONCURRENT_TURNS turns at
once. Each system gets conversations of its own text, so no system is served from another's
cache.

Systems, on the 100M bench model's GGUF (Q4_K_M), every core:

- llmgrpc, llama.cpp engine, with its prefix cache (the default);
- llmgrpc, the same model, every request with ``cache_prompt: false``: the whole prompt
  prefilled each turn, as before the cache;
- xllamacpp (llama.cpp's own server), ``cache_prompt`` on, one slot per conversation.

    python benchmarks/multiturn.py [--quick] [--reps N] [--out DIR] [--work-dir DIR]

Writes multiturn.json into the work folder and benchmarks-multiturn.md into --out (docs, or
build/bench-quick with --quick); exits 1 if an llmgrpc answer ends short.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import models
from models import BENCH_MODEL, QUANTIZATION, TINY
from servers import XllamacppServer
from suite import FULL, QUICK, ROOT, Bench

from llmgrpc.clients import Client
from llmgrpc.v1 import generate_pb2, generate_pb2_grpc

SYSTEM_TOKENS = 300
USER_TOKENS = 120
ANSWER_TOKENS = 32
TURNS = 10
CONCURRENT = 8
CONCURRENT_TURNS = 6
CONTEXT_PER_SLOT = 2560  # the longest conversation's prompt and answer fit
WORDS = (
    "the of and to in is was for on that with as by at from it an be this are or have which "
    "one had not but what all were when we there can more if no out so said time up use about "
    "many then them these some her would make like him into has look two write go see number "
    "way could people than first water been call who oil its now find long down day did get come"
).split()


@dataclass
class Turn:
    ttft_s: float
    tokens: int
    cached: int = -1  # prompt tokens served from the prefix cache (-1: the server does not say)


@dataclass
class Conversation:
    turns: list[Turn] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


class TextOf:
    """Texts of about a given number of tokens, from the bench model's own tokenizer."""

    def __init__(self, hf_dir: Path):
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(hf_dir)

    def __call__(self, rng: random.Random, tokens: int) -> str:
        words: list[str] = []
        while len(self.tokenizer(" ".join(words), add_special_tokens=False).input_ids) < tokens:
            words.extend(rng.choice(WORDS) for _ in range(max(1, (tokens // 2) // 4)))
        return " ".join(words)


class Script:
    """One conversation's user turns, drawn from its seed."""

    def __init__(self, text_of: TextOf, seed: int, turns: int):
        rng = random.Random(seed)
        self.system = f"System {seed}: " + text_of(rng, SYSTEM_TOKENS)
        self.users = [text_of(rng, USER_TOKENS) for _ in range(turns)]

    def prompt(self, answers: list[str]) -> str:
        parts = [self.system]
        for user, answer in zip(self.users, [*answers, None], strict=False):
            parts.append(f"\nUser: {user}\nAssistant:")
            if answer is None:
                break
            parts.append(answer)
        return "".join(parts)


class LlmgrpcChat:
    def __init__(self, endpoint: str, uid: str, cache_prompt: bool):
        self.channel = grpc.aio.insecure_channel(endpoint)
        self.stub = generate_pb2_grpc.GenerateServiceStub(self.channel)
        self.uid, self.cache_prompt = uid, cache_prompt

    async def answer(self, prompt: str) -> tuple[str, Turn]:
        request = generate_pb2.GenerateRequest(
            model_uid=self.uid,
            prompt=prompt,
            max_tokens=ANSWER_TOKENS,
            temperature=0,
            ignore_eos=True,
            cache_prompt=self.cache_prompt,
        )
        sent, first, text, tokens, cached = time.perf_counter(), None, [], 0, 0
        async for response in self.stub.Generate(request, timeout=600):
            first = first or time.perf_counter()
            text.append(response.text)
            tokens += len(response.token_ids)
            if response.HasField("usage"):
                cached = response.usage.cached_prompt_tokens
        return "".join(text), Turn((first or sent) - sent, tokens, cached)

    async def close(self) -> None:
        await self.channel.close()


class XllamacppChat:
    def __init__(self, port: int, end_of_text_ids: list[int]):
        self.port = port
        self.logit_bias = {str(token): -100.0 for token in end_of_text_ids}

    async def answer(self, prompt: str) -> tuple[str, Turn]:
        body = json.dumps(
            {
                "prompt": prompt,
                "max_tokens": ANSWER_TOKENS,
                "temperature": 0,
                "stream": True,
                "cache_prompt": True,
                "logit_bias": self.logit_bias,
            }
        ).encode()
        sent, first, text = time.perf_counter(), None, []
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        try:
            writer.write(
                b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body)
            )
            status = await reader.readline()
            if b" 200 " not in status:
                raise RuntimeError(f"HTTP {status.decode(errors='replace').strip()}")
            async for line in reader:
                if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
                    continue
                choice = (json.loads(line[6:]).get("choices") or [{}])[0]
                if choice.get("text"):
                    first = first or time.perf_counter()
                    text.append(choice["text"])
        finally:
            writer.close()
        return "".join(text), Turn((first or sent) - sent, ANSWER_TOKENS)

    async def close(self) -> None:
        pass


async def converse(chat, script: Script, turns: int) -> Conversation:
    conversation, answers = Conversation(), []
    for _ in range(turns):
        try:
            answer, turn = await chat.answer(script.prompt(answers))
        except Exception as error:  # recorded as this conversation's problem
            conversation.problems.append(f"{type(error).__name__}: {error}"[:200])
            break
        conversation.turns.append(turn)
        answers.append(answer)
    return conversation


async def measure(chats: dict, text_of: TextOf, reps: int, turns: int, concurrent_turns: int) -> dict:
    """Per system: the one conversation's turns, and the concurrent run's tokens/s, per repetition."""
    results: dict = {name: {"single": [], "concurrent": []} for name in chats}
    seeds = iter(range(1, 1_000_000))
    for _ in range(reps):
        for name, chat in chats.items():
            single = await converse(chat, Script(text_of, next(seeds), turns), turns)
            scripts = [Script(text_of, next(seeds), concurrent_turns) for _ in range(CONCURRENT)]
            started = time.perf_counter()
            together = await asyncio.gather(*(converse(chat, s, concurrent_turns) for s in scripts))
            wall = time.perf_counter() - started
            tokens = sum(turn.tokens for c in together for turn in c.turns)
            results[name]["single"].append(
                {
                    "ttft_s": [turn.ttft_s for turn in single.turns],
                    "cached": [turn.cached for turn in single.turns],
                    "tokens": [turn.tokens for turn in single.turns],
                    "seconds": sum(turn.ttft_s for turn in single.turns),
                    "problems": single.problems,
                }
            )
            results[name]["concurrent"].append(
                {
                    "tokens_per_s": tokens / wall,
                    "tokens": tokens,
                    "wall_s": wall,
                    "problems": [p for c in together for p in c.problems],
                }
            )
            print(
                f"{name}: turn TTFTs {[round(t * 1000) for t in results[name]['single'][-1]['ttft_s']]} ms,"
                f" {CONCURRENT} at once {tokens / wall:.1f} tok/s",
                flush=True,
            )
    return results


def spread(values: list[float], scale: float = 1.0, digits: int = 0) -> str:
    """median (min-max) of values times scale."""
    shown = [round(v * scale, digits) if digits else round(v * scale) for v in values]
    middle = statistics.median(values) * scale
    middle = round(middle, digits) if digits else round(middle)
    return f"{middle}" + (f" ({min(shown)}-{max(shown)})" if len(values) > 1 else "")


def write_report(results: dict, out: Path, meta: dict) -> Path:
    turns = meta["turns"]
    lines = [
        "# Multi-turn conversations: the prefix cache",
        "",
        f"Written by `{meta['command']}` ({meta['duration_s']:.0f} s, {meta['machine']}). "
        f"Model: {meta['model']} (GGUF {QUANTIZATION}), every system on {meta['threads']} threads. "
        f"A conversation: a {SYSTEM_TOKENS}-token system text, then per turn about {USER_TOKENS} new "
        f"user tokens and a {ANSWER_TOKENS}-token greedy answer, each turn one raw prompt holding the "
        "whole history. Median over repetitions (min-max); each repetition has new conversations.",
        "",
        f"| system | turn 1 TTFT (ms) | turn {turns} TTFT (ms) | turn {turns} / turn 1 | "
        f"cached tokens at turn {turns} | TTFTs of the conversation (s) | "
        f"{CONCURRENT} conversations x {meta['concurrent_turns']} turns (tok/s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, result in results.items():
        singles = [s for s in result["single"] if len(s["ttft_s"]) == turns]
        if not singles:
            lines.append(f"| {name} | failed: {result['single'][0]['problems'][:1]} | | | | | |")
            continue
        first = [s["ttft_s"][0] for s in singles]
        last = [s["ttft_s"][-1] for s in singles]
        ratio = [b / a for a, b in zip(first, last, strict=True)]
        cached = [s["cached"][-1] for s in singles]
        lines.append(
            f"| {name} | {spread(first, 1000)} | {spread(last, 1000)} | {spread(ratio, 1, 2)} | "
            f"{spread(cached) if min(cached) >= 0 else 'not reported'} | "
            f"{spread([s['seconds'] for s in singles], 1, 2)} | "
            f"{spread([c['tokens_per_s'] for c in result['concurrent']], 1, 1)} |"
        )
    lines += ["", f"TTFT per turn, ms (median over repetitions), turns 1 to {turns}:", ""]
    for name, result in results.items():
        singles = [s for s in result["single"] if len(s["ttft_s"]) == turns]
        if singles:
            per_turn = [
                round(statistics.median(s["ttft_s"][t] for s in singles) * 1000) for t in range(turns)
            ]
            lines.append(f"- {name}: {per_turn}")
    lines += [
        "",
        "Targets (issue: prefix caching): turn-10 TTFT within 1.5x of turn 1; llmgrpc's turn-10 TTFT at "
        "most xllamacpp's; llmgrpc's tokens/s in the concurrent case at least xllamacpp's.",
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
            options = {"context_length": CONTEXT_PER_SLOT * CONCURRENT}
            bench.launch(client, model, "llama.cpp", uid, options)
            chats["llmgrpc, prefix cache"] = LlmgrpcChat(server.endpoint, uid, cache_prompt=True)
            chats["llmgrpc, cache_prompt false"] = LlmgrpcChat(server.endpoint, uid, cache_prompt=False)
            peer = bench.keep(
                XllamacppServer(
                    bench.logs / "xllamacpp-multiturn.log", model_file, threads, CONCURRENT, CONTEXT_PER_SLOT
                )
            )
            chats["xllamacpp, cache_prompt"] = XllamacppChat(peer.port, models.end_of_text_ids(hf_dir))
            return await measure(chats, TextOf(hf_dir), reps, turns, concurrent_turns) | {
                "_meta": {"model": model, "turns": turns, "concurrent_turns": concurrent_turns}
            }
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
    ours = [
        p
        for name, r in results.items()
        if name.startswith("llmgrpc")
        for rep in r["single"]
        for p in rep["problems"]
    ]
    ours += [
        p
        for name, r in results.items()
        if name.startswith("llmgrpc")
        for rep in r["concurrent"]
        for p in rep["problems"]
    ]
    short = [
        t
        for name, r in results.items()
        if name.startswith("llmgrpc")
        for rep in r["single"]
        for t in rep["tokens"]
        if t != ANSWER_TOKENS
    ]
    if ours or short:
        print("llmgrpc problems:", *ours[:10], f"{len(short)} short answers", sep="\n  ")
        sys.exit(1)


if __name__ == "__main__":
    main()
