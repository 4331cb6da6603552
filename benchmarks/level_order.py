"""Back-to-back 16-stream levels on one llama.cpp worker, through smg and straight to Generate,
in an order given on the command line: whether a level's speed depends on the path or on the
levels before it.

It starts the gateway section's setup (``suite.py``: one server, the bench model on llama.cpp
on its own engine-contract listener, smg in front of it), then runs the levels in the order
given, each ``--streams`` greedy streams of ``--tokens`` tokens, and prints per level its
tokens/s, when the streams' first and last tokens came, and the worker's CPU seconds.

    python benchmarks/level_order.py [--order smg,Generate,Generate,smg,smg,Generate]
        [--streams 16] [--tokens 128] [--work-dir build/bench]

It needs the bench model (``make bench`` writes it into the work folder).
"""

from __future__ import annotations

import argparse
import asyncio
import os
from pathlib import Path

from servers import SmgGateway, cpu_seconds, gateway_token_ids
from streams import GatewayStreams, GrpcStreams, prompts, run_level
from suite import FULL, PLUGIN, ROOT, Bench

from llmgrpc.clients import Client
from llmgrpc.engines.catalogue import load_plugins


async def main(order: list[str], streams: int, tokens: int, work: Path) -> None:
    load_plugins([PLUGIN])
    bench = Bench(FULL, work, os.cpu_count() or 1)
    try:
        server = bench.main_server()
        with Client(server.endpoint) as client:
            uid = bench.gateway_uid
            bench.launch(client, bench.config.scaling_model, "llama.cpp", uid)
            listener = f"127.0.0.1:{bench.engine_api_port}"
            smg = bench.keep(SmgGateway(bench.logs / "smg-level-order.log", listener, uid))
            token_ids = gateway_token_ids(listener, prompts(streams))
            paths = {
                "Generate": GrpcStreams(server.endpoint, uid, token_ids),
                "smg": GatewayStreams(smg.base_url, uid, token_ids),
            }
            worker = client.get_model(uid).worker_pid
            for index, name in enumerate(order):
                before = cpu_seconds(worker)
                level = await run_level(paths[name].opener(tokens), streams, tokens)
                worker_cpu = cpu_seconds(worker) - before
                start = min(stream.sent for stream in level.streams)
                firsts = sorted(s.sent + s.ttft - start for s in level.streams if s.arrivals)
                ends = sorted(stream.end - start for stream in level.streams)
                print(
                    f"{index + 1:>2} {name:<9} {level.tokens_per_s:6.0f} tok/s, first tokens "
                    f"{firsts[0] * 1000:.0f}-{firsts[-1] * 1000:.0f} ms, last {ends[0] * 1000:.0f}-"
                    f"{ends[-1] * 1000:.0f} ms, worker CPU {worker_cpu:.2f} s",
                    flush=True,
                )
            for path in paths.values():
                await path.close()
    finally:
        await bench.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--order", default="smg,Generate,Generate,smg,smg,Generate")
    parser.add_argument("--streams", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--work-dir", type=Path, default=ROOT / "build" / "bench")
    args = parser.parse_args()
    names = args.order.split(",")
    unknown = set(names) - {"smg", "Generate"}
    if unknown:
        parser.error(f"unknown paths {sorted(unknown)}: smg or Generate")
    asyncio.run(main(names, args.streams, args.tokens, args.work_dir))
