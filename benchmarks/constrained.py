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

import json
import statistics

import models

from llmgrpc.clients import Client

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

    return models.tokens_per_second(streams, one)


def main() -> None:
    args, rounds, max_tokens, work = models.bench_arguments(__doc__, "build/bench-constrained")
    server = models.bench_model_server(work)
    rows = []
    try:
        server.wait_ready(120)
        with Client(server.endpoint) as client:
            for engine in models.ENGINES:
                uid = models.launch_bench_model(client, work, engine, args.threads)
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
