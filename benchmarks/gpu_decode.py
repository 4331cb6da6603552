"""Decode speed of the Transformers engine's fast path against the GPU's memory roofline.

Builds a model of Llama-3.1-8B's shape with random bf16 weights directly on the GPU (no
download), measures the device's memory bandwidth with a device-to-device copy, then
times the engine's compiled static-cache runner (engines/transformers_static.py, the
CUDA default) at batch 1 and 16: decode tokens/s next to the roofline (bytes read per
decode step / bandwidth), time to first token, and GPU memory held next to the server's
estimate. Prints a Markdown report.

Usage: python benchmarks/gpu_decode.py [--shape 8b|tiny] [--steps 128] [--batches 1 16]
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from llmgrpc.engines.transformers_static import StaticCacheRunner
from llmgrpc.engines.weights import tiny_model
from llmgrpc.server import resources

SHAPES = {
    # Llama-3.1-8B's published configuration: LlamaConfig's defaults (Llama 2 7B's: hidden size
    # 4096, 32 layers of 32 attention heads, untied embeddings) but for these.
    "8b": dict(
        intermediate_size=14336, num_key_value_heads=8, vocab_size=128256, max_position_embeddings=131072
    ),
    # For checking this script on a CPU: the tiny model's shape.
    "tiny": dict(tiny_model.ARCHITECTURE, vocab_size=tiny_model.VOCAB_SIZE),
}
# Llama 3.1's RoPE scaling, as the tiny model has it.
ROPE = tiny_model.ROPE


class RandomTokenizer:
    """The runner's tokenizer interface, for a benchmark that feeds token ids only."""

    eos_token_id = None

    def decode(self, token_ids, skip_special_tokens=True) -> str:
        return ""


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def copy_bandwidth(device: torch.device, gib: float = 2.0, repeats: int = 10) -> float:
    """Bytes per second moved by a device-to-device copy, counting bytes read and written."""
    source = torch.empty(int(gib * 1024**3), dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    for _ in range(3):
        target.copy_(source)
    synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        target.copy_(source)
    synchronize(device)
    seconds = (time.perf_counter() - start) / repeats
    del source, target
    return 2 * gib * 1024**3 / seconds


def build_model(shape: str, device: torch.device, dtype: torch.dtype) -> LlamaForCausalLM:
    config = LlamaConfig(rope_parameters=dict(ROPE), eos_token_id=[0], **SHAPES[shape])
    config._attn_implementation = "sdpa"
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with device:
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default_dtype)
    model.generation_config.eos_token_id = [0]
    return model.eval()


def decode_bytes_per_step(model: LlamaForCausalLM, batch: int, context: int) -> int:
    """Bytes a decode step must read: every weight but the embedding table (one row is
    looked up), plus each sequence's keys and values so far."""
    element = next(model.parameters()).element_size()
    weights = sum(p.numel() for p in model.parameters()) - model.model.embed_tokens.weight.numel()
    kv = resources.kv_cache_bytes(model.config.to_dict(), batch * context, "bfloat16")
    return weights * element + kv


def print_profile(runner: StaticCacheRunner, last: dict[int, int], batch: int, steps: int = 8) -> None:
    """Where a decode step's time goes, on the host and on the device (to standard error)."""
    import sys

    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as profiler:
        for _ in range(steps):
            rows = runner.decode(last)
            last = {i: int(row.argmax()) for i, row in zip(last, rows, strict=True)}
    sort = "cuda_time_total" if torch.cuda.is_available() else "cpu_time_total"
    print(f"--- profile of {steps} decode steps at batch {batch}", file=sys.stderr)
    print(profiler.key_averages().table(sort_by=sort, row_limit=18), file=sys.stderr)
    print(profiler.key_averages().table(sort_by="cpu_time_total", row_limit=12), file=sys.stderr)


def run(
    shape: str,
    batches: list[int],
    steps: int,
    prompt_tokens: int,
    compile_step: bool,
    profile: bool = False,
) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    report: dict = {"device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu"}
    report["torch"] = torch.__version__
    bandwidth = copy_bandwidth(device, gib=2.0 if device.type == "cuda" else 0.25)
    report["copy_bandwidth_gb_s"] = bandwidth / 1e9

    started = time.perf_counter()
    model = build_model(shape, device, dtype)
    synchronize(device)
    report["build_seconds"] = time.perf_counter() - started
    parameters = sum(p.numel() for p in model.parameters())
    report["parameters"] = parameters
    report["estimate_bytes"] = int(
        resources.weight_bytes_from_size(parameters / 1e9, "pytorch", "none", "bfloat16") * 1.2
    )
    report["runs"] = []
    context = prompt_tokens + steps + 32  # warm-up, timed and profiled steps
    for batch in batches:
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        started = time.perf_counter()
        runner = StaticCacheRunner(model, RandomTokenizer(), context, batch, compile_step)
        generator = torch.Generator().manual_seed(batch)
        prompts = {
            i: torch.randint(1, model.config.vocab_size, (prompt_tokens,), generator=generator).tolist()
            for i in range(batch)
        }

        # Time to first token: one prompt alone, prefill then the logits on the host, after a
        # throwaway prefill has paid the one-time start-up costs (kernel selection, workspaces).
        runner.prefill([(-1, prompts[0])])
        runner.release(-1)
        synchronize(device)
        first = time.perf_counter()
        logits = runner.prefill([(0, prompts[0])])
        ttft = time.perf_counter() - first
        last = {0: int(logits[0].argmax())}
        if batch > 1:
            rest = runner.prefill([(i, prompts[i]) for i in range(1, batch)])
            last.update({i: int(row.argmax()) for i, row in zip(range(1, batch), rest, strict=True)})
        # Warm-up compiles the step and captures the CUDA graph.
        compile_started = time.perf_counter()
        for _ in range(3):
            rows = runner.decode(last)
            last = {i: int(row.argmax()) for i, row in zip(last, rows, strict=True)}
        synchronize(device)
        warmup = time.perf_counter() - compile_started
        timed = time.perf_counter()
        for _ in range(steps):
            rows = runner.decode(last)
            last = {i: int(row.argmax()) for i, row in zip(last, rows, strict=True)}
        synchronize(device)
        seconds = time.perf_counter() - timed
        if profile:
            print_profile(runner, last, batch)
        tokens_per_second = batch * steps / seconds
        mean_context = prompt_tokens + 3 + steps / 2
        roofline = batch * bandwidth / decode_bytes_per_step(model, batch, int(mean_context))
        run_report = {
            "batch": batch,
            "decode_tokens_per_s": tokens_per_second,
            "step_ms": 1000 * seconds / steps,
            "roofline_tokens_per_s": roofline,
            "fraction_of_roofline": tokens_per_second / roofline,
            "ttft_ms": 1000 * ttft,
            "setup_and_compile_s": warmup + (compile_started - started),
        }
        if device.type == "cuda":
            run_report["gpu_allocated_gib"] = torch.cuda.memory_allocated(device) / 1024**3
            run_report["gpu_peak_gib"] = torch.cuda.max_memory_allocated(device) / 1024**3
            run_report["static_kv_gib"] = (
                resources.kv_cache_bytes(model.config.to_dict(), batch * (context + 1), "bfloat16") / 1024**3
            )
        report["runs"].append(run_report)
        print(json.dumps(run_report), flush=True)
        del runner
    return report


def markdown(report: dict) -> str:
    lines = [
        f"Device: {report['device']}, torch {report['torch']}; model: {report['parameters'] / 1e9:.2f}B "
        f"parameters (random weights made on the device in {report['build_seconds']:.1f} s).",
        f"Device-to-device copy bandwidth (read + write): {report['copy_bandwidth_gb_s']:.0f} GB/s.",
        "Server's memory estimate for this model in bf16 (weights x 1.2): "
        f"{report['estimate_bytes'] / 1024**3:.1f} GiB.",
        "",
        "| batch | decode tok/s | step ms | roofline tok/s | of roofline | TTFT ms "
        "| GPU held GiB (peak) | static KV GiB | compile s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for run in report["runs"]:
        lines.append(
            f"| {run['batch']} | {run['decode_tokens_per_s']:.1f} | {run['step_ms']:.2f} | "
            f"{run['roofline_tokens_per_s']:.1f} | {100 * run['fraction_of_roofline']:.0f}% | "
            f"{run['ttft_ms']:.1f} | "
            f"{run.get('gpu_allocated_gib', 0):.1f} ({run.get('gpu_peak_gib', 0):.1f}) | "
            f"{run.get('static_kv_gib', 0):.2f} | {run['setup_and_compile_s']:.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shape", choices=sorted(SHAPES), default="8b")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--steps", type=int, default=128)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument(
        "--compile",
        default="yes",
        choices=["yes", "no"],
        help="compile the decode step (and, on CUDA, replay it as a CUDA graph), as the engine does",
    )
    parser.add_argument("--json", help="also write the report as JSON here")
    parser.add_argument(
        "--profile", action="store_true", help="print a profile of a few decode steps to stderr"
    )
    args = parser.parse_args()
    report = run(
        args.shape, args.batches, args.steps, args.prompt_tokens, args.compile == "yes", args.profile
    )
    if args.json:
        with open(args.json, "w") as out:
            json.dump(report, out, indent=2)
    print(markdown(report))


if __name__ == "__main__":
    main()
