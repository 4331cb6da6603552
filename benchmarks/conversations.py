"""The multi-turn workload: conversations sent turn by turn, each turn's time to first token,
and their report table (multiturn.py measures it on llama.cpp, vllm_cpu.py on Transformers
and vLLM).

A conversation is a chat sent as raw prompts (no chat template): a system text of
SYSTEM_TOKENS tokens, then per turn about USER_TOKENS new user tokens and a greedy answer of
ANSWER_TOKENS tokens, each turn's prompt holding the whole history with the real earlier
answers. It runs as one conversation of TURNS turns, and as CONCURRENT conversations of
CONCURRENT_TURNS turns at once. Prompts go as text, or as token ids (a Script given an
encoder): then the history is the beginning-of-text token, each piece's ids and the answers'
ids as the server streamed them, so a turn's prompt begins with the previous turn's token for
token, and every system gets exactly the same ids for the same history.

Each repetition draws new conversations and gives every system the same ones. A system's KV
cache thus never serves another's from an earlier repetition; within one, a system that reads
no cache (``cache_prompt: false``) follows the one that fills it, and peers are other servers.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from servers import OutsideLoad

from llmgrpc.v1 import generate_pb2, generate_pb2_grpc

SYSTEM_TOKENS = 300
USER_TOKENS = 120
ANSWER_TOKENS = 32
TURNS = 10
CONCURRENT = 8
CONCURRENT_TURNS = 6
CONTEXT_PER_CONVERSATION = 2560  # the longest conversation's prompt and answer fit
# Target (issue: prefix caching): the last turn's TTFT at most this multiple of the first's.
LAST_TURN_GOAL = 1.5
WORDS = (
    "the of and to in is was for on that with as by at from it an be this are or have which "
    "one had not but what all were when we there can more if no out so said time up use about "
    "many then them these some her would make like him into has look two write go see number "
    "way could people than first water been call who oil its now find long down day did get come"
).split()

Prompt = str | list[int]  # text, or token ids used as given


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
        while len(self.encode(" ".join(words))) < tokens:
            words.extend(rng.choice(WORDS) for _ in range(max(1, (tokens // 2) // 4)))
        return " ".join(words)

    def encode(self, text: str) -> list[int]:
        """text's token ids, without the beginning-of-text token."""
        return self.tokenizer(text, add_special_tokens=False).input_ids


class Script:
    """One conversation's user turns, drawn from its seed; as text, or as token ids with ids."""

    def __init__(self, text_of: TextOf, seed: int, turns: int, ids: bool = False):
        rng = random.Random(seed)
        system = f"System {seed}: " + text_of(rng, SYSTEM_TOKENS)
        users = [f"\nUser: {text_of(rng, USER_TOKENS)}\nAssistant:" for _ in range(turns)]
        self.system: Prompt = system
        self.users: list[Prompt] = users
        if ids:
            self.system = [text_of.tokenizer.bos_token_id, *text_of.encode(system)]
            self.users = [text_of.encode(user) for user in users]

    def prompt(self, answers: list[Prompt]) -> Prompt:
        """The next turn's prompt, after answers (text or ids, as the script is)."""
        prompt = self.system
        for user, answer in zip(self.users, [*answers, None], strict=False):
            prompt = prompt + user
            if answer is None:
                break
            prompt = prompt + answer
        return prompt


class LlmgrpcChat:
    """Generate on one llmgrpc model: a text prompt answers text, token ids answer token ids."""

    def __init__(self, endpoint: str, uid: str, cache_prompt: bool):
        self.channel = grpc.aio.insecure_channel(endpoint)
        self.stub = generate_pb2_grpc.GenerateServiceStub(self.channel)
        self.uid, self.cache_prompt = uid, cache_prompt

    async def answer(self, prompt: Prompt) -> tuple[Prompt, Turn]:
        request = generate_pb2.GenerateRequest(
            model_uid=self.uid,
            max_tokens=ANSWER_TOKENS,
            temperature=0,
            ignore_eos=True,
            cache_prompt=self.cache_prompt,
        )
        if isinstance(prompt, str):
            request.prompt = prompt
        else:
            request.prompt_token_ids.extend(prompt)
        sent, first, text, ids, cached = time.perf_counter(), None, [], [], 0
        async for response in self.stub.Generate(request, timeout=600):
            first = first or time.perf_counter()
            text.append(response.text)
            ids.extend(response.token_ids)
            if response.HasField("usage"):
                cached = response.usage.cached_prompt_tokens
        answer = "".join(text) if isinstance(prompt, str) else ids
        return answer, Turn((first or sent) - sent, len(ids), cached)

    async def close(self) -> None:
        await self.channel.close()


class CompletionsChat:
    """A streamed POST /v1/completions (OpenAI's API) with the body's extra fields for the
    server at hand. Token-id prompts ask for the answer's ids (return_token_ids, as vLLM
    names it); cached prompt tokens are read from the usage, where the server reports them."""

    def __init__(self, port: int, model: str = "", **extra: object):
        self.port, self.model, self.extra = port, model, extra

    async def answer(self, prompt: Prompt) -> tuple[Prompt, Turn]:
        as_ids = not isinstance(prompt, str)
        body = {"prompt": prompt, "max_tokens": ANSWER_TOKENS, "temperature": 0, "stream": True}
        body |= {"model": self.model} if self.model else {}
        body |= {"return_token_ids": True} if as_ids else {}
        encoded = json.dumps(body | self.extra).encode()
        sent, first, text, ids, cached = time.perf_counter(), None, [], [], -1
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        try:
            writer.write(
                b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(encoded), encoded)
            )
            status = await reader.readline()
            if b" 200 " not in status:
                raise RuntimeError(f"HTTP {status.decode(errors='replace').strip()}")
            async for line in reader:
                if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
                    continue
                event = json.loads(line[6:])
                details = (event.get("usage") or {}).get("prompt_tokens_details") or {}
                cached = details.get("cached_tokens", cached)
                choice = (event.get("choices") or [{}])[0]
                if choice.get("text") or choice.get("token_ids"):
                    first = first or time.perf_counter()
                    text.append(choice.get("text") or "")
                    ids.extend(choice.get("token_ids") or [])
        finally:
            writer.close()
        if as_ids:
            return ids, Turn((first or sent) - sent, len(ids), cached)
        return "".join(text), Turn((first or sent) - sent, ANSWER_TOKENS, cached)

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


async def measure(
    chats: dict, script: Callable[[int, int], Script], reps: int, turns: int, concurrent_turns: int
) -> dict:
    """Per system: the one conversation's turns, and the concurrent run's tokens/s, per
    repetition, with the cores other processes kept busy meanwhile. script(seed, turns) draws
    a conversation; every system gets the same ones (see the module's docstring)."""
    results: dict = {name: {"single": [], "concurrent": []} for name in chats}
    seeds = iter(range(1, 1_000_000))
    for _ in range(reps):
        single_script = script(next(seeds), turns)
        scripts = [script(next(seeds), concurrent_turns) for _ in range(CONCURRENT)]
        for name, chat in chats.items():
            outside = OutsideLoad()
            single = await converse(chat, single_script, turns)
            single_outside = outside.cores()
            outside = OutsideLoad()
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
                    "outside_cores": single_outside,
                    "problems": single.problems,
                }
            )
            results[name]["concurrent"].append(
                {
                    "tokens_per_s": tokens / wall,
                    "tokens": tokens,
                    "wall_s": wall,
                    "outside_cores": outside.cores(),
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


def workload_line() -> str:
    return (
        f"A conversation: a {SYSTEM_TOKENS}-token system text, then per turn about {USER_TOKENS} new "
        f"user tokens and a {ANSWER_TOKENS}-token greedy answer, each turn one raw prompt (no chat "
        "template) holding the whole history. Median over repetitions (min-max); each repetition has "
        "new conversations, the same for every system."
    )


def table_lines(results: dict, turns: int, concurrent_turns: int) -> list[str]:
    """The summary table, each system's TTFT per turn, and whether the last turn's TTFT met
    LAST_TURN_GOAL, as Markdown lines."""
    lines = [
        f"| system | turn 1 TTFT (ms) | turn {turns} TTFT (ms) | turn {turns} / turn 1 | "
        f"cached tokens at turn {turns} | TTFTs of the conversation (s) | "
        f"{CONCURRENT} conversations x {concurrent_turns} turns (tok/s) |",
        "|---|---|---|---|---|---|---|",
    ]
    per_turn, verdicts = [], []
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
        medians = [round(statistics.median(s["ttft_s"][t] for s in singles) * 1000) for t in range(turns)]
        per_turn.append(f"- {name}: {medians}")
        met = statistics.median(ratio) <= LAST_TURN_GOAL
        verdicts.append(f"{name} {'met' if met else 'not met'} ({statistics.median(ratio):.2f}x)")
    return [
        *lines,
        "",
        f"TTFT per turn, ms (median over repetitions), turns 1 to {turns}:",
        "",
        *per_turn,
        "",
        f"Target turn-{turns} TTFT within {LAST_TURN_GOAL}x of turn 1 (median ratio): "
        + "; ".join(verdicts)
        + ".",
    ]


def load_line(results: dict, load_before: tuple[float, ...]) -> str:
    """The machine's load: the 1-minute load average before and after, and the most cores
    other processes kept busy during one system's measurement."""
    outside = [
        run["outside_cores"] for result in results.values() for kind in result.values() for run in kind
    ]
    return (
        f"Machine load: 1-minute load average {load_before[0]:.2f} before the measurement, "
        f"{os.getloadavg()[0]:.2f} after; processes other than the benchmark's kept at most "
        f"{max(outside, default=0):.2f} cores busy during any one system's run "
        f"(median {statistics.median(outside or [0]):.2f})."
    )


def llmgrpc_problems(results: dict) -> list[str]:
    """The llmgrpc systems' failed conversations and short answers."""
    ours = [r for name, r in results.items() if name.startswith("llmgrpc")]
    problems = [
        p for r in ours for kind in ("single", "concurrent") for rep in r[kind] for p in rep["problems"]
    ]
    short = [t for r in ours for rep in r["single"] for t in rep["tokens"] if t != ANSWER_TOKENS]
    return problems + ([f"{len(short)} short answers"] if short else [])
