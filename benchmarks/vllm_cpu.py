"""vLLM's CPU build against the Transformers engine, both served by llmgrpc (``make bench-vllm``).

One llmgrpc server; the ~100M-parameter benchmark model launched on Transformers (in the
server's environment) and on vLLM (its workers on the vLLM environment's python), both in
float32 so that they compute the same thing. At each level, that many greedy streams are
sent at once to each engine in turn (the order rotating each repetition); the report gives
aggregate streamed tokens per second and time to first token, medians over repetitions,
and how long each launch took. Every stream's token count is checked.

Then the host check: the tiny model on vLLM decodes one long stream (steps of about 1.5 ms,
where vLLM's CPU processes spend the most time waiting on each other) while a separate idle
process sleeps 10 ms at a time; the report gives the longest its wake-ups came late, i.e. the
longest a light process on this host (a health probe, the gRPC server) waited for a CPU.

Then multi-turn conversations (conversations.py): a 10-turn chat as raw prompts, once alone and
once as 8 conversations of 6 turns at once, time to first token per turn, on the Transformers
engine with its prefix cache, the same with ``cache_prompt: false``, and vLLM's own OpenAI
server (``vllm serve``, prefix caching on) on the same model folder. Prompts go as token ids,
the same ids to every system.

    python benchmarks/vllm_cpu.py --vllm-python .venv-vllm/bin/python [--quick] [--out FILE]
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

import conversations
import models
from host_latency import idle_sleeper
from models import BENCH_MODEL, TINY
from report import table, verdict
from servers import Llmgrpc, OutsideLoad, VllmServer
from streams import GrpcStreams, median, percentile, run_level

from llmgrpc.clients import Client
from llmgrpc.engines.catalogue import engine_info

HERE = Path(__file__).parent
ROOT = HERE.parent
KV_CACHE_BYTES = 1 << 30
HOST_CHECK_TOKENS = 15_000
HOST_CHECK_LAUNCH = {"dtype": "float32", "kv_cache_memory_bytes": 1 << 28, "max_model_len": 16384}
LAUNCHES = {
    "Transformers": {"dtype": "float32"},
    "vLLM": {"dtype": "float32", "kv_cache_memory_bytes": KV_CACHE_BYTES, "max_model_len": 2048},
}
# vLLM's own server in the multi-turn runs: what the vLLM launch above gets, prefix caching on,
# and the cached prompt tokens in each answer's usage.
VLLM_SERVE_OPTIONS = (
    "--dtype=float32",
    f"--kv-cache-memory-bytes={KV_CACHE_BYTES}",
    f"--max-model-len={conversations.CONTEXT_PER_CONVERSATION}",
    "--enable-prefix-caching",
    "--enable-prompt-tokens-details",
)


async def measure(endpoint: str, uid: str, levels: list[int], tokens: int, reps: int) -> dict:
    streams = GrpcStreams(endpoint, uid)
    try:
        await run_level(streams.opener(8), 2, 8)  # warm-up
        results = {}
        for level in levels:
            outside = OutsideLoad()
            runs = [await run_level(streams.opener(tokens), level, tokens) for _ in range(reps)]
            problems = [p for run in runs for p in run.problems]
            if problems:
                raise RuntimeError(f"{uid}, {level} streams: {problems[:3]}")
            results[level] = {
                "tokens_per_s": median([run.tokens_per_s for run in runs]),
                "ttft_p50_ms": 1000 * median([percentile(run.ttfts(), 50) for run in runs]),
                "spread": [min(run.tokens_per_s for run in runs), max(run.tokens_per_s for run in runs)],
                "outside_cores": outside.cores(),
            }
            print(f"  {uid:<14} {level:>3} streams: {json.dumps(results[level])}", flush=True)
        return results
    finally:
        await streams.close()


async def multiturn(args: argparse.Namespace, endpoint: str, hf_dir: Path) -> dict:
    """The multi-turn workload on the Transformers model (prefix cache on, then off) and on vLLM's
    own server for the same folder."""
    turns, concurrent_turns = (3, 2) if args.quick else (conversations.TURNS, conversations.CONCURRENT_TURNS)
    log = args.work_dir / "logs" / "vllm-serve-multiturn.log"
    peer = VllmServer(
        log, args.vllm_python, hf_dir, "vllm-multiturn", *VLLM_SERVE_OPTIONS, env=vllm_environment()
    )
    llmgrpc_chat = partial(conversations.LlmgrpcChat, endpoint, "transformers")
    chats = {
        "llmgrpc Transformers, prefix cache": llmgrpc_chat(cache_prompt=True),
        "llmgrpc Transformers, cache_prompt false": llmgrpc_chat(cache_prompt=False),
        "vLLM serve, prefix caching": conversations.CompletionsChat(
            peer.port, "vllm-multiturn", ignore_eos=True, stream_options={"include_usage": True}
        ),
    }
    try:
        text_of, load_before = conversations.TextOf(hf_dir), os.getloadavg()
        script = partial(conversations.Script, text_of, ids=True)
        systems = await conversations.measure(chats, script, args.reps, turns, concurrent_turns)
        load = conversations.load_line(systems, load_before)
        return {"turns": turns, "concurrent_turns": concurrent_turns, "systems": systems, "load": load}
    finally:
        for chat in chats.values():
            await chat.close()
        peer.stop()


async def host_check(endpoint: str, uid: str, tokens: int) -> dict:
    """One stream of tokens from uid while an idle process on this host measures its wake-ups."""
    streams = GrpcStreams(endpoint, uid)
    try:
        with idle_sleeper() as sleeper:
            run = await run_level(streams.opener(tokens), 1, tokens)
        if run.problems:
            raise RuntimeError(f"{uid}, one stream of {tokens} tokens: {run.problems}")
        return {"tokens": tokens, "tokens_per_s": run.tokens_per_s, **sleeper}
    finally:
        await streams.close()


def write_report(path: Path, results: dict, args: argparse.Namespace, machine: dict) -> None:
    engines = list(results["levels"])
    load_start, load_end = results["load_average"]
    lines = [
        "# vLLM (CPU build) and Transformers, both served by llmgrpc",
        "",
        f"Generated by `{results['command']}` in {results['duration_s']:.0f} s on {machine['cpu']} "
        f"({machine['cores']} cores); model `{results['model']}` in float32, {args.tokens} greedy tokens "
        f"per stream, medians of {args.reps} repetitions (spread: min-max). The machine's 1-minute "
        f"load average: {load_start:.2f} at the start, {load_end:.2f} at the end.",
        "",
        *target_lines(results),
        "| streams | " + " | ".join(f"{e} tok/s | {e} TTFT p50" for e in engines) + " |",
        "| --- | " + " | ".join("---: | ---:" for _ in engines) + " |",
    ]
    levels = list(results["levels"][engines[0]])
    for level in levels:
        cells = []
        for engine in engines:
            row = results["levels"][engine][level]
            low, high = row["spread"]
            cells.append(f"{row['tokens_per_s']:.0f} ({low:.0f}-{high:.0f}) | {row['ttft_p50_ms']:.0f} ms")
        lines.append(f"| {level} | " + " | ".join(cells) + " |")
    lines += [
        "",
        f"Cores that other processes kept busy during each level ({', '.join(map(str, levels))} streams): "
        + "; ".join(
            f"{engine} "
            + ", ".join(f"{row['outside_cores']:.2f}" for row in results["levels"][engine].values())
            for engine in engines
        )
        + ".",
        "",
        "Launch to READY (weights cached): "
        + ", ".join(f"{e} {s:.1f} s" for e, s in results["launch_s"].items())
        + ".",
        "",
        *host_check_lines(results.get("host_check")),
        "vLLM's workers ran with "
        + ", ".join(f"`{name}={value}`" for name, value in machine["vllm_environment"].items())
        + " (the engine's CPU defaults, engines/catalogue.py, unless this run's environment set them).",
        "",
        *multiturn_lines(results.get("multiturn")),
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))


# The Transformers engine against vLLM at the busiest level: tok/s at least this share of
# vLLM's, TTFT p50 at most this multiple of vLLM's.
TOKENS_SHARE_GOAL = 0.7
TTFT_MULTIPLE_GOAL = 2.0


def target_lines(results: dict) -> list[str]:
    levels = results["levels"]
    if not {"Transformers", "vLLM"} <= levels.keys():
        return []
    busiest = max(levels["vLLM"])
    ours, theirs = levels["Transformers"][busiest], levels["vLLM"][busiest]
    share = ours["tokens_per_s"] / theirs["tokens_per_s"]
    multiple = ours["ttft_p50_ms"] / theirs["ttft_p50_ms"]
    rows = [
        [
            f"{busiest} streams: Transformers tok/s ÷ vLLM's",
            f"≥ {TOKENS_SHARE_GOAL}×",
            f"{share:.2f}× ({ours['tokens_per_s']:.0f} / {theirs['tokens_per_s']:.0f})",
            verdict(share >= TOKENS_SHARE_GOAL),
        ],
        [
            f"{busiest} streams: Transformers TTFT p50 ÷ vLLM's",
            f"≤ {TTFT_MULTIPLE_GOAL:g}×",
            f"{multiple:.2f}× ({ours['ttft_p50_ms']:.0f} / {theirs['ttft_p50_ms']:.0f} ms)",
            verdict(multiple <= TTFT_MULTIPLE_GOAL),
        ],
    ]
    return [table(["target", "goal", "measured", ""], rows), ""]


def multiturn_lines(section: dict | None) -> list[str]:
    if section is None:
        return []
    return [
        "## Multi-turn conversations: the prefix cache",
        "",
        f"{conversations.workload_line()} The prompts go as token ids: the beginning-of-text token, "
        "each text's ids and the answers' ids as the server streamed them, so every system gets the "
        "same ids for the same history and each turn's prompt begins with the previous turn's, token "
        "for token. Systems: llmgrpc's Transformers engine (the launch above) with its prefix cache "
        "(the default), the same model with `cache_prompt: false` on every request, and vLLM's own "
        f"OpenAI server (`vllm serve {' '.join(VLLM_SERVE_OPTIONS)}`, in the environment above), all "
        "greedy with `ignore_eos`; TTFT is the time to the first streamed token, measured by a client "
        "on this host.",
        "",
        *conversations.table_lines(section["systems"], section["turns"], section["concurrent_turns"]),
        "",
        section["load"],
        "",
    ]


def host_check_lines(check: dict | None) -> list[str]:
    if check is None:
        return []
    return [
        f"Host check: the tiny model on vLLM streamed {check['tokens']} tokens at "
        f"{check['tokens_per_s']:.0f} tok/s; meanwhile an idle process on the same host, waking every "
        f"10 ms, waited at most {check['longest_wait_ms']:.0f} ms for a CPU.",
        "",
    ]


async def run(args: argparse.Namespace) -> dict:
    work = args.work_dir
    (work / "logs").mkdir(parents=True, exist_ok=True)
    model = TINY if args.quick else BENCH_MODEL
    model_path = ""
    if model == BENCH_MODEL:
        hf_dir, _ = models.build_bench_model(work / "models")
        model_path = str(hf_dir)
    families = models.write_families(work / "families")
    server = Llmgrpc(
        work / "logs" / "llmgrpc-vllm.log",
        *("--cache-dir", str(work / "cache"), "--families-dir", str(families), "--device", "cpu"),
        *("--max-running-requests", str(max(*args.levels, conversations.CONCURRENT))),
        *("--allowed-model-dirs", str(work / "models")),
        *("--worker-python", json.dumps({"vLLM": str(Path(args.vllm_python).absolute())})),
        # the families folder also holds the firehose family, whose engine is a plugin
        *("--engine-plugins", "firehose:ENGINE_INFO"),
        env={"PYTHONPATH": str(HERE)},
    )
    results: dict = {"model": model, "launch_s": {}, "levels": {}}
    try:
        server.wait_ready()
        with Client(server.endpoint) as client:
            for engine, options in LAUNCHES.items():
                started = time.perf_counter()
                client.launch(
                    model,
                    model_engine=engine,
                    model_format="pytorch",
                    model_uid=f"{engine.lower()}",
                    model_path=model_path,
                    engine_options=options,
                    timeout=900,
                )
                results["launch_s"][engine] = time.perf_counter() - started
        for engine in LAUNCHES:
            results["levels"][engine] = await measure(
                server.endpoint, engine.lower(), args.levels, args.tokens, args.reps
            )
        if not args.quick:
            with Client(server.endpoint) as client:
                client.launch(
                    TINY,
                    model_engine="vLLM",
                    model_uid="vllm-tiny",
                    engine_options=HOST_CHECK_LAUNCH,
                    timeout=900,
                )
            results["host_check"] = await host_check(server.endpoint, "vllm-tiny", HOST_CHECK_TOKENS)
        with Client(server.endpoint) as client:  # their CPU and memory go to the multi-turn runs
            for uid in ("vllm", "vllm-tiny") if not args.quick else ("vllm",):
                client.terminate(uid, timeout=120)
        hf_dir = Path(model_path) if model_path else work / "cache" / TINY / "pytorch"
        results["multiturn"] = await multiturn(args, server.endpoint, hf_dir)
    finally:
        server.stop()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--vllm-python", required=True, help="python of the environment that has vLLM")
    parser.add_argument("--quick", action="store_true", help="the tiny model, few tokens: a smoke run")
    parser.add_argument("--levels", type=lambda s: [int(x) for x in s.split(",")], default=[1, 4, 16])
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--work-dir", type=Path, default=ROOT / "build" / "bench")
    parser.add_argument(
        "--out", type=Path, help="the report (default: docs/benchmarks-vllm.md, or build/bench-quick)"
    )
    args = parser.parse_args()
    args.out = args.out or ROOT / ("build/bench-quick" if args.quick else "docs") / "benchmarks-vllm.md"
    if args.quick:
        args.levels, args.tokens, args.reps = [1, 4], 16, 1
    started, load_before = time.perf_counter(), os.getloadavg()[0]
    results = asyncio.run(run(args))
    results["duration_s"] = time.perf_counter() - started
    results["load_average"] = (load_before, os.getloadavg()[0])
    results["command"] = "make bench-vllm" if not args.quick else "make bench-vllm BENCH_ARGS=--quick"
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    cpu = next(line for line in cpuinfo if line.startswith("model name"))
    machine = {
        "cpu": cpu.split(":", 1)[1].strip(),
        "cores": os.cpu_count(),
        "vllm_environment": vllm_environment(),
    }
    (args.work_dir / "vllm-multiturn.json").write_text(json.dumps(results["multiturn"], indent=1))
    write_report(args.out, results, args, machine)
    print(f"report: {args.out}")
    problems = conversations.llmgrpc_problems(results["multiturn"]["systems"])
    if problems:
        print("llmgrpc problems in the multi-turn runs:", *problems[:10], sep="\n  ")
        sys.exit(1)


def vllm_environment() -> dict[str, str]:
    """The vLLM engine's CPU defaults (engines/catalogue.py), unless this run's environment sets them."""
    return {name: os.environ.get(name, value) for name, value in engine_info("vLLM").cpu_environment}


if __name__ == "__main__":
    main()
