"""Constrained (JSON Schema) against unconstrained decoding: tok/s of the 100M bench model at 1
and 16 streams, on llama.cpp and Transformers, through one llmgrpc server.

Each stream samples (temperature 1, its own seed) max_tokens tokens (the schema requires a
long string, so constrained streams do not end sooner); throughput is generated tokens over
the wall time of the level. Rounds alternate between the two so neither gets a warmer machine; the median
round is reported, with the ratio constrained / unconstrained (the target is at least 0.8).

Usage: python benchmarks/constrained.py [--work build/bench-constrained] [--rounds 3]
           [--max-tokens 64] [--threads 2] [--quick]
Writes a Markdown table to stdout and WORK/constrained.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import models
from servers import Llmgrpc

from llmgrpc.clients import Client

ENGINES = {"llama.cpp": ("ggufv2", models.QUANTIZATION, "gguf"), "Transformers": ("pytorch", "none", "hf")}
# A long required string keeps every stream writing to max_tokens, as the unconstrained ones do
# (ending early would measure shorter outputs, not the mask); the schema constrains every token.
SCHEMA = {
    "type": "object",
    "properties": {
        "id": {"type": "integer"},
        "kind": {"enum": ["alpha", "beta", "gamma"]},
        "notes": {"type": "array", "items": {"type": "string", "minLength": 1000}, "minItems": 1},
    },
    "required": ["id", "kind", "notes"],
}


def level(client: Client, uid: str, streams: int, max_tokens: int, constrained: bool) -> float:
    schema = {"structured_output": {"json_schema": json.dumps(SCHEMA)}}
    fields = schema if constrained else {"ignore_eos": True}

    def one(seed: int) -> int:
        responses = client.generate(
            uid, f"Record {seed}:", max_tokens=max_tokens, temperature=1.0, seed=seed, timeout=600, **fields
        )
        return sum(len(response.token_ids) for response in responses)

    started = time.perf_counter()
    with ThreadPoolExecutor(streams) as pool:
        tokens = sum(pool.map(one, range(streams)))
    return tokens / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--work", type=Path, default=Path("build/bench-constrained"))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="one round of 32 tokens")
    args = parser.parse_args()
    rounds, max_tokens = (1, 32) if args.quick else (args.rounds, args.max_tokens)
    work = args.work.resolve()
    (work / "logs").mkdir(parents=True, exist_ok=True)
    models.build_bench_model(work / "models")
    families = models.write_families(work / "families")
    server = Llmgrpc(
        work / "logs" / "llmgrpc.log",
        *("--cache-dir", str(work / "cache"), "--families-dir", str(families), "--device", "cpu"),
        *("--max-running-requests", "16", "--max-waiting-requests", "64"),
        *("--allowed-model-dirs", str(work / "models")),
        # The bench families list the firehose engine too: the plugin must be importable.
        *("--engine-plugins", "firehose:ENGINE_INFO"),
        env={"PYTHONPATH": str(Path(__file__).resolve().parent)},
    )
    rows = []
    try:
        server.wait_ready(120)
        with Client(server.endpoint) as client:
            for engine, (model_format, quantization, folder) in ENGINES.items():
                options: dict = {"n_threads": args.threads}
                if engine == "llama.cpp":
                    options["context_length"] = 512 * 16
                uid = f"bench-{folder}"
                client.launch(
                    models.BENCH_MODEL,
                    model_engine=engine,
                    model_format=model_format,
                    quantization=quantization,
                    model_uid=uid,
                    model_path=str(work / "models" / folder),
                    engine_options=options,
                    timeout=600,
                )
                level(client, uid, 1, 8, constrained=True)  # compiles the schema once, warms up
                for streams in (1, 16):
                    free, constrained = [], []
                    for _ in range(rounds):
                        free.append(level(client, uid, streams, max_tokens, constrained=False))
                        constrained.append(level(client, uid, streams, max_tokens, constrained=True))
                    free_tps, constrained_tps = statistics.median(free), statistics.median(constrained)
                    rows.append((engine, streams, free_tps, constrained_tps, constrained_tps / free_tps))
                client.terminate(uid)
    finally:
        server.stop()
    table = [
        "| engine | streams | unconstrained tok/s | JSON Schema tok/s | ratio |",
        "| --- | ---: | ---: | ---: | ---: |",
        *(f"| {e} | {s} | {f:.0f} | {c:.0f} | {r:.2f} |" for e, s, f, c, r in rows),
    ]
    text = "\n".join(table) + "\n"
    (work / "constrained.md").write_text(text)
    print(text, end="")


if __name__ == "__main__":
    main()
