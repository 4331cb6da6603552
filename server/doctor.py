"""`llmgrpc doctor`: whether this host can run what is installed here.

It prints the CPU's features, each engine's build (llama.cpp's CPU variants or compiled-in
features, torch's CPU capability), whether the build's instructions are ones this CPU runs,
the GPUs seen and the caches with their free space; it exits non-zero, with the reasons, when
a build would not run here. The checks of a build are pure (``llamacpp_build.check_build``);
this module gathers the facts and prints them.
"""

from __future__ import annotations

import importlib.util
import os
import platform
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

from llmgrpc.engines import llamacpp_build
from llmgrpc.engines.probe import cuda_devices
from llmgrpc.server.settings import Settings

# The instruction-set flags an engine's build may use, in the order /proc/cpuinfo has them.
SHOWN_FLAGS = (
    "sse4_2",
    "avx",
    "f16c",
    "fma",
    "bmi2",
    "avx2",
    "avx_vnni",
    "avx512f",
    "avx512vbmi",
    "avx512_vnni",
    "avx512_bf16",
    "amx_tile",
    "amx_int8",
    "amx_bf16",
)


def cpu_facts(cpuinfo: str) -> tuple[str, set[str]]:
    """(model name, flags) of the first processor in a /proc/cpuinfo text."""
    model, flags = "unknown", set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and model == "unknown":
            model = value.strip()
        elif key == "flags" and not flags:
            flags = set(value.split())
    return model, flags


def _read_cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def _free_space(path: Path) -> str:
    existing = next((p for p in (path, *path.parents) if p.exists()), Path("/"))
    usage = shutil.disk_usage(existing)
    return f"{usage.free / 2**30:.1f} GiB free of {usage.total / 2**30:.1f} GiB"


def llama_cpp_section(flags: set[str], say: Callable[[str], None]) -> list[str]:
    """Print the llama.cpp build; return its problems on this host."""
    if importlib.util.find_spec("llama_cpp") is None:
        say("llama.cpp: not installed (pip install 'llmgrpc[llamacpp]')")
        return []
    try:
        report = llamacpp_build.describe(flags)
    except Exception as error:  # a build that does not even load is the finding
        say(f"llama.cpp: the library does not load: {error}")
        return [f"llama.cpp: the library does not load: {error}"]
    say(f"llama.cpp: llama-cpp-python {report.version} in {report.folder}")
    if report.variants:
        variants = ", ".join(
            f"{name}{'' if score else ' (not on this CPU)'}" for name, score in report.variants.items()
        )
        say(f"  runtime CPU dispatch, variants: {variants}")
        say(f"  this CPU runs: {report.chosen or 'none of them'}")
    else:
        say(f"  one CPU build, compiled-in features: {', '.join(report.features) or 'none'}")
    for problem in report.problems:
        say(f"  PROBLEM: {problem}")
    return [f"llama.cpp: {problem}" for problem in report.problems]


def torch_section(say: Callable[[str], None]) -> None:
    if importlib.util.find_spec("torch") is None:
        say("torch (Transformers): not installed (pip install 'llmgrpc[transformers]')")
        return
    import torch

    say(
        f"torch (Transformers): {torch.__version__}, CPU kernels: "
        f"{torch.backends.cpu.get_cpu_capability()}, CUDA build: {torch.version.cuda or 'no'}"
    )


def run(settings: Settings, say: Callable[[str], None] = print) -> int:
    """Print the report; 0 when every installed engine build runs on this host, else 1."""
    model, flags = cpu_facts(_read_cpuinfo())
    say(f"host: {platform.machine()}, Linux {platform.release()}, {os.cpu_count()} cores, {model}")
    say(f"  instruction sets: {' '.join(flag for flag in SHOWN_FLAGS if flag in flags) or 'baseline'}")
    say(f"python: {sys.executable}")
    problems = llama_cpp_section(flags, say)
    torch_section(say)
    devices = cuda_devices()
    gpus = ", ".join(f"{device['index']}: {device['name']}" for device in devices)
    say(f"GPUs: {gpus or 'none seen'}")
    say(f"model cache: {settings.cache_dir} ({_free_space(settings.cache_dir)})")
    hub_cache = settings.hub_cache_dir or Path(os.environ.get("HF_HOME", Path.home() / ".cache/huggingface"))
    say(f"hub cache: {hub_cache} ({_free_space(hub_cache)})")
    if problems:
        say("")
        say("doctor found problems:")
        for problem in problems:
            say(f"- {problem}")
        return 1
    say("doctor: every installed engine build runs on this host")
    return 0
