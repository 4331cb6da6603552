"""Where a LoRA adapter's files come from: a local path the server checked, or a hub repository.

A path that starts with "/" is local (the server has already confined it to its
``allowed_model_dirs``); anything else is a hub repository id, fetched as a model's weights
are (``downloads.fetch_from``: the hub's own cache, the disk checked, progress reported),
from the plan's ``download_hub`` or, with "auto", from each hub in turn.
"""

from __future__ import annotations

from pathlib import Path

from llmgrpc.clients.errors import FailedPrecondition, Reason
from llmgrpc.engines.base import LoadPlan, ProgressReport
from llmgrpc.engines.lora import LoraModule
from llmgrpc.engines.weights import downloads, hubs

# A PEFT adapter's files, or a GGUF LoRA (llama.cpp).
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "*.gguf")


def is_local(path: str) -> bool:
    """Whether an adapter's path names a local file or folder (else a hub repository id)."""
    return path.startswith("/")


def resolve_adapter(module: LoraModule, plan: LoadPlan, report: ProgressReport) -> str:
    """A local path holding the adapter's files, downloading them first for a hub id."""
    if is_local(module.path):
        if not Path(module.path).exists():
            raise FailedPrecondition(
                f"adapter {module.name!r}: {module.path} does not exist on the server",
                reason=Reason.WEIGHTS_MISSING,
            )
        return module.path
    order = hubs.hub_order(list(hubs.HUBS), plan.download_hub, hubs.unavailable_reasons())
    wanted = downloads.Wanted(module.path, patterns=ADAPTER_FILES)
    return downloads.from_first_hub(
        order,
        plan.hub_cache_dir,
        lambda _, source: downloads.fetch_from(source, wanted, report, downloads.disk_free_bytes),
        f"adapter {module.path}",
    )
