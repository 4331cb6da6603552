"""The model hubs weights are downloaded from, and which of them a launch may use.

Importing this module imports no hub client. The engine probe (``llmgrpc.engines.probe``)
asks it which hubs each engine's environment can use, for the server to list the hubs as
available or not (``ListSpecs``) and to refuse a launch that cannot download before any
worker starts; the worker asks it to order the hubs it tries (``llmgrpc.engines.weights.downloads``).
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from llmgrpc.clients.errors import FailedPrecondition, FieldViolation, InvalidArgument, Reason

HUGGINGFACE = "huggingface"
MODELSCOPE = "modelscope"
AUTO = "auto"


@dataclass(frozen=True)
class HubInfo:
    """One hub: its client library, and the variables that configure that library."""

    name: str
    display_name: str
    module: str  # the client library, checked with find_spec (never imported here)
    install: str  # how to get the client library
    token_variable: str  # the token for gated or private repositories
    endpoint_variable: str  # where the hub is (a mirror, a proxy)


HUBS: dict[str, HubInfo] = {
    HUGGINGFACE: HubInfo(
        name=HUGGINGFACE,
        display_name="Hugging Face",
        module="huggingface_hub",
        install="pip install huggingface_hub (part of the transformers and llamacpp extras)",
        token_variable="HF_TOKEN",
        endpoint_variable="HF_ENDPOINT",
    ),
    MODELSCOPE: HubInfo(
        name=MODELSCOPE,
        display_name="ModelScope",
        module="modelscope",
        install="pip install 'llmgrpc[modelscope]'",
        token_variable="MODELSCOPE_API_TOKEN",
        endpoint_variable="MODELSCOPE_ENDPOINT",
    ),
}

# The values LaunchModelRequest.download_hub takes; empty means AUTO.
DOWNLOAD_HUBS = (AUTO, *HUBS)

# find_spec(module) -> None when the module is not installed (importlib.util.find_spec's shape).
FindSpec = Callable[[str], object]


def unavailable_reason(hub: str, find_spec: FindSpec = importlib.util.find_spec) -> str | None:
    """Why this environment cannot download from hub, or None when it can."""
    info = HUBS.get(hub)
    if info is None:
        return f"llmgrpc does not know the hub {hub!r}; hubs: {', '.join(HUBS)}"
    if find_spec(info.module) is None:
        client = f"the {info.display_name} client ({info.module})"
        return f"{client} is not installed in {sys.executable}: {info.install}"
    return None


def unavailable_reasons(find_spec: FindSpec = importlib.util.find_spec) -> dict[str, str | None]:
    """Each known hub's reason it cannot be used here, or None."""
    return {hub: unavailable_reason(hub, find_spec) for hub in HUBS}


def hub_order(spec_hubs: Iterable[str], download_hub: str, reasons: Mapping[str, str | None]) -> list[str]:
    """The hubs to try, in order, for a spec listing spec_hubs; or the error that says why none.

    download_hub: "huggingface" or "modelscope" (only that hub), or "auto"/"" (the spec's hubs in
    its order, skipping those whose client is missing). reasons: unavailable_reasons().
    """
    listed = list(spec_hubs)
    wanted = download_hub or AUTO
    if wanted not in DOWNLOAD_HUBS:
        raise InvalidArgument(
            f"download_hub {wanted!r} is not valid: {', '.join(DOWNLOAD_HUBS)}",
            [FieldViolation("download_hub", f"one of {', '.join(DOWNLOAD_HUBS)}")],
            reason=Reason.INVALID_FIELD,
        )
    if not listed:
        raise FailedPrecondition(
            "this spec lists no hub to download its weights from: give model_path",
            reason=Reason.WEIGHTS_MISSING,
        )
    if wanted != AUTO:
        if wanted not in listed:
            raise InvalidArgument(
                f"this spec's weights are not on {wanted}; its hubs: {', '.join(listed)} "
                "(or download_hub auto)",
                reason=Reason.HUB_NOT_LISTED,
            )
        candidates = [wanted]
    else:
        candidates = listed
    usable = [hub for hub in candidates if reasons.get(hub) is None and hub in HUBS]
    if not usable:
        why = "; ".join(f"{hub}: {reasons.get(hub) or 'unknown hub'}" for hub in candidates)
        raise FailedPrecondition(
            f"no hub this spec lists can be used here ({why})", reason=Reason.HUB_UNAVAILABLE
        )
    return usable
