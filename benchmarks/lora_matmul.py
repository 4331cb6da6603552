"""Mixed-adapter decode steps in process: the Transformers engine's stacked LoRA matmul against
peft's ``adapter_names``, on bench-llama-100m.

One decode step of 16 rows (a KV cache of a 32-token prompt each), with torch's own linear
layers in both: the base model alone; the rows spread over 4 rank-8 adapters through
llmgrpc.engines.transformers_lora (all resident adapters in two products a layer, a mask per
row); and the same through peft's PeftModel with ``adapter_names`` per row (one pass of a layer
per adapter present). Steps alternate between the three; the median step time is reported.

Usage: python benchmarks/lora_matmul.py [--work build/bench-lora] [--steps 30] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import models
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, DynamicCache

from llmgrpc.engines.lora import LoraModule
from llmgrpc.engines.transformers_lora import LoraSlots
from llmgrpc.engines.weights import tiny_adapters

ROWS, PROMPT = 16, 32
ADAPTERS = ("tiny-lora-a", "tiny-lora-b", "tiny-lora-c", "tiny-lora-d")


def step_timer(model, vocab: int, adapter_rows: dict | None = None):
    """A function timing one decode step of ROWS rows after a prefill (fresh each call)."""

    @torch.inference_mode()
    def step() -> float:
        cache = DynamicCache()
        prompt = torch.randint(0, vocab, (ROWS, PROMPT))
        model(input_ids=prompt, cache=cache, use_cache=True, **(adapter_rows or {}))
        token = torch.randint(0, vocab, (ROWS, 1))
        started = time.perf_counter()
        model(input_ids=token, cache=cache, use_cache=True, **(adapter_rows or {}))
        return time.perf_counter() - started

    return step


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--work", type=Path, default=Path("build/bench-lora"))
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    work = args.work.resolve()
    hf_dir, _ = models.build_bench_model(work / "models")
    folders = [tiny_adapters.ensure(hf_dir, work / "models" / "adapters" / name, name) for name in ADAPTERS]
    names = [ADAPTERS[row % len(ADAPTERS)] for row in range(ROWS)]

    base = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    stacked = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    slots = LoraSlots(stacked, max_loras=len(ADAPTERS), max_rank=8)
    for name, folder in zip(ADAPTERS, folders, strict=True):
        slots.load(LoraModule(name, str(folder)), str(folder))
    for row, name in enumerate(names):
        slots.acquire(row, name)

    def masked(input_ids, **kwargs):
        """The stacked model, each row's mask set before the pass as the runner sets it (a row's
        mask covers all its tokens)."""
        slots.for_rows(list(range(ROWS)))
        return stacked(input_ids=input_ids, **kwargs)

    peft = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32),
        folders[0],
        adapter_name=ADAPTERS[0],
    )
    for name, folder in zip(ADAPTERS[1:], folders[1:], strict=True):
        peft.load_adapter(folder, adapter_name=name)
    peft.eval()

    vocab = int(base.config.vocab_size)
    timers = {
        "base model": step_timer(base, vocab),
        "stacked LoRA matmul (llmgrpc)": step_timer(masked, vocab),
        "peft adapter_names": step_timer(peft, vocab, {"adapter_names": names}),
    }
    times: dict[str, list[float]] = {name: [] for name in timers}
    for _ in range(args.steps):
        for name, timer in timers.items():
            times[name].append(timer())
    base_ms = statistics.median(times["base model"]) * 1000
    lines = ["| decode step, 16 rows over 4 adapters | ms (median) | vs base |", "| --- | ---: | ---: |"]
    for name, values in times.items():
        step_ms = statistics.median(values) * 1000
        lines.append(f"| {name} | {step_ms:.1f} | {base_ms / step_ms:.2f}x |")
    text = "\n".join(lines) + "\n"
    (work / "lora_matmul.md").write_text(text)
    print(text, end="")


if __name__ == "__main__":
    main()
