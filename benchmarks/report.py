"""The suite's report: the machine it ran on, and its results as Markdown tables and PNG plots.

The suite writes it at the end of a run; ``python benchmarks/report.py RESULTS.json OUT_DIR``
writes it again from a run's raw results (``build/bench/results.json``).
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import psutil
from streams import median

PACKAGES = (
    "llmgrpc",
    "grpcio",
    "protobuf",
    "torch",
    "transformers",
    "llama_cpp_python",
    "xllamacpp",
    "numpy",
    "smg",
    "aiohttp",
)
FLAGS = ("sse4_2", "fma", "f16c", "bmi2")
SYSTEM_INFO = {
    "llama-cpp-python": (
        "from llmgrpc.engines.llamacpp_build import import_llama_cpp; "
        "print(import_llama_cpp().llama_print_system_info().decode())"
    ),
    "xllamacpp": "import xllamacpp; print(xllamacpp.get_system_info())",
}


def machine(threads: int) -> dict:
    """Cores, CPU flags, memory, versions, and each llama.cpp build's own system info."""
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    field = lambda key: next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith(key)), "")  # noqa: E731
    flags = field("flags").split()
    versions = {}
    for package in PACKAGES:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = "not installed"
    system_info = {}
    for name, code in SYSTEM_INFO.items():  # each in a process of its own: two ggml builds never meet
        answer = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        system_info[name] = answer.stdout.strip() or answer.stderr.strip()[-200:]
    return {
        "date": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        "cpu": field("model name"),
        "cores": os.cpu_count(),
        "threads": threads,
        "memory_gib": psutil.virtual_memory().total / 2**30,
        "flags": sorted(f for f in flags if f.startswith(("avx", "amx")) or f in FLAGS),
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "versions": versions,
        "system_info": system_info,
    }


# Formatting.


def ms(seconds: float) -> str:
    return "–" if seconds != seconds else f"{seconds * 1000:.1f}"


def spread(values: list[float], digits: int = 0, scale: float = 1.0) -> str:
    """median [min–max] of values (one per repetition)."""
    values = [v * scale for v in values if v == v]
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{median(values):.{digits}f} [{min(values):.{digits}f}–{max(values):.{digits}f}]"


def ratios(a: list[dict], b: list[dict], key: str = "tokens_per_s") -> list[float]:
    """a/b per repetition (same repetition: measured side by side)."""
    return [x[key] / y[key] for x, y in zip(a, b, strict=False) if y[key]]


def verdict(met: bool) -> str:
    """A target's last column."""
    return "met" if met else "**missed**"


def table(header: str | list[str], rows: list[list[str]]) -> str:
    """A Markdown table; header: its column names, or one string of them as its header row reads
    ("streams | tok/s | ...")."""
    if isinstance(header, str):
        header = header.split(" | ")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def stat(reps: list[dict], key: str) -> float:
    return median([r[key] for r in reps])


def cpu_us(reps: list[dict], name: str) -> str:
    values = [r["cpu_per_token"].get(name, float("nan")) for r in reps]
    return f"{median(values) * 1e6:.0f}" if values else "–"


# A target's goal: as the report words it, and the check of a median against it.
Goal = tuple[str, Callable[[float], bool]]


def at_least(bound: float, unit: str = "") -> Goal:
    return f"≥ {bound}{unit}", lambda value: value >= bound


def at_most(bound: float, unit: str, per_second: float = 1.0) -> Goal:
    """bound in unit; per_second: units per second, for a bound on seconds (ms: 1000)."""
    return f"≤ {bound}{unit}", lambda value: value <= bound / per_second


# Sections.


def targets(results: dict) -> tuple[str, list[str]]:
    """The issue's targets: goal, measured value, met or not; and the names of those missed."""
    rows, missed = [], []

    def add(name: str, goal: Goal, values: list[float], shown: str) -> None:
        text, ok = goal
        met = bool(values) and ok(median(values))
        rows.append([name, text, shown, verdict(met)])
        if not met:
            missed.append(name)

    for engine, reps in results["overhead"].items():
        values = ratios(reps["llmgrpc"], reps["in-process engine"])
        add(f"service overhead, {engine}: tok/s ratio", at_least(0.97), values, spread(values, 3))
        for p in ("p50", "p99"):
            added = ratios_diff(reps["llmgrpc"], reps["in-process engine"], f"ttft_{p}")
            if p == "p50":
                shown = spread(added, 2, 1000) + " ms"
                add(f"TTFT added by the service, {engine}, p50", at_most(2, " ms", 1000), added, shown)
    scaling = results["scaling"].get("llama.cpp")
    if scaling:
        levels = scaling["levels"]
        for peer, goal, at in (
            ("xllamacpp", 1.0, sorted(levels["llmgrpc"])),
            ("llama-cpp-python, one context", 0.9, (1, 16)),
            ("llama_cpp.server", 3.5, (16,)),
        ):
            for streams in at:
                ours, theirs = levels["llmgrpc"].get(streams), levels[peer].get(streams)
                if not (ours and theirs):
                    continue
                values = ratios(ours, theirs)
                name = f"llama.cpp, {streams} stream{'s' if streams > 1 else ''}: llmgrpc / {peer}"
                add(name, at_least(goal, "×"), values, spread(values, 2) + "×")
        for streams in (16, 32):
            ours, theirs = levels["llmgrpc"].get(streams), levels["xllamacpp"].get(streams)
            if not (ours and theirs):
                continue
            values = ratios(ours, theirs, "ttft_p99")
            shown = f"{ms(stat(ours, 'ttft_p99'))} / {ms(stat(theirs, 'ttft_p99'))} ms"
            add(
                f"llama.cpp, {streams} streams: TTFT p99, llmgrpc / xllamacpp", at_most(1, "×"), values, shown
            )
    gateway = results.get("gateway")
    for streams in sorted(gateway["levels"]["smg"]) if gateway else ():
        through, direct = gateway["levels"]["smg"][streams], gateway["levels"]["Generate"][streams]
        plural = "s" if streams > 1 else ""
        values = ratios(through, direct)
        add(
            f"through smg, {streams} stream{plural}: tok/s ÷ Generate's",
            at_least(0.9, "×"),
            values,
            spread(values, 2) + "×",
        )
        added = ratios_diff(through, direct, "ttft_p50")
        shown = spread(added, 1, 1000) + " ms"
        add(f"TTFT added by smg, {streams} stream{plural}, p50", at_most(5, " ms", 1000), added, shown)
    streams = sum(r["streams"] for r in our_runs(results))
    add(
        "llmgrpc streams truncated or failed",
        ("0", lambda count: count == 0),
        [len(results["errors"])],
        f"{len(results['errors'])} of {streams}",
    )
    return table(["target", "goal", "measured: median [min–max]", ""], rows), missed


def ratios_diff(a: list[dict], b: list[dict], key: str) -> list[float]:
    return [x[key] - y[key] for x, y in zip(a, b, strict=False)]


def our_runs(results: dict):
    for reps in results["overhead"].values():
        yield from reps["llmgrpc"]
        yield from reps["in-process engine"]
    for engine, scaling in results["scaling"].items():
        if engine != "truncation":
            for name in ("llmgrpc", "in-process engine"):
                for reps in scaling["levels"][name].values():
                    yield from reps
    for reps in results["firehose"]["levels"].values():
        yield from reps
    for levels in results.get("gateway", {}).get("levels", {}).values():
        for reps in levels.values():
            yield from reps


def overhead_section(results: dict) -> str:
    config = results["config"]
    rows = []
    for engine, reps in results["overhead"].items():
        ours, base = reps["llmgrpc"], reps["in-process engine"]
        rows.append(
            [
                engine,
                spread([r["tokens_per_s"] for r in base]),
                spread([r["tokens_per_s"] for r in ours]),
                spread(ratios(ours, base), 3),
                f"{ms(stat(base, 'ttft_p50'))} / {ms(stat(base, 'ttft_p99'))}",
                f"{ms(stat(ours, 'ttft_p50'))} / {ms(stat(ours, 'ttft_p99'))}",
                f"{spread(ratios_diff(ours, base, 'ttft_p50'), 2, 1000)} / "
                f"{spread(ratios_diff(ours, base, 'ttft_p99'), 2, 1000)}",
                f"{cpu_us(base, 'process')}",
                f"{cpu_us(ours, 'server')} / {cpu_us(ours, 'worker')} / {cpu_us(ours, 'client')}",
            ]
        )
    header = (
        "engine | in-process tok/s | llmgrpc tok/s | ratio | in-process TTFT p50 / p99 ms | "
        "llmgrpc TTFT p50 / p99 ms | added TTFT p50 / p99 ms | in-process CPU µs/token | "
        "llmgrpc CPU µs/token: server / worker / client"
    )
    return (
        f"One stream at a time: `{config['overhead_requests']}` requests of "
        f"`{config['overhead_tokens']}` greedy tokens (end of text ignored) per system and repetition, "
        "the tiny model on each engine, the same plan, prompt and parameters in-process "
        "(`Engine.load`, then `engine.generate` in asyncio) and through `Generate`. tok/s is completion "
        "tokens over the time from sending the request to its last token, median of the requests; TTFT "
        "percentiles are over the requests of one repetition; *added* TTFT is llmgrpc's minus "
        "in-process, per repetition. CPU is process CPU time over tokens generated.\n\n" + table(header, rows)
    )


def scaling_section(results: dict, engine: str) -> str:
    scaling = results["scaling"][engine]
    levels = scaling["levels"]
    names = list(levels)
    streams = sorted({c for name in names for c in levels[name]})
    limit = results["outside_load_limit"]

    def cell(reps: list[dict]) -> str:
        noisy = any(r["outside_load"] > limit for r in reps)
        return spread([r["tokens_per_s"] for r in reps]) + ("*" if noisy else "")

    throughput = [[str(c)] + [cell(levels[n].get(c, [])) for n in names] for c in streams]
    latency = [
        [str(c)]
        + [
            f"{ms(stat(levels[n][c], 'ttft_p50'))} / {ms(stat(levels[n][c], 'ttft_p99'))} · "
            f"{ms(stat(levels[n][c], 'itl_p50'))} / {ms(stat(levels[n][c], 'itl_p99'))}"
            if c in levels[n]
            else "–"
            for n in names
        ]
        for c in streams
    ]
    peers = [n for n in names if n != "llmgrpc"]
    versus = [
        [str(c)]
        + [spread(ratios(levels["llmgrpc"][c], levels[n][c]), 2) if c in levels[n] else "–" for n in peers]
        for c in streams
    ]
    server_cpu = [
        [str(c), cpu_us(levels["llmgrpc"][c], "server"), cpu_us(levels["llmgrpc"][c], "client")]
        for c in streams
    ]
    return "\n\n".join(
        [
            f"Aggregate generated tokens/s, `{scaling['tokens']}` greedy tokens per stream, all streams "
            "sent at once; median [min–max] over repetitions.",
            table(["streams", *names], throughput),
            "TTFT p50 / p99 · inter-token latency p50 / p99, ms (medians over repetitions).",
            table(["streams", *names], latency),
            "llmgrpc's tok/s over each other system's, per repetition (median [min–max]).",
            table(["streams", *(f"÷ {n}" for n in peers)], versus),
            "llmgrpc server and client process CPU per token, µs.",
            table(["streams", "server", "client"], server_cpu),
        ]
    )


def truncation_section(results: dict) -> str:
    truncation = results["scaling"]["truncation"]
    cut = [len(run["problems"]) for run in truncation["runs"]]
    examples = [p for run in truncation["runs"] for p in run["problems"]][:3]
    return (
        f"`{truncation['streams']}` streams of `{truncation['tokens']}` tokens sent together to "
        "`llama_cpp.server` with its default `--interrupt_requests True`, "
        f"{len(cut)} time(s): streams cut short each time: {', '.join(map(str, cut))} "
        f"of {truncation['streams']}"
        + (f" (e.g. {'; '.join(examples)})." if examples else ".")
        + " The scaling runs above use `--interrupt_requests False`, where requests wait their turn."
    )


def outside_load_note(results: dict) -> str:
    attempts = results["attempts"]
    repeated = sum(1 for a in attempts if a > 1)
    return (
        f"Before each scaling level the suite waits up to {results['quiet_wait_s']:.0f} s for other "
        f"processes to keep at most {results['outside_load_limit']} cores busy; a level of "
        f"{results['outside_load_min_s']} s or more during which they kept more is taken again (up to "
        f"{results['max_attempts']} times in all, the quietest kept); waits and retries share "
        f"{results['config']['patience_s']:.0f} s. {repeated} of {len(attempts)} measurements were taken "
        "again; values marked * kept more outside load than that in some repetition."
    )


def spare_core_section(results: dict) -> str:
    spare, full = results["spare_core"], results["scaling"]["llama.cpp"]["levels"]
    threads = results["machine"]["threads"]
    rows = []
    for label, levels in (
        (f"{threads} (all cores)", full),
        (str(spare["threads"]), spare["levels"]),
    ):
        for c in (1, 16):
            runner = levels["llama-cpp-python, one context"].get(c)
            if not runner:
                continue
            rows.append(
                [
                    label,
                    str(c),
                    spread([r["tokens_per_s"] for r in runner]),
                    spread([r["tokens_per_s"] for r in levels["llmgrpc"][c]]),
                    spread(ratios(levels["in-process engine"][c], runner), 2),
                    spread(ratios(levels["llmgrpc"][c], levels["in-process engine"][c]), 2),
                    spread(ratios(levels["llmgrpc"][c], runner), 2),
                ]
            )
    return (
        "The same llama.cpp systems with one core left free for everything that is not llama.cpp's "
        "own threads (the batcher, the event loop, the service's processes): each ratio per "
        "repetition, median [min–max].\n\n"
        + table(
            "llama.cpp threads | streams | one context tok/s | llmgrpc tok/s | "
            "in-process engine ÷ one context | llmgrpc ÷ in-process engine | llmgrpc ÷ one context",
            rows,
        )
    )


def limits_section(results: dict, missed: list[str]) -> str:
    """What the measurements say about each missed target (numbers from this run only)."""
    m, config, scaling = results["machine"], results["config"], results["scaling"]
    spare = results.get("spare_core")
    firehose = results["firehose"]["levels"]
    firehose_ttft = ms(stat(firehose[min(firehose, key=int)], "ttft_p50"))
    parts = []
    for engine, reps in results["overhead"].items():
        if not any(engine in name and ("overhead" in name or "TTFT added" in name) for name in missed):
            continue
        ours, base = reps["llmgrpc"], reps["in-process engine"]
        ours_us, base_us = 1e6 / stat(ours, "tokens_per_s"), 1e6 / stat(base, "tokens_per_s")
        added_ttft = median(ratios_diff(ours, base, "ttft_p50")) * 1000
        cpu = {n: median([r["cpu_per_token"][n] for r in ours]) * 1e6 for n in ("server", "worker", "client")}
        engine_cpu = median([r["cpu_per_token"]["process"] for r in base]) * 1e6
        beyond = cpu["server"] + cpu["worker"] - engine_cpu + cpu["client"]
        text = (
            f"- **{engine}, service overhead.** A token of the tiny model takes {ours_us:.0f} µs through "
            f"the service against {base_us:.0f} µs in-process ({ours_us - base_us:+.0f} µs; TTFT "
            f"{added_ttft:+.1f} ms at p50). Per token the server process spends {cpu['server']:.0f} µs of "
            f"CPU, the worker {cpu['worker']:.0f} µs (the engine alone, in-process: {engine_cpu:.0f} µs) "
            f"and the client {cpu['client']:.0f} µs: about {beyond:.0f} µs of CPU per token beyond the "
            f"engine's own, on {m['cores']} cores that the engine's threads also use. The "
            f"transport alone (the firehose engine, one stream) takes {firehose_ttft} ms to a first token."
        )
        transport_us = 1e6 / stat(firehose[min(firehose, key=int)], "tokens_per_s")
        if base_us < 1.5 * transport_us:
            text += (
                " The engine alone makes a token about as fast as the transport alone carries one "
                f"({base_us:.0f} against {transport_us:.0f} µs, the firehose engine at one stream), and "
                "both need the same cores: at this model size the ratio measures that contention more "
                "than what the service adds to a model's own time."
            )
        levels = scaling.get(engine, {}).get("levels", {})
        if 1 in levels.get("llmgrpc", {}) and config["scaling_model"] != "tiny-llama-3.1":
            one = median(ratios(levels["llmgrpc"][1], levels["in-process engine"][1]))
            per_token = 1000 / stat(levels["in-process engine"][1], "tokens_per_s")
            text += (
                f" With {config['scaling_model']} ({per_token:.1f} ms a token in-process), the same "
                f"service keeps {one:.2f}× of the in-process engine's tokens/s at one stream."
            )
        if engine == "llama.cpp" and spare and 1 in spare["levels"]["llmgrpc"]:
            free = median(ratios(spare["levels"]["llmgrpc"][1], spare["levels"]["in-process engine"][1]))
            text += (
                f" With one core left free of llama.cpp's threads ({spare['threads']} thread), it keeps "
                f"{free:.2f}× at one stream (*One core left free*)."
            )
        parts.append(text)
    levels = scaling.get("llama.cpp", {}).get("levels", {})
    if any("16 streams" in name for name in missed) and 16 in levels.get("llmgrpc", {}):
        runner = levels["llama-cpp-python, one context"][16]
        engine_kept = median(ratios(levels["in-process engine"][16], runner))
        service_kept = median(ratios(levels["llmgrpc"][16], levels["in-process engine"][16]))
        text = (
            "- **llama.cpp, 16 streams.** Against llama.cpp decoding the 16 sequences alone in one "
            f"context, the in-process engine keeps {engine_kept:.2f}× (its batcher samples, detokenizes and "
            "hands each sequence's token to its stream between decode steps) and the service keeps "
            f"{service_kept:.2f}× of the in-process engine."
        )
        if spare and 16 in spare["levels"]["llmgrpc"]:
            ours_free = spare["levels"]["llmgrpc"][16]
            free = median(ratios(ours_free, spare["levels"]["llama-cpp-python, one context"][16]))
            text += (
                f" With one core left free of llama.cpp's threads, llmgrpc keeps {free:.2f}× of that build's "
                f"one-context figure at {spare['threads']} thread"
                + (": at full threads the loss is contention for the cores." if free >= 0.9 else ".")
                + f" At 16 streams llmgrpc then makes {stat(ours_free, 'tokens_per_s'):.0f} tok/s, against "
                f"{stat(levels['llmgrpc'][16], 'tokens_per_s'):.0f} with its default threads."
            )
        xl = levels.get("xllamacpp", {}).get(16)
        if xl and median(ratios(xl, runner)) > 1 / 1.5:
            text += (
                f" xllamacpp reaches {median(ratios(xl, runner)):.2f}× of the one-context figure here: 1.5× "
                "xllamacpp would be more than llama-cpp-python's own build decodes in one context."
            )
        parts.append(text)
    if any("smg" in name for name in missed):
        parts.append(gateway_limits(results))
    if parts and results.get("profiles"):
        parts.append("- **Profiles** (*Where the time goes*):\n" + indent(profile_findings(results)))
    return "\n".join(parts) if parts else "Every target was met in this run."


def gateway_limits(results: dict) -> str:
    """What smg's run measured beside the missed targets: CPU per token and the machine's load."""
    gateway, limit = results["gateway"], results["outside_load_limit"]
    said = []
    for streams in sorted(gateway["levels"]["smg"]):
        through, direct = gateway["levels"]["smg"][streams], gateway["levels"]["Generate"][streams]
        busy = max(r["outside_load"] for r in through + direct)
        per_second = median([r["cpu_per_token"]["smg"] for r in through]) * stat(through, "tokens_per_s")
        said.append(
            f"at {streams} stream{'s' if streams > 1 else ''} the model's worker spends "
            f"{cpu_us(through, 'worker')} µs of CPU per token on smg's requests against "
            f"{cpu_us(direct, 'worker')} µs on Generate's, the server {cpu_us(through, 'server')} against "
            f"{cpu_us(direct, 'server')} µs; smg itself spends {cpu_us(through, 'smg')} µs "
            f"({per_second * 1000:.0f} ms a second) and the client {cpu_us(through, 'client')} µs reading "
            f"HTTP (against {cpu_us(direct, 'client')} µs reading Generate), on cores the engine's threads "
            f"also use; other processes kept up to {busy:.2f} cores busy during these levels (the suite's "
            f"limit for a quiet level: {limit})"
        )
    text = "; ".join(said)
    return "- **Through smg.** " + text[0].upper() + text[1:] + "."


def indent(text: str) -> str:
    return "\n".join("  " + line for line in text.splitlines())


def gateway_section(results: dict) -> str:
    gateway, m = results["gateway"], results["machine"]
    through, direct = gateway["levels"]["smg"], gateway["levels"]["Generate"]
    rows = []
    for streams in sorted(through):
        ours, theirs = direct[streams], through[streams]
        rows.append(
            [
                str(streams),
                spread([r["tokens_per_s"] for r in ours]),
                spread([r["tokens_per_s"] for r in theirs]),
                spread(ratios(theirs, ours), 2),
                f"{ms(stat(ours, 'ttft_p50'))} / {ms(stat(theirs, 'ttft_p50'))}",
                spread(ratios_diff(theirs, ours, "ttft_p50"), 1, 1000),
                f"{cpu_us(ours, 'client')} / {cpu_us(theirs, 'client')}",
                cpu_us(theirs, "smg"),
                f"{cpu_us(ours, 'server')} / {cpu_us(theirs, 'server')}",
            ]
        )
    requests = gateway["requests_at_one_stream"]
    busy = [r["outside_load"] for levels in (through, direct) for reps in levels.values() for r in reps]
    alone = (
        f"Measured apart from the rest of this report, on {gateway['date']} in "
        f"{gateway['duration_s'] / 60:.1f} minutes, by `{gateway['command']}` (a server with only "
        "this model). "
        if "command" in gateway
        else ""
    )
    return (
        alone + f"`{gateway['uid']}` served by one llmgrpc server, on its own engine-contract listener "
        f"(`--engine-api-ports`), reached two ways from the same client process: **Generate**, "
        "llmgrpc's own RPC over gRPC, and **smg**, the Shepherd Model Gateway's OpenAI "
        "`/v1/completions` streamed as server-sent events (read by aiohttp), which smg turns into "
        "`vllm.grpc.engine.VllmEngine/Generate` calls to the listener. smg ran as "
        f"`{gateway['smg_command']}`. "
        "The load is the same: the same prompts, sent to Generate as the token ids smg makes of "
        "them (its tokenizer from the worker's GetModelInfo, no beginning-of-text token; each "
        f"stream's prompt count is checked on both paths), `{gateway['tokens']}` greedy tokens per "
        "stream with end of text ignored, counted from the stream (smg's `usage` with "
        "`include_usage`) and checked. The two paths take turns: at one stream request by request "
        f"({requests} requests each per repetition; tok/s their median, TTFT p50 over them), at "
        f"more one level each, the order swapping every repetition; repetitions: {gateway['reps']}. "
        "At more than one stream an unmeasured level of the same path runs before each measured "
        "one: back-to-back levels on this llama.cpp worker alternate between a faster and a "
        "slower one whichever path sends them (`benchmarks/level_order.py`), so every measured "
        "level is the same turn of that alternation. "
        "TTFT is to the first streamed "
        "text (both paths hold back an incomplete UTF-8 character the same way); *added* TTFT is "
        f"smg's p50 minus Generate's, per repetition. Everything (llmgrpc's server and worker, "
        f"smg and the client) shared the {m['cores']} CPU cores of this machine, with other work "
        f"keeping {min(busy):.2f} to {max(busy):.2f} cores busy meanwhile (outside load, per "
        "measurement): median [min–max] over repetitions. CPU is process CPU time per token "
        "generated.\n\n"
        + table(
            "streams | Generate tok/s | smg tok/s | smg ÷ Generate | TTFT p50 ms: Generate / smg | "
            "added TTFT p50 ms | client CPU µs/token: Generate / smg | smg CPU µs/token | "
            "server CPU µs/token: Generate / smg",
            rows,
        )
    )


def firehose_section(results: dict) -> str:
    firehose = results["firehose"]
    rows = []
    for c, reps in sorted(firehose["levels"].items(), key=lambda item: int(item[0])):
        rows.append(
            [
                str(c),
                spread([r["tokens_per_s"] for r in reps]),
                f"{ms(stat(reps, 'ttft_p50'))} / {ms(stat(reps, 'ttft_p99'))}",
                f"{stat(reps, 'itl_p50') * 1e6:.0f} / {stat(reps, 'itl_p99') * 1e6:.0f}",
                cpu_us(reps, "server"),
                cpu_us(reps, "worker"),
                cpu_us(reps, "client"),
            ]
        )
    return (
        "The benchmark-only `firehose` engine (`benchmarks/firehose.py`, loaded as an engine plugin) "
        "yields one token per message as fast as it is consumed, so the service is all there is to "
        f"measure: `{firehose['tokens_per_level']}` tokens per level, shared by its streams.\n\n"
        + table(
            "streams | tok/s | TTFT p50 / p99 ms | ITL p50 / p99 µs | server CPU µs/token | "
            "worker CPU µs/token | client CPU µs/token",
            rows,
        )
    )


def startup_section(results: dict) -> str:
    startup = results["startup"]
    rows = [["server: process start to health SERVING", spread(startup["server_ready_s"], 2)]]
    for engine, values in startup["launch_s"].items():
        rows.append([f"LaunchModel tiny-llama-3.1 on {engine} until READY", spread(values, 2)])
    return table(["", "seconds: median [min–max]"], rows)


def profile_section(results: dict) -> str:
    parts = []
    for title, processes in results.get("profiles", {}).items():
        rows = []
        for process, threads in processes.items():
            for thread, info in list(threads.items())[:4]:
                where = "; ".join(f"{name} {share:.0%}" for name, share in info["top"][:4])
                rows.append([process, thread, f"{info['gil']:.0%}", where])
        parts += [
            f"**{title}**",
            table(["process", "thread", "holds the GIL", "where (share of its samples)"], rows),
        ]
    return "\n\n".join(parts) if parts else "No profiles in this run (py-spy missing, or --quick)."


def profile_findings(results: dict) -> str:
    """One sentence per profiled scenario: how much Python each process ran, and where."""
    lines = []
    for title, processes in results.get("profiles", {}).items():
        said = []
        for process, threads in processes.items():
            total = sum(info["gil"] for info in threads.values())
            busiest = sorted(threads.items(), key=lambda item: -item[1]["gil"])[:2]
            where = ", ".join(
                f"{thread} {info['gil']:.0%} (mostly {info['top'][0][0]})"
                for thread, info in busiest
                if info["top"]
            )
            said.append(f"the {process} ran Python {total:.0%} of the time: {where}")
        lines.append(f"- {title}: " + "; ".join(said) + ".")
    return "\n".join(lines)


def llmgrpc_defaults(m: dict) -> str:
    """llmgrpc's engine defaults on this machine, as the run found them."""
    defaults = m.get("llama_cpp_defaults")
    if not defaults:
        return "threads as given"
    single, batched = defaults["threads"]
    environment = "".join(f", {name}={value}" for name, value in defaults["environment"].items())
    return f"llama.cpp n_threads {single}, n_threads_batch {batched}{environment}; torch: all cores"


def machine_section(results: dict) -> str:
    m = results["machine"]
    lines = [
        f"- CPU: {m['cpu']}, {m['cores']} cores, {m['memory_gib']:.0f} GiB; {m['os']}; Python {m['python']}",
        f"- CPU flags: {' '.join(m['flags'])}",
        f"- llmgrpc's engines: their defaults ({llmgrpc_defaults(m)}); every peer and baseline: "
        f"{m['threads']} threads",
        "- versions: " + ", ".join(f"{k} {v}" for k, v in m["versions"].items()),
    ]
    lines += [f"- {name} build: `{info}`" for name, info in m["system_info"].items()]
    if "bench_model_parameters" in m:
        lines.append(f"- bench-llama-100m: {m['bench_model_parameters'] / 1e6:.1f}M parameters")
    return "\n".join(lines)


# Plots.


def plots(results: dict, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    engines = [e for e in results["scaling"] if e != "truncation"]
    figure, axes = plt.subplots(1, len(engines), figsize=(10, 3.6), squeeze=False)
    for axis, engine in zip(axes[0], engines, strict=True):
        for name, by_level in results["scaling"][engine]["levels"].items():
            xs = sorted(by_level, key=int)
            values = [[r["tokens_per_s"] for r in by_level[x]] for x in xs]
            mid = [median(v) for v in values]
            error = [
                [m - min(v) for m, v in zip(mid, values, strict=True)],
                [max(v) - m for m, v in zip(mid, values, strict=True)],
            ]
            axis.errorbar([int(x) for x in xs], mid, yerr=error, marker="o", capsize=3, label=name)
        axis.set(xscale="log", xlabel="concurrent streams", ylabel="aggregate tokens/s", title=engine)
        ticks = sorted(
            {int(x) for by_level in results["scaling"][engine]["levels"].values() for x in by_level}
        )
        axis.set_xticks(ticks, [str(x) for x in ticks])
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    written.append(_save(figure, out / "benchmarks-scaling.png"))

    scaling = results["scaling"].get("llama.cpp")
    if scaling:
        figure, axis = plt.subplots(figsize=(6, 3.6))
        for name, by_level in scaling["levels"].items():
            xs = sorted(by_level, key=int)
            if len(xs) > 1:
                line = axis.plot(
                    [int(x) for x in xs],
                    [stat(by_level[x], "ttft_p50") * 1000 for x in xs],
                    marker="o",
                    label=f"{name} p50",
                )
                axis.plot(
                    [int(x) for x in xs],
                    [stat(by_level[x], "ttft_p99") * 1000 for x in xs],
                    ls="--",
                    color=line[0].get_color(),
                    label=f"{name} p99",
                )
        axis.set(
            xscale="log",
            yscale="log",
            xlabel="concurrent streams",
            ylabel="time to first token, ms",
            title="llama.cpp: time to first token",
        )
        ticks = sorted({int(x) for by_level in scaling["levels"].values() for x in by_level})
        axis.set_xticks(ticks, [str(x) for x in ticks])
        axis.grid(alpha=0.3)
        axis.legend(fontsize=6, ncol=2)
        written.append(_save(figure, out / "benchmarks-ttft.png"))

    firehose = results["firehose"]["levels"]
    xs = sorted(firehose, key=int)
    figure, axis = plt.subplots(figsize=(6, 3.6))
    axis.plot([int(x) for x in xs], [stat(firehose[x], "tokens_per_s") for x in xs], marker="o", color="C0")
    axis.set(
        xscale="log",
        xlabel="concurrent streams",
        ylabel="tokens/s",
        title="transport ceiling (firehose engine)",
    )
    axis.set_xticks([int(x) for x in xs], [str(x) for x in xs])
    cpu = axis.twinx()
    for index, name in enumerate(("server", "worker", "client")):
        cpu.plot(
            [int(x) for x in xs],
            [median([r["cpu_per_token"][name] for r in firehose[x]]) * 1e6 for x in xs],
            ls="--",
            marker=".",
            color=f"C{index + 1}",
            label=f"{name} CPU µs/token",
        )
    cpu.set_ylabel("CPU µs per token")
    cpu.legend(fontsize=7)
    axis.grid(alpha=0.3)
    written.append(_save(figure, out / "benchmarks-firehose.png"))
    return written


def _save(figure, path: Path) -> str:
    figure.tight_layout()
    figure.savefig(path, dpi=80)
    import matplotlib.pyplot as plt

    plt.close(figure)
    return path.name


# The report.


def write(results: dict, out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    images = plots(results, out)
    target_table, missed = targets(results)
    m, config = results["machine"], results["config"]
    model = config["scaling_model"]
    sections = [
        "# Benchmarks",
        f"Generated by `make bench{' BENCH_ARGS=--quick' if results['quick'] else ''}` "
        f"(`{results['command']}`) on {m['date']}, in {results['duration_s'] / 60:.1f} minutes, on "
        f"{m['cores']} cores ({m['cpu']}); llmgrpc with its defaults ({llmgrpc_defaults(m)}), every "
        f"peer and baseline with {m['threads']} threads. "
        f"Repetitions: {config['reps']}; systems compared are measured in the same run, interleaved "
        "level by level. The machine may be shared: compare ratios, not absolute numbers across runs. "
        + outside_load_note(results),
        "## Targets",
        target_table,
        "### What limits it",
        limits_section(results, missed),
        "## 1. Service overhead",
        overhead_section(results),
        f"## 2. Concurrency scaling and peers ({model})",
        "Systems: **llmgrpc** (`Generate` through the server and the model's worker), the **in-process "
        "engine** (the same engine class, plan and requests, no service), and for llama.cpp "
        "**llama-cpp-python, one context** (the engine's llama.cpp runner alone: all prompts prefilled "
        "in one call, then greedy decode steps over every sequence, no batcher, sampler or "
        "detokenizer), **xllamacpp** (llama.cpp's own C++ server from the xllamacpp wheel, one slot per "
        "stream, continuous batching, OpenAI `/v1/completions` streamed) and **llama_cpp.server** "
        "(llama-cpp-python's server, `--interrupt_requests False`); for Transformers, **transformers "
        "generate** (`model.generate`, greedy, one stream, a streamer timestamping each token). Peers get "
        "the same GGUF file; llmgrpc and the in-process engine run with llmgrpc's default threads, the "
        "peers and the one-context baseline with every core; end of text is suppressed everywhere, so "
        "every stream has exactly its token count, which is checked.",
        *(f"![{name}]({name})" for name in images[:2]),
        *(
            part
            for engine in results["scaling"]
            if engine != "truncation"
            for part in (f"### {engine}", scaling_section(results, engine))
        ),
        *(["### One core left free", spare_core_section(results)] if "spare_core" in results else []),
        "### Streams cut short",
        truncation_section(results),
        "## 3. The transport's own ceiling",
        firehose_section(results),
        f"![{images[-1]}]({images[-1]})",
        "## 4. Start-up",
        startup_section(results),
        *(["## 5. Through the model gateway smg", gateway_section(results)] if "gateway" in results else []),
        "## Where the time goes",
        "py-spy (sampling at 100 Hz, without pausing the process) on the llmgrpc server and the model's "
        f"worker while a scenario repeats for {config['profile_s']:.0f} s, keeping only the samples of the "
        "thread that holds the GIL: the share of wall time each thread ran Python, and in which "
        "functions (leaf frames). Native calls that release the GIL (llama_decode, torch kernels, "
        "gRPC's core) are not in it; a leaf `Handle._run (events.py)` is an asyncio callback running "
        "compiled code that holds the GIL (gRPC's Cython layer, protobuf).",
        profile_section(results),
        "## Machine and versions",
        machine_section(results),
        "## Errors",
        "\n".join(f"- {error}" for error in results["errors"][:50])
        or "None: every llmgrpc stream had its tokens.",
    ]
    path = out / "benchmarks.md"
    path.write_text("\n\n".join(sections) + "\n")
    return path


def load(path: Path) -> dict:
    """A run's results.json, its levels keyed by int again (JSON made them strings)."""
    return json.loads(
        path.read_text(), object_hook=lambda d: {int(k) if k.isdigit() else k: v for k, v in d.items()}
    )


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit(f"usage: python benchmarks/report.py RESULTS.json OUT_DIR\n\n{__doc__}")
    print(write(load(Path(sys.argv[1])), Path(sys.argv[2])))
