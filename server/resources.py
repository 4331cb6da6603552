"""How much memory a model needs, and how much a device has free: checked before a launch.

The estimate is the weights' bytes (from the files when they are on disk, else from the
spec's size and the format's bytes per weight) times an overhead factor for the KV
cache and activations. It is deliberately simple: its job is to refuse, before any
download, what cannot possibly fit (405B on a laptop), with the numbers.
"""

from __future__ import annotations

import os
from pathlib import Path

from llmgrpc.clients.errors import Reason, ResourceExhausted

# Bits per weight of llama.cpp's quantization types, as llama.cpp's quantize tool lists them.
GGUF_BITS_PER_WEIGHT = {
    "Q2_K": 2.96,
    "Q3_K_S": 3.50,
    "Q3_K_M": 3.91,
    "Q3_K_L": 4.27,
    "Q4_0": 4.55,
    "Q4_1": 5.0,
    "Q4_K_S": 4.58,
    "Q4_K_M": 4.89,
    "Q5_0": 5.54,
    "Q5_1": 6.0,
    "Q5_K_S": 5.54,
    "Q5_K_M": 5.70,
    "Q6_K": 6.56,
    "Q8_0": 8.50,
    "F16": 16.0,
    "F32": 32.0,
}
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
WEIGHT_SUFFIXES = (".safetensors", ".gguf", ".bin", ".pt")
GIB = 1024**3


def weight_bytes_on_disk(path: Path) -> int:
    """Bytes of the weight files at path (a file, or a folder of them); 0 if there are none."""
    if path.is_file():
        return path.stat().st_size
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and p.suffix in WEIGHT_SUFFIXES)
    return 0


def weight_bytes_from_size(size_billions: float, model_format: str, quantization: str, dtype: str) -> int:
    """Bytes of a spec's weights when none are on disk yet."""
    if model_format.startswith("gguf"):
        bits = GGUF_BITS_PER_WEIGHT.get(quantization.upper(), 16.0)
        return int(size_billions * 1e9 * bits / 8)
    return int(size_billions * 1e9 * DTYPE_BYTES.get(dtype, 2))


def kv_cache_bytes(config: dict, tokens: int, dtype: str) -> int:
    """Bytes of keys and values for tokens positions of a Hugging Face config's decoder."""
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    kv_heads = config.get("num_key_value_heads") or heads
    return 2 * config["num_hidden_layers"] * kv_heads * head_dim * DTYPE_BYTES.get(dtype, 2) * tokens


def free_cpu_bytes() -> int:
    """Memory available to new processes (MemAvailable), in bytes."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def check_fits(needed: int, free: int, what: str, device: str) -> None:
    if needed > free:
        raise ResourceExhausted(
            f"{what} needs about {needed / GIB:.1f} GiB on {device} but only {free / GIB:.1f} GiB is free; "
            "pick a smaller size or a quantized format, or free memory",
            reason=Reason.INSUFFICIENT_MEMORY,
            metadata={"needed_bytes": str(needed), "free_bytes": str(free), "device": device},
        )


def process_memory_bytes(pid: int) -> int:
    """Resident memory of a process, in bytes (0 if it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0
