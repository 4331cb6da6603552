"""Who may call what: bearer tokens with roles, and the model_path and remote-code policies.

Two roles: ``inference`` may call every GenerateService RPC (Generate, Tokenize, Detokenize)
and the read-only ModelService RPCs; ``admin`` may call everything, LaunchModel, TerminateModel
and LoadAdapter included. The KServe v2 and TGIS protocols follow suit: KServe's
RepositoryModelLoad and RepositoryModelUnload need ``admin``, their other RPCs ``inference``.
Any other method of the product's services needs ``admin`` (deny by default); health and
reflection are open, so probes and grpcurl's ``list`` work without a token.

Tokens are kept only as SHA-256 digests and compared with ``hmac.compare_digest``
against every known digest, so timing reveals neither a token nor which one matched.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

from llmgrpc.clients.errors import FieldViolation, InvalidArgument, PermissionDenied, Reason, Unauthenticated

ADMIN = "admin"
INFERENCE = "inference"
ROLES = (ADMIN, INFERENCE)

# Services whose every method the inference role may call: GenerateService's calls all use a model.
INFERENCE_SERVICES = ("/llmgrpc.v1.GenerateService/",)
# Other full method names the inference role may call; admin may call every method.
INFERENCE_METHODS = frozenset(
    {
        "/llmgrpc.v1.ModelService/ListSpecs",
        "/llmgrpc.v1.ModelService/ListModels",
        "/llmgrpc.v1.ModelService/GetModel",
        "/llmgrpc.v1.ModelService/WatchModel",
        "/llmgrpc.v1.ModelService/ListAdapters",
        # KServe v2: all but the repository's load and unload (LaunchModel, TerminateModel).
        *(
            f"/inference.GRPCInferenceService/{method}"
            for method in (
                "ServerLive",
                "ServerReady",
                "ModelReady",
                "ServerMetadata",
                "ModelMetadata",
                "ModelInfer",
                "ModelStreamInfer",
                "ModelStatistics",
                "RepositoryIndex",
            )
        ),
        # The vLLM engine contract, for model gateways: all but the cache and profiler controls.
        *(
            f"/vllm.grpc.engine.VllmEngine/{method}"
            for method in (
                "Generate",
                "Abort",
                "GetModelInfo",
                "GetServerInfo",
                "GetLoads",
                "GetTokenizer",
                "SubscribeKvEvents",
                "Embed",
            )
        ),
        # TGIS: every method.
        *(
            f"/fmaas.GenerationService/{method}"
            for method in ("Generate", "GenerateStream", "Tokenize", "ModelInfo")
        ),
    }
)
# Services anyone may call: probes and tools must work without credentials.
OPEN_SERVICES = frozenset(
    {
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
    }
)

# Methods anyone may call: a gateway's health probe of its worker, like grpc.health.v1's (it
# answers false, not UNAVAILABLE, while the server drains).
OPEN_METHODS = frozenset({"/vllm.grpc.engine.VllmEngine/HealthCheck"})


def service_of(method: str) -> str:
    """ "/pkg.Service/Method" -> "pkg.Service"."""
    return method.lstrip("/").partition("/")[0]


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest()


def read_tokens_file(path: Path) -> dict[str, str]:
    """Tokens from a file of lines "ROLE TOKEN" ('#' starts a comment): the shape of a mounted Secret."""
    tokens: dict[str, str] = {}
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        role, _, token = line.partition(" ")
        if role not in ROLES or not token.strip():
            raise ValueError(f"{path}:{number}: expected 'ROLE TOKEN' with ROLE one of {', '.join(ROLES)}")
        tokens[token.strip()] = role
    return tokens


class TokenTable:
    """The configured tokens; empty means authentication is off."""

    def __init__(self, tokens: Mapping[str, str]):
        for role in tokens.values():
            if role not in ROLES:
                raise ValueError(f"unknown role {role!r}: roles are {', '.join(ROLES)}")
        self._digests = [(_digest(token), role) for token, role in tokens.items()]

    @property
    def enabled(self) -> bool:
        return bool(self._digests)

    def role_of(self, authorization: str | None) -> str:
        """The role of an ``authorization`` metadata value, or Unauthenticated."""
        scheme, _, token = (authorization or "").strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthenticated(
                "this server needs a token: send metadata 'authorization: Bearer <token>'",
                reason=Reason.TOKEN_MISSING,
            )
        presented = _digest(token.strip())
        found = None
        for digest, role in self._digests:  # no early exit: every call compares every digest
            if hmac.compare_digest(presented, digest):
                found = role
        if found is None:
            raise Unauthenticated("the bearer token is not valid on this server", reason=Reason.TOKEN_INVALID)
        return found


def authorize(method: str, role: str) -> None:
    """Refuse a method the role may not call."""
    if role == ADMIN or method in INFERENCE_METHODS or method.startswith(INFERENCE_SERVICES):
        return
    raise PermissionDenied(
        f"role {role} may not call {method.lstrip('/')}; it needs role admin",
        reason=Reason.ROLE_NOT_ALLOWED,
        metadata={"role": role, "method": method},
    )


def check_model_path(model_path: str, allowed_dirs: Iterable[Path], field_name: str = "model_path") -> str:
    """The real path of model_path when it lies inside one of allowed_dirs; refuse it otherwise.

    Symbolic links and '..' are resolved first, so neither can lead outside the folders.
    field_name: the request field that gave it (an adapter's path, say).
    """
    if not model_path:
        return ""
    allowed = [Path(os.path.realpath(os.path.expanduser(folder))) for folder in allowed_dirs]
    if not allowed:
        raise PermissionDenied(
            f"{field_name} is off on this server: the operator allows local weights only inside the "
            "folders of the allowed_model_dirs setting, and none is set",
            reason=Reason.MODEL_PATH_NOT_ALLOWED,
        )
    if "\x00" in model_path:
        raise InvalidArgument(
            f"invalid request: {field_name} contains a NUL character",
            [FieldViolation(field_name, "must not contain NUL characters")],
            reason=Reason.INVALID_FIELD,
        )
    try:
        real = Path(os.path.realpath(os.path.expanduser(model_path)))
    except (OSError, ValueError) as error:
        raise InvalidArgument(
            f"invalid request: {field_name} cannot be resolved ({error})",
            [FieldViolation(field_name, "not a usable path on the server")],
            reason=Reason.INVALID_FIELD,
        ) from None
    if not any(real == folder or folder in real.parents for folder in allowed):
        raise PermissionDenied(
            f"{field_name} {model_path!r} is outside the folders this server allows "
            f"({', '.join(str(folder) for folder in allowed)}; links and '..' are followed first)",
            reason=Reason.MODEL_PATH_NOT_ALLOWED,
        )
    return str(real)


def check_engine_options(engine_options: Mapping[str, object], allow_trust_remote_code: bool) -> None:
    """Refuse trust_remote_code (running a repository's own Python) unless the operator allows it."""
    if engine_options.get("trust_remote_code") and not allow_trust_remote_code:
        raise PermissionDenied(
            "engine_options.trust_remote_code runs code from the model's repository and is off on "
            "this server (setting allow_trust_remote_code)",
            reason=Reason.TRUST_REMOTE_CODE_DISABLED,
        )
