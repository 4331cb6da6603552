"""The benchmark suite behind ``make bench``: llmgrpc's service overhead, its scaling with
concurrent streams, its peers on the same model file, threads and machine, the model gateway
smg in front of it, the transport's own ceiling, and start-up; written as a Markdown report
with plots.

Every number comes from real clients (gRPC, or HTTP with server-sent events) in this
process, talking to servers that run as processes of their own; the in-process baselines
(``inprocess.py``) run in a process of their own too. Nothing is timed inside a test.
Systems compared with each other are measured in the same run, interleaved level by level
(the order rotating each repetition) and repeated; the report gives medians and the spread
(min-max) over repetitions. Every stream's token count is checked: an llmgrpc stream that
ends short or fails is an error, and the suite exits non-zero.

    python benchmarks/suite.py [--quick] [--out DIR] [--work-dir DIR] [--threads N] [--reps N]
                               [--only gateway]

``--quick`` is a smoke run (the tiny model everywhere, few levels, one repetition, no
profiles) of about a minute; it fails on errors, never on a slow number. ``--only gateway``
measures that section again alone (its server launches only its model): its results replace
the section's in the work folder's results.json of an earlier run, and the report, which says
when each was measured, is written again.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import shlex
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import models
import profiles
import report
from models import BENCH_MODEL, FIREHOSE, QUANTIZATION, TINY
from servers import (
    InProcess,
    LlamaCppServer,
    Llmgrpc,
    OutsideLoad,
    Process,
    SmgGateway,
    XllamacppServer,
    cpu_seconds,
    free_port,
    gateway_token_ids,
)
from streams import GatewayStreams, GrpcStreams, Level, SseStreams, median, percentile, prompts, run_level

from llmgrpc.clients import Client
from llmgrpc.engines.catalogue import engine_info, load_plugins
from llmgrpc.engines.cpu_threads import llama_cpp_threads, usable_cores
from llmgrpc.server.registry import SpecQuery

HERE = Path(__file__).parent
ROOT = HERE.parent
PLUGIN = "firehose:ENGINE_INFO"
CONTEXT_PER_SEQUENCE = 512  # KV cache per llama.cpp slot: the prompt and the longest output fit
LEVEL_TIMEOUT_S = 600.0
# The machine may be shared. Before each level of a scaling run the suite waits up to
# QUIET_WAIT_S for other processes to keep at most OUTSIDE_LOAD_LIMIT cores busy; a level of
# at least OUTSIDE_LOAD_MIN_S during which they kept more is measured again, up to ATTEMPTS
# times in all, the quietest attempt counting. Waits and retries share Config.patience_s.
# (Shorter levels are not judged: CPU times come in 10 ms ticks.)
OUTSIDE_LOAD_LIMIT = 0.25
OUTSIDE_LOAD_MIN_S = 0.5
ATTEMPTS = 2
QUIET_WAIT_S = 15.0
# (engine, model_format, quantization) of each llmgrpc engine benchmarked.
ENGINES = {"Transformers": ("pytorch", "none"), "llama.cpp": ("ggufv2", QUANTIZATION)}


@dataclass(frozen=True)
class Config:
    """What a run measures: the defaults are the full run's (FULL), QUICK a smoke run's."""

    reps: int = 3
    overhead_requests: int = 10  # one-stream requests per system per repetition
    overhead_tokens: int = 128
    scaling_model: str = BENCH_MODEL
    levels: tuple[int, ...] = (1, 2, 4, 8, 16, 32)  # concurrent streams
    # Tokens per stream in the scaling runs, per engine.
    tokens: dict[str, int] = field(default_factory=lambda: {"llama.cpp": 128, "Transformers": 64})
    firehose_levels: tuple[int, ...] = (1, 4, 16, 64, 256)
    firehose_tokens: int = 20_000  # tokens per firehose level, shared by its streams
    startup_reps: int = 3
    profile_s: float = 8  # 0: no profiles
    truncation_streams: int = 4  # streams sent together to llama_cpp.server with its defaults
    patience_s: float = 150  # waiting for a quiet machine and measuring again, in all
    gateway_levels: tuple[int, ...] = (1, 16)  # concurrent streams through smg and straight to Generate


FULL = Config()
QUICK = Config(
    reps=1,
    overhead_requests=3,
    overhead_tokens=32,
    scaling_model=TINY,
    levels=(1, 4),
    tokens={"llama.cpp": 32, "Transformers": 16},
    firehose_levels=(1, 8),
    firehose_tokens=2_000,
    startup_reps=1,
    profile_s=0,
    truncation_streams=2,
    patience_s=0,
    gateway_levels=(1, 4),
)


@dataclass
class System:
    """One thing that streams tokens: run(concurrency, max_tokens) sends that many streams at once."""

    name: str
    run: Callable[[int, int], Awaitable[Level]]
    ours: bool = False  # an llmgrpc path: a problem with any of its streams fails the suite
    cpu_pids: dict[str, int] = field(default_factory=dict)  # CPU time per token is reported for these
    levels: tuple[int, ...] = ()  # the levels it runs at (empty: all)

    def runs_at(self, concurrency: int) -> bool:
        return not self.levels or concurrency in self.levels


def summarize(level: Level, cpu: dict[str, float]) -> dict:
    ttfts, gaps = level.ttfts(), level.gaps()
    return {
        "tokens_per_s": level.tokens_per_s,
        "tokens": level.tokens,
        "streams": len(level.streams),
        "ttft_p50": percentile(ttfts, 50),
        "ttft_p99": percentile(ttfts, 99),
        "itl_p50": percentile(gaps, 50),
        "itl_p99": percentile(gaps, 99),
        "problems": level.problems,
        "cpu_s": cpu,
        "cpu_per_token": {name: seconds / max(level.tokens, 1) for name, seconds in cpu.items()},
    }


def one_at_a_time(runs: list[dict]) -> dict:
    """Requests of one stream sent one after another, summed up as one repetition: tok/s the
    median of the requests', TTFT percentiles over the requests, CPU over all their tokens."""
    ttfts, tokens = [r["ttft_p50"] for r in runs], sum(r["tokens"] for r in runs)
    cpu = {name: sum(r["cpu_s"][name] for r in runs) for name in runs[0]["cpu_s"]}
    return {
        "tokens_per_s": median([r["tokens_per_s"] for r in runs]),
        "tokens": tokens,
        "ttft_p50": percentile(ttfts, 50),
        "ttft_p99": percentile(ttfts, 99),
        "streams": len(runs),
        "cpu_per_token": {name: seconds / max(tokens, 1) for name, seconds in cpu.items()},
        "outside_load": max(r["outside_load"] for r in runs),
        "problems": [p for r in runs for p in r["problems"]],
    }


def progress(summary: dict) -> str:
    line = f"{summary['tokens_per_s']:8.1f} tok/s, TTFT p50 {summary['ttft_p50'] * 1000:7.1f} ms"
    if summary["outside_load"] > OUTSIDE_LOAD_LIMIT:
        line += f", outside load {summary['outside_load']:.2f} cores"
    return line + (f", PROBLEMS: {summary['problems'][:2]}" if summary["problems"] else "")


def print_level(name: str, concurrency: int, summary: dict) -> None:
    print(f"  {name:<34} {concurrency:>4} streams: {progress(summary)}", flush=True)


class Bench:
    def __init__(self, config: Config, work: Path, threads: int):
        self.config = config
        self.work = work
        self.threads = threads
        self.max_batch = max(config.levels[-1], 16)
        self.cache_dir = work / "cache"
        self.families = models.write_families(work / "families")
        self.logs = work / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.errors: list[str] = []
        self.attempts: list[int] = []  # per measurement: how many it took
        self.patience_left = config.patience_s
        self.gateway_uid = f"{config.scaling_model}-llama.cpp"  # served to smg on a listener of its own
        self.engine_api_port = free_port()
        self._running: list = []
        self._channels: list[GrpcStreams] = []

    # Processes.

    def keep(self, process):
        self._running.append(process)
        return process

    async def release(self, process) -> None:
        if isinstance(process, Llmgrpc):  # its clients first: the server goes away under no open channel
            for channel in [c for c in self._channels if c.endpoint == process.endpoint]:
                await channel.close()
                self._channels.remove(channel)
        process.stop()
        self._running.remove(process)

    async def close(self) -> None:
        for process in list(reversed(self._running)):
            await self.release(process)
        for channel in self._channels:
            await channel.close()

    def llmgrpc(self, name: str, max_running: int, *settings: str) -> Llmgrpc:
        return Llmgrpc(
            self.logs / f"{name}.log",
            *("--cache-dir", str(self.cache_dir), "--families-dir", str(self.families), "--device", "cpu"),
            *("--max-running-requests", str(max_running), "--max-waiting-requests", "512"),
            *("--allowed-model-dirs", str(self.work / "models"), "--engine-plugins", PLUGIN),
            *settings,
            env={"PYTHONPATH": str(HERE)},
        )

    def engine_options(self, engine: str) -> dict:
        """llmgrpc's launches: the engine's own defaults (threads included), as a user gets them;
        for llama.cpp only the KV cache is sized to the levels, as every peer's is."""
        if engine == "llama.cpp":
            return {"context_length": CONTEXT_PER_SEQUENCE * self.max_batch}
        return {}

    def peer_options(self, engine: str) -> dict:
        """The peers' and one-context baseline's: every core, for decoding and for batches."""
        threads = {"n_threads": self.threads}
        if engine == "llama.cpp":
            threads["n_threads_batch"] = self.threads
        return {**self.engine_options(engine), **threads}

    def model_path(self, model: str, engine: str) -> str:
        if model == TINY:
            return ""
        return str(self.work / "models" / ("gguf" if engine == "llama.cpp" else "hf"))

    def launch(self, client: Client, model: str, engine: str, uid: str, options: dict | None = None):
        model_format, quantization = ENGINES[engine]
        return client.launch(
            model,
            model_engine=engine,
            model_format=model_format,
            quantization=quantization,
            model_uid=uid,
            model_path=self.model_path(model, engine),
            engine_options=options if options is not None else self.engine_options(engine),
            timeout=600,
        )

    def inprocess(self, mode: str, model: str, engine: str, options: dict | None = None) -> InProcess:
        model_format, quantization = ENGINES[engine]
        query = SpecQuery(model, engine, model_format, "", quantization)
        plan = models.load_plan(
            self.families,
            self.cache_dir,
            query,
            max_batch_size=self.max_batch,
            model_path=self.model_path(model, engine),
            engine_options=options if options is not None else self.engine_options(engine),
        )
        threads = plan.engine_options.get("n_threads", "default")
        name = f"inprocess-{mode}-{model}-{engine}-{threads}-threads"
        # The engine runs as a worker would: with the engine's CPU environment (its spin-wait bounds).
        env = dict(engine_info(engine).cpu_environment) if mode == "engine" else {}
        return self.keep(InProcess(self.logs / f"{name}.log", mode, plan, env))

    # Systems.

    def service(self, name: str, server: Llmgrpc, client: Client, uid: str) -> System:
        streams = GrpcStreams(server.endpoint, uid)
        self._channels.append(streams)
        worker = client.get_model(uid).worker_pid
        return System(
            name,
            lambda c, m: run_level(streams.opener(m), c, m),
            ours=True,
            cpu_pids={"server": server.pid, "worker": worker, "client": os.getpid()},
        )

    def baseline(self, name: str, process: InProcess, ours: bool = True, levels=()) -> System:
        async def run(concurrency: int, max_tokens: int) -> Level:
            return await asyncio.to_thread(process.level, concurrency, max_tokens)

        return System(name, run, ours=ours, cpu_pids={"process": process.pid}, levels=levels)

    def http_peer(self, name: str, process: Process, extra: dict | None = None) -> System:
        eot = models.end_of_text_ids(self.cache_dir / TINY / "pytorch")
        streams = SseStreams("127.0.0.1", process.port, eot, extra)
        return System(name, lambda c, m: run_level(streams.opener(m), c, m), cpu_pids={"server": process.pid})

    # Measuring.

    async def wait_for_quiet(self) -> None:
        """Wait, within QUIET_WAIT_S and the patience left, until other processes leave the cores."""
        started = time.perf_counter()
        while time.perf_counter() - started < min(QUIET_WAIT_S, self.patience_left):
            probe = OutsideLoad()
            await asyncio.sleep(0.1)
            if probe.cores() <= OUTSIDE_LOAD_LIMIT:
                break
        self.patience_left -= time.perf_counter() - started

    async def measure(self, system: System, concurrency: int, max_tokens: int) -> dict:
        """One level, measured again while the machine was busy with something else."""
        quietest = None
        for attempt in range(1, ATTEMPTS + 1):
            started, outside = time.perf_counter(), OutsideLoad()
            before = {name: cpu_seconds(pid) for name, pid in system.cpu_pids.items()}
            level = await asyncio.wait_for(system.run(concurrency, max_tokens), LEVEL_TIMEOUT_S)
            cpu = {name: cpu_seconds(pid) - before[name] for name, pid in system.cpu_pids.items()}
            summary = {**summarize(level, cpu), "outside_load": outside.cores(), "attempt": attempt}
            if level.problems and system.ours:  # a problem counts whichever attempt is kept
                self.errors += [f"{system.name}, {concurrency} streams: {p}" for p in level.problems]
            if quietest is None or summary["outside_load"] < quietest["outside_load"]:
                quietest = summary
            if attempt > 1:
                self.patience_left -= time.perf_counter() - started
            quiet = summary["outside_load"] <= OUTSIDE_LOAD_LIMIT or level.wall < OUTSIDE_LOAD_MIN_S
            if quiet or self.patience_left <= 0:
                break
        self.attempts.append(attempt)
        return quietest

    async def warm_up(self, systems: list[System]) -> None:
        for system in systems:
            for _ in range(3):
                await self.measure(system, 1, 8)

    async def interleave(self, systems: list[System], levels: tuple[int, ...], tokens) -> dict:
        """results[system][level]: one summary per repetition; tokens(level) per stream."""
        results = {s.name: {c: [] for c in levels if s.runs_at(c)} for s in systems}
        for rep in range(self.config.reps):
            order = systems[rep % len(systems) :] + systems[: rep % len(systems)]
            for concurrency in levels:
                for system in order:
                    if system.runs_at(concurrency):
                        await self.wait_for_quiet()
                        summary = await self.measure(system, concurrency, tokens(concurrency))
                        results[system.name][concurrency].append(summary)
                        print(
                            f"  {system.name:<34} {concurrency:>4} streams: {progress(summary)}", flush=True
                        )
        return results

    async def alternate(self, order: list[System], concurrency: int, tokens: int) -> dict[str, dict]:
        """One repetition of each system at one level, taking turns: at one stream
        overhead_requests requests each, request by request; at more, one level each."""
        await self.wait_for_quiet()
        runs: dict[str, list[dict]] = {system.name: [] for system in order}
        for _ in range(self.config.overhead_requests if concurrency == 1 else 1):
            for system in order:
                runs[system.name].append(await self.measure(system, concurrency, tokens))
        summaries = {name: one_at_a_time(r) if concurrency == 1 else r[0] for name, r in runs.items()}
        for name, summary in summaries.items():
            print_level(name, concurrency, summary)
        return summaries

    async def same_turn(self, order: list[System], concurrency: int, tokens: int) -> dict[str, dict]:
        """One level of each system, each after an unmeasured level of its own: back-to-back
        levels on a llama.cpp worker alternate between a faster and a slower one whoever sends
        them (benchmarks/level_order.py), so each measured level is the same turn of it."""
        await self.wait_for_quiet()
        summaries = {}
        for system in order:
            await asyncio.wait_for(system.run(concurrency, tokens), LEVEL_TIMEOUT_S)
            summaries[system.name] = await self.measure(system, concurrency, tokens)
            print_level(system.name, concurrency, summaries[system.name])
        return summaries

    # Sections.

    async def overhead(self, server: Llmgrpc, client: Client) -> dict:
        """One stream at a time, tiny model: the service against the same engine in-process."""
        config, results = self.config, {}
        for engine in ENGINES:
            systems = [
                self.service("llmgrpc", server, client, f"{TINY}-{engine}"),
                self.baseline("in-process engine", self.inprocess("engine", TINY, engine)),
            ]
            await self.warm_up(systems)
            reps = {s.name: [] for s in systems}
            for rep in range(config.reps):
                for system in systems[rep % 2 :] + systems[: rep % 2]:
                    runs = [
                        await self.measure(system, 1, config.overhead_tokens)
                        for _ in range(config.overhead_requests)
                    ]
                    reps[system.name].append(one_at_a_time(runs))
            results[engine] = reps
            print(f"overhead {engine}: {json.dumps(reps)[:300]}", flush=True)
        return results

    async def scaling(self, server: Llmgrpc, client: Client) -> dict:
        config, model, results = self.config, self.config.scaling_model, {}
        if model == TINY:
            model_file = self.cache_dir / TINY / "ggufv2" / f"{TINY}.{QUANTIZATION}.gguf"
        else:
            model_file = self.work / "models" / "gguf" / f"{BENCH_MODEL}.{QUANTIZATION}.gguf"
        for engine in ENGINES:
            print(f"scaling, {engine}:", flush=True)
            systems = [
                self.service("llmgrpc", server, client, f"{model}-{engine}"),
                self.baseline("in-process engine", self.inprocess("engine", model, engine)),
            ]
            peers = []
            if engine == "llama.cpp":
                one_context = self.inprocess("runner", model, engine, self.peer_options(engine))
                systems.append(self.baseline("llama-cpp-python, one context", one_context, ours=False))
                peers = [
                    self.keep(
                        XllamacppServer(
                            self.logs / "xllamacpp.log",
                            model_file,
                            self.threads,
                            self.max_batch,
                            CONTEXT_PER_SEQUENCE,
                        )
                    ),
                    self.keep(
                        LlamaCppServer(self.logs / "llama_cpp.server.log", model_file, self.threads, False)
                    ),
                ]
                systems.append(
                    self.http_peer("xllamacpp", peers[0], {"ignore_eos": True, "cache_prompt": False})
                )
                systems.append(self.http_peer("llama_cpp.server", peers[1]))
            else:
                hf = self.inprocess("hf-generate", model, engine, self.peer_options(engine))
                systems.append(self.baseline("transformers generate", hf, ours=False, levels=(1,)))
            await self.warm_up(systems)
            tokens = config.tokens[engine]
            results[engine] = {
                "tokens": tokens,
                "model_file": str(model_file) if engine == "llama.cpp" else "",
                "levels": await self.interleave(systems, config.levels, lambda c, t=tokens: t),
            }
            for peer in peers:
                await self.release(peer)
        results["truncation"] = await self.truncation(model_file)
        return results

    async def truncation(self, model_file: Path) -> dict:
        """llama_cpp.server with its defaults: does a new request cut the stream in progress?"""
        peer = self.keep(
            LlamaCppServer(self.logs / "llama_cpp.server.defaults.log", model_file, self.threads, True)
        )
        system = self.http_peer("llama_cpp.server (defaults)", peer)
        count, tokens = self.config.truncation_streams, self.config.tokens["llama.cpp"]
        runs = [await self.measure(system, count, tokens) for _ in range(self.config.reps)]
        await self.release(peer)
        return {"streams": count, "tokens": tokens, "runs": runs}

    async def spare_core(self, server: Llmgrpc, client: Client) -> dict:
        """llama.cpp with one core left to everything else: the same systems at threads = cores - 1."""
        threads, model = self.threads - 1, self.config.scaling_model
        options = {**self.engine_options("llama.cpp"), "n_threads": threads, "n_threads_batch": threads}
        uid = f"{model}-llama.cpp-{threads}-threads"
        self.launch(client, model, "llama.cpp", uid, options)
        systems = [
            self.service("llmgrpc", server, client, uid),
            self.baseline("in-process engine", self.inprocess("engine", model, "llama.cpp", options)),
            self.baseline(
                "llama-cpp-python, one context",
                self.inprocess("runner", model, "llama.cpp", options),
                ours=False,
            ),
        ]
        print(f"llama.cpp, {threads} threads:", flush=True)
        await self.warm_up(systems)
        tokens = self.config.tokens["llama.cpp"]
        levels = await self.interleave(systems, (1, 16), lambda c: tokens)
        client.terminate(uid)
        return {"threads": threads, "tokens": tokens, "levels": levels}

    async def gateway(self, server: Llmgrpc, client: Client) -> dict:
        """llama.cpp through smg's OpenAI HTTP API against llmgrpc's own Generate on the same
        server and model: the same prompts as the same token ids, greedy, end of text ignored.
        Interleaved: at one stream request by request, at more level by level; the order swaps
        every repetition."""
        config, uid = self.config, self.gateway_uid
        listener = f"127.0.0.1:{self.engine_api_port}"
        smg = self.keep(SmgGateway(self.logs / "smg.log", listener, uid))
        token_ids = gateway_token_ids(listener, prompts(max(config.gateway_levels)))
        direct = GrpcStreams(server.endpoint, uid, token_ids)
        self._channels.append(direct)
        through = GatewayStreams(smg.base_url, uid, token_ids)
        cpu_pids = {"server": server.pid, "worker": client.get_model(uid).worker_pid, "client": os.getpid()}
        smg_pids = {**cpu_pids, "smg": smg.pid}
        systems = [
            System("Generate", lambda c, m: run_level(direct.opener(m), c, m), True, cpu_pids),
            System("smg", lambda c, m: run_level(through.opener(m), c, m), True, smg_pids),
        ]
        tokens = config.tokens["llama.cpp"]
        levels = {s.name: {c: [] for c in config.gateway_levels} for s in systems}
        try:
            print(f"gateway, {uid}:", flush=True)
            await self.warm_up(systems)
            for rep in range(config.reps):
                order = systems[rep % 2 :] + systems[: rep % 2]
                for concurrency in config.gateway_levels:
                    if concurrency == 1:
                        summaries = await self.alternate(order, concurrency, tokens)
                    else:
                        summaries = await self.same_turn(order, concurrency, tokens)
                    for name, summary in summaries.items():
                        levels[name][concurrency].append(summary)
        finally:
            await through.close()
        await self.release(smg)
        command = " ".join(smg.process.args[1:])
        return {
            "uid": uid,
            "tokens": tokens,
            "reps": config.reps,
            "requests_at_one_stream": config.overhead_requests,
            "smg_command": f"smg {command}",
            "levels": levels,
        }

    async def firehose(self) -> dict:
        config = self.config
        server = self.keep(self.llmgrpc("llmgrpc-firehose", max(config.firehose_levels)))
        server.wait_ready()
        with Client(server.endpoint) as client:
            client.launch(FIREHOSE, model_uid=FIREHOSE, timeout=600)
            system = self.service("llmgrpc + firehose engine", server, client, FIREHOSE)
            await self.warm_up([system])
            levels = await self.interleave(
                [system], config.firehose_levels, lambda c: max(1, config.firehose_tokens // c)
            )
        await self.release(server)
        return {"tokens_per_level": config.firehose_tokens, "levels": levels[system.name]}

    async def startup(self) -> dict:
        """Process start to health SERVING; LaunchModel of the tiny model until READY (files cached)."""
        results = {"server_ready_s": [], "launch_s": {engine: [] for engine in ENGINES}}
        for rep in range(self.config.startup_reps):
            server = self.keep(self.llmgrpc(f"llmgrpc-startup-{rep}", 16))
            results["server_ready_s"].append(server.wait_ready())
            with Client(server.endpoint) as client:
                for engine in ENGINES:
                    started = time.perf_counter()
                    self.launch(client, TINY, engine, f"tiny-{engine}")
                    results["launch_s"][engine].append(time.perf_counter() - started)
                    client.terminate(f"tiny-{engine}")
            await self.release(server)
        return results

    async def profile(self, server: Llmgrpc, client: Client) -> dict:
        """py-spy on the server and the worker while one scenario runs again and again."""
        config, results = self.config, {}
        duration, model = config.profile_s, config.scaling_model
        scenarios = [
            (f"{TINY}-llama.cpp", 1, config.overhead_tokens, f"{TINY}, llama.cpp, 1 stream"),
            (f"{model}-llama.cpp", 16, config.tokens["llama.cpp"], f"{model}, llama.cpp, 16 streams"),
        ]
        for uid, concurrency, tokens, title in scenarios:
            system = self.service(title, server, client, uid)
            worker = client.get_model(uid).worker_pid
            outputs = {
                "server": self.logs / f"profile-{uid}-server.txt",
                "worker": self.logs / f"profile-{uid}-worker.txt",
            }
            spies = [
                profiles.start(pid, duration, outputs[name])
                for name, pid in (("server", server.pid), ("worker", worker))
            ]
            await asyncio.sleep(1)  # py-spy attaches
            deadline = time.monotonic() + duration + 1
            while time.monotonic() < deadline:
                await self.measure(system, concurrency, tokens)
            for spy in spies:
                spy.wait(60)
            results[title] = {name: profiles.summarize(path, duration) for name, path in outputs.items()}
        return results

    def main_server(self) -> Llmgrpc:
        """The server of the overhead, scaling and gateway runs (the gateway's model on its own
        engine-contract listener)."""
        ports = json.dumps({self.gateway_uid: self.engine_api_port})
        server = self.keep(self.llmgrpc("llmgrpc", self.max_batch, "--engine-api-ports", ports))
        server.wait_ready()
        return server

    async def gateway_alone(self) -> dict:
        server = self.main_server()
        with Client(server.endpoint) as client:
            self.launch(client, self.config.scaling_model, "llama.cpp", self.gateway_uid)
            results = {"gateway": await self.gateway(server, client)}
        await self.release(server)
        return results

    async def run(self) -> dict:
        config = self.config
        results: dict = {}
        server = self.main_server()
        with Client(server.endpoint) as client:
            for model, engine in itertools.product({TINY, config.scaling_model}, ENGINES):
                self.launch(client, model, engine, f"{model}-{engine}")
            results["overhead"] = await self.overhead(server, client)
            results["scaling"] = await self.scaling(server, client)
            if self.threads > 1:
                results["spare_core"] = await self.spare_core(server, client)
            results["gateway"] = await self.gateway(server, client)
            if config.profile_s and profiles.available():
                results["profiles"] = await self.profile(server, client)
        await self.release(server)
        for process in list(self._running):  # the in-process baselines: done
            await self.release(process)
        print("firehose:", flush=True)
        results["firehose"] = await self.firehose()
        results["startup"] = await self.startup()
        return results


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="a smoke run of a few minutes")
    parser.add_argument(
        "--out", type=Path, help="report folder (default: docs, or build/bench-quick with --quick)"
    )
    parser.add_argument(
        "--work-dir", type=Path, default=ROOT / "build" / "bench", help="models, logs, raw results"
    )
    parser.add_argument(
        "--threads", type=int, default=os.cpu_count() or 1, help="CPU threads of every peer and baseline"
    )
    parser.add_argument("--reps", type=int, help="repetitions (default: 3, or 1 with --quick)")
    parser.add_argument(
        "--only",
        choices=["gateway"],
        help="measure this section alone, into the work folder's results.json of an earlier run",
    )
    args = parser.parse_args()
    config = QUICK if args.quick else FULL
    if args.reps:
        config = Config(**{**config.__dict__, "reps": args.reps})
    out = args.out or (ROOT / "build" / "bench-quick" if args.quick else ROOT / "docs")
    work = args.work_dir
    work.mkdir(parents=True, exist_ok=True)
    load_plugins([PLUGIN])  # the firehose family names it
    started = time.perf_counter()
    command = shlex.join([os.path.relpath(sys.executable), os.path.relpath(sys.argv[0]), *sys.argv[1:]])
    machine = report.machine(args.threads)
    machine["llama_cpp_defaults"] = {
        "threads": llama_cpp_threads(usable_cores()),
        "environment": dict(engine_info("llama.cpp").cpu_environment),
    }
    if config.scaling_model == BENCH_MODEL:
        hf_dir, _ = models.build_bench_model(work / "models")
        machine["bench_model_parameters"] = models.parameter_count(hf_dir)
    bench = Bench(config, work, args.threads)
    if args.only:
        earlier = report.load(work / "results.json")
        if earlier["quick"] != args.quick:
            kind = "a quick run" if earlier["quick"] else "a full run"
            raise SystemExit(f"{work / 'results.json'} is of {kind}: --only needs the same")
        section = asyncio.run(_run(bench, bench.gateway_alone()))[args.only]
        section.update(date=machine["date"], command=command, duration_s=time.perf_counter() - started)
        earlier["machine"]["versions"] = {**machine["versions"], **earlier["machine"]["versions"]}
        results = {
            **earlier,
            args.only: section,
            "errors": earlier["errors"] + bench.errors,
            "attempts": earlier["attempts"] + bench.attempts,
        }
        write_results(work, out, results, bench.errors)
        return
    results = asyncio.run(_run(bench, bench.run()))
    results.update(
        config=config.__dict__,
        machine=machine,
        command=command,
        quick=args.quick,
        errors=bench.errors,
        attempts=bench.attempts,
        outside_load_limit=OUTSIDE_LOAD_LIMIT,
        outside_load_min_s=OUTSIDE_LOAD_MIN_S,
        max_attempts=ATTEMPTS,
        quiet_wait_s=QUIET_WAIT_S,
        duration_s=time.perf_counter() - started,
    )
    write_results(work, out, results, bench.errors)


def write_results(work: Path, out: Path, results: dict, errors: list[str]) -> None:
    """results.json and the report; exit 1 where this run's llmgrpc streams had problems."""
    (work / "results.json").write_text(json.dumps(results, indent=1, default=str))
    path = report.write(results, out)
    print(f"report: {path}")
    if errors:
        print(f"{len(errors)} llmgrpc streams had problems:", *errors[:20], sep="\n  ")
        sys.exit(1)


async def _run(bench: Bench, sections: Awaitable[dict]) -> dict:
    try:
        return await sections
    finally:
        await bench.close()


if __name__ == "__main__":
    main()
