"""Report, as JSON on stdout, which engines and model hubs can be used in this Python environment.

The server runs ``python -m llmgrpc.engines.probe`` with each engine's interpreter, so
that it never imports an engine library itself, and so that a hub counts as usable only
where that engine's workers would download from it. Output:
``{"engines": {"Transformers": null, "vLLM": "needs a CUDA GPU ..."}, "hubs": {"huggingface":
null, "modelscope": "the ModelScope client ..."}, "cuda_devices": [{"index": 0, "name": "...",
"free_bytes": ..., "total_bytes": ...}], "python": "..."}`` where a null reason means it can be used.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from typing import Any

from llmgrpc.engines.catalogue import EngineInfo, engines, load_plugins_from_environment
from llmgrpc.engines.weights import hubs


def cuda_devices() -> list[dict[str, Any]]:
    """The CUDA devices torch sees here, with their free memory; empty without torch or GPU."""
    if importlib.util.find_spec("torch") is None:
        return []
    import torch

    if not torch.cuda.is_available():
        return []
    devices = []
    for index in range(torch.cuda.device_count()):
        free, total = torch.cuda.mem_get_info(index)
        devices.append(
            {
                "index": index,
                "name": torch.cuda.get_device_name(index),
                "free_bytes": free,
                "total_bytes": total,
            }
        )
    return devices


def unavailable_reason(info: EngineInfo, has_cuda: bool) -> str | None:
    """Why info's engine cannot run in this environment, or None when it can."""
    missing = [module for module in info.required_modules if importlib.util.find_spec(module) is None]
    if missing:
        return f"{', '.join(missing)} not installed in {sys.executable}: {info.install_hint}"
    if info.needs_cuda and not has_cuda:
        return f"{info.name} needs a CUDA GPU and none is visible to {sys.executable}"
    if info.platform_check:
        return PLATFORM_CHECKS[info.platform_check]()
    if info.not_built:
        return info.not_built
    return None


def vllm_platform() -> str | None:
    """vLLM's own answer: the platform it detects, empty when it can run on none here."""
    try:
        from vllm.platforms import current_platform
    except Exception as error:  # a broken install (ABI mismatch with torch, ...) must not break the probe
        return f"vLLM is installed in {sys.executable} but does not import: {error!r}"
    if not current_platform.device_type:
        return (
            f"vLLM in {sys.executable} finds no device it supports: its PyPI wheels need a CUDA GPU; "
            "on a CPU, use a CPU build of vLLM"
        )
    return None


PLATFORM_CHECKS = {"vllm_platform": vllm_platform}


def probe() -> dict[str, Any]:
    devices = cuda_devices()
    return {
        "python": sys.executable,
        "engines": {info.name: unavailable_reason(info, bool(devices)) for info in engines()},
        "hubs": hubs.unavailable_reasons(),
        "cuda_devices": devices,
    }


if __name__ == "__main__":
    load_plugins_from_environment()  # the server's engine_plugins
    json.dump(probe(), sys.stdout)
