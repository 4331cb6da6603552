"""LoRA adapters in one batch: tok/s of the 100M bench model with 16 streams spread over 4
adapters, against the same 16 streams all on the base model, on Transformers and llama.cpp,
through one llmgrpc server.

The adapters are made with peft for the bench model, as the tiny model's are (rank 8 on
q/k/v/o, seeded; llmgrpc.engines.weights.tiny_adapters), and loaded at launch. Each stream
samples (temperature 1, its own seed, ignore_eos) max_tokens tokens; throughput is generated
tokens over the wall time of the level. Rounds alternate between the two levels; the median
round is reported, with the ratio adapters / base (the target is at least 0.8).

Usage: python benchmarks/lora.py [--work build/bench-lora] [--rounds 3] [--max-tokens 64]
           [--threads 2] [--quick]
Writes a Markdown table to stdout and WORK/lora.md, and (not with --quick) puts it in
docs/benchmarks.md (section "LoRA adapters", after the suite's own, which make bench writes first).
"""

from __future__ import annotations

import statistics
from pathlib import Path

import models

from llmgrpc.clients import Client
from llmgrpc.engines.weights import tiny_adapters
from llmgrpc.v1 import models_pb2

DOCS = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"
SECTION = "## LoRA adapters"
EXPLANATION = (
    "`benchmarks/lora.py` (part of `make bench`): bench-llama-100m, 16 streams sampling {max_tokens} "
    "tokens each, all on the base model against the same spread over 4 rank-8 adapters on q/k/v/o "
    "(4 streams each), {threads} threads, median of {rounds} rounds; target: at least 0.8x. "
    "Transformers multiplies every row by all resident adapters in two matrix products a layer "
    "(one pass); llama.cpp applies adapters per context, so a step runs one `llama_decode` per "
    "adapter present (docs/engines.md, *LoRA adapters*)."
)
STREAMS = 16
ADAPTERS = ("tiny-lora-a", "tiny-lora-b", "tiny-lora-c", "tiny-lora-d")


def level(client: Client, uid: str, max_tokens: int, adapters: tuple[str, ...]) -> float:
    """tok/s of STREAMS streams, stream i on adapters[i % len] (none given: the base model)."""

    def one(index: int) -> int:
        adapter = adapters[index % len(adapters)] if adapters else ""
        responses = client.generate(
            uid,
            f"Record {index}:",
            max_tokens=max_tokens,
            temperature=1.0,
            seed=index,
            ignore_eos=True,
            adapter=adapter,
            timeout=600,
        )
        return sum(len(response.token_ids) for response in responses)

    return models.tokens_per_second(STREAMS, one)


def main() -> None:
    args, rounds, max_tokens, work = models.bench_arguments(__doc__, "build/bench-lora")
    server = models.bench_model_server(work)
    hf_dir = work / "models" / "hf"
    adapter_dir = work / "models" / "adapters"
    modules = [
        models_pb2.LoraModule(name=name, path=str(tiny_adapters.ensure(hf_dir, adapter_dir / name, name)))
        for name in ADAPTERS
    ]
    rows = []
    try:
        server.wait_ready(120)
        with Client(server.endpoint) as client:
            for engine in models.ENGINES:
                uid = models.launch_bench_model(client, work, engine, args.threads, lora_modules=modules)
                level(client, uid, 8, ADAPTERS)  # warms up every adapter
                base, spread = [], []
                for _ in range(rounds):
                    base.append(level(client, uid, max_tokens, ()))
                    spread.append(level(client, uid, max_tokens, ADAPTERS))
                base_tps, spread_tps = statistics.median(base), statistics.median(spread)
                rows.append((engine, base_tps, spread_tps, spread_tps / base_tps))
                client.terminate(uid)
    finally:
        server.stop()
    table = [
        f"| engine | {STREAMS} streams on the base, tok/s "
        f"| spread over {len(ADAPTERS)} adapters, tok/s | ratio |",
        "| --- | ---: | ---: | ---: |",
        *(f"| {e} | {b:.0f} | {s:.0f} | {r:.2f} |" for e, b, s, r in rows),
    ]
    text = "\n".join(table) + "\n"
    (work / "lora.md").write_text(text)
    explanation = EXPLANATION.format(threads=args.threads, max_tokens=max_tokens, rounds=rounds)
    if not args.quick:  # a smoke run's numbers stay out of the report
        put_section(DOCS, SECTION, f"{SECTION}\n\n{explanation}\n\n{text}")
    print(text, end="")


def put_section(path: Path, title: str, text: str) -> None:
    """Replace the section titled title in the Markdown file at path (up to the next "## "), or
    put it before "## Machine and versions"."""
    document = path.read_text()
    start = document.find(title + "\n")
    if start < 0:
        start = end = document.find("## Machine and versions")
    else:
        end = document.find("\n## ", start + len(title))
        end = len(document) if end < 0 else end + 1
    if start < 0:
        start = end = len(document)
    path.write_text(document[:start] + text + "\n" + document[end:])


if __name__ == "__main__":
    main()
