"""What environment a worker (or an engine probe) process starts with: an allow-list, not a copy.

A worker runs an engine library and, with ``trust_remote_code`` allowed, a repository's own
code: it must not hold the server's secrets (``LLMGRPC_AUTH_TOKENS``, a hub token it does
not need, cloud credentials). It gets what the interpreter, the engine libraries and the
hub clients read, by exact name or prefix, and the hub tokens only when it may download.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping

from llmgrpc.engines.catalogue import PLUGINS_ENV
from llmgrpc.engines.weights.hubs import HUBS
from llmgrpc.server.settings import Settings

# Read by the interpreter, the C runtime, the linker, locales and TLS.
_SYSTEM = frozenset(
    {
        "PATH", "HOME", "USER", "LOGNAME", "SHELL", "TERM", "TZ", "LANG", "LANGUAGE", "TMPDIR",
        "VIRTUAL_ENV", "LD_LIBRARY_PATH", "LD_PRELOAD", "SSL_CERT_FILE", "SSL_CERT_DIR",
        "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "XDG_CACHE_HOME", "XDG_CONFIG_HOME",
        "NO_PROXY", "no_proxy", "HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy",
    }
)  # fmt: skip

# Families of settings of the runtime and the engine libraries (threads, devices, caches, logs).
_PREFIXES = (
    "LC_", "PYTHON", "CUDA_", "NVIDIA_", "NCCL_", "OMP_", "KMP_", "GOMP_", "MKL_", "OPENBLAS_",
    "TORCH", "PYTORCH_", "TRITON_", "VLLM_", "SGLANG_", "GGML_", "LLAMA_", "TOKENIZERS_",
    "TRANSFORMERS_", "HF_", "HUGGINGFACE_", "MODELSCOPE_", "OTEL_",
)  # fmt: skip

# Hub credentials: passed only to a worker that may download from a hub.
HUB_TOKENS = frozenset(hub.token_variable for hub in HUBS.values()) | {"HUGGING_FACE_HUB_TOKEN"}


def inherited_environment(
    environ: Mapping[str, str], *, hub_credentials: bool, also: Iterable[str] = ()
) -> dict[str, str]:
    """The part of the server's environment a worker or probe may see; also: more names to pass."""
    extra = frozenset(also)
    return {
        name: value
        for name, value in environ.items()
        if (name in _SYSTEM or name in extra or name.startswith(_PREFIXES))
        and (hub_credentials or name not in HUB_TOKENS)
    }


def worker_environment(
    settings: Settings,
    engine_defaults: Iterable[tuple[str, str]] = (),
    *,
    hub_credentials: bool = False,
    environ: Mapping[str, str] = os.environ,
) -> dict[str, str]:
    """A worker's whole environment: the allow-listed part of the server's (with the names the
    operator adds in settings.worker_environment_names), the engine's own variables for where it
    runs (the server's value where it sets one, else the engine's default), and what it needs of
    the server's settings (how to log and trace, which engine plugins to load)."""
    engine_defaults = dict(engine_defaults)
    inherited = inherited_environment(
        environ,
        hub_credentials=hub_credentials,
        also=[*settings.worker_environment_names, *engine_defaults],
    )
    return {
        **engine_defaults,
        **inherited,
        PLUGINS_ENV: json.dumps(settings.engine_plugins),
        "LLMGRPC_LOG_LEVEL": settings.log_level,
        "LLMGRPC_LOG_FORMAT": settings.log_format,
        "LLMGRPC_TRACE_EXPORTER": settings.trace_exporter,
    }
