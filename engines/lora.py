"""LoRA adapters: their names, their PEFT files, and whether a base model can take one.

An adapter arrives as PEFT writes it (``adapter_config.json`` and
``adapter_model.safetensors``): for each adapted linear layer W (out x in), a pair A
(r x in) and B (out x r), so that the layer computes ``W x + scale * B (A x)`` with
``scale = lora_alpha / r`` (``lora_alpha / sqrt(r)`` with rsLoRA) times the scale the
adapter was loaded with. Engines read it here and check it against their base model's
linear layers (``check_fits``) before anything is installed, so a mismatch is refused
naming itself, never found in the middle of a forward pass.
"""

from __future__ import annotations

import json
import math
import re
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from llmgrpc.clients.errors import FailedPrecondition, FieldViolation, InvalidArgument, NotFound, Reason

if TYPE_CHECKING:  # numpy is the engines' (the server reads only the names and paths)
    import numpy as np

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
NAME_PATTERN = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
DEFAULT_MAX_LORAS = 4
DEFAULT_MAX_LORA_RANK = 16
MAX_LORAS_LIMIT = 64
MAX_LORA_RANK_LIMIT = 512
# PEFT's key of an adapted layer's matrices: <prefix>.<module path>.lora_A.weight.
_PEFT_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<which>[AB])(?:\.[^.]+)?\.weight$")


@dataclass(frozen=True)
class LoraModule:
    """An adapter to serve: its name for requests, where its files are, its scale."""

    name: str
    path: str
    scale: float = 1.0

    @classmethod
    def from_pb(cls, pb) -> LoraModule:
        """From a llmgrpc.v1.LoraModule."""
        return cls(pb.name, pb.path, pb.scale if pb.HasField("scale") else 1.0)

    def to_json_dict(self) -> dict:
        return {"name": self.name, "path": self.path, "scale": self.scale}


@dataclass
class LoraLayer:
    """One adapted linear layer: A (r x in) and B (out x r), float32."""

    a: np.ndarray
    b: np.ndarray


@dataclass
class PeftAdapter:
    """An adapter read from its PEFT folder; scaling already combines alpha, r and the load scale."""

    name: str
    rank: int
    alpha: float
    scaling: float
    target_modules: tuple[str, ...]  # the short names adapted, e.g. ("q_proj", "v_proj")
    layers: dict[str, LoraLayer] = field(default_factory=dict)  # by module path in the base model


def check_name(name: str, field_name: str) -> None:
    """Refuse an adapter name requests could not spell (KServe's base:adapter needs no colon in it)."""
    if not NAME_PATTERN.match(name):
        description = "must be 1 to 64 letters, digits, '.', '_' or '-'"
        raise InvalidArgument(
            f"{field_name} {name!r} {description}",
            [FieldViolation(field_name, description)],
            reason=Reason.INVALID_FIELD,
        )


def read_peft_adapter(name: str, folder: Path, scale: float = 1.0) -> PeftAdapter:
    """The adapter in a PEFT folder; a folder that is not one is refused saying what it lacks."""
    from safetensors.numpy import load_file

    config_path, weights_path = folder / CONFIG_FILE, folder / WEIGHTS_FILE
    if not (config_path.is_file() and weights_path.is_file()):
        raise FailedPrecondition(
            f"adapter {name!r}: {folder} is not a PEFT adapter folder (it needs {CONFIG_FILE} and "
            f"{WEIGHTS_FILE})",
            reason=Reason.MODEL_FILES_INVALID,
        )
    config = json.loads(config_path.read_text())
    kind = config.get("peft_type", "LORA")
    unsupported = [
        what
        for what, present in (
            (f"peft_type {kind}", kind != "LORA"),
            ("DoRA (use_dora)", bool(config.get("use_dora"))),
            ("per-layer ranks (rank_pattern)", bool(config.get("rank_pattern"))),
            ("per-layer alphas (alpha_pattern)", bool(config.get("alpha_pattern"))),
        )
        if present
    ]
    if unsupported:
        raise FailedPrecondition(
            f"adapter {name!r} uses {', '.join(unsupported)}: only plain LoRA adapters are served",
            reason=Reason.MODEL_FILES_INVALID,
        )
    rank, alpha = int(config["r"]), float(config.get("lora_alpha", config["r"]))
    scaling = (alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank) * scale
    pairs: dict[str, dict[str, np.ndarray]] = {}
    for key, tensor in load_file(str(weights_path)).items():
        match = _PEFT_KEY.match(key)
        if match is None:
            raise FailedPrecondition(
                f"adapter {name!r} holds {key}, which is not a LoRA matrix: only plain LoRA adapters "
                "are served",
                reason=Reason.MODEL_FILES_INVALID,
            )
        pairs.setdefault(match["module"], {})[match["which"]] = tensor.astype("float32")
    layers = {}
    for module, pair in pairs.items():
        if set(pair) != {"A", "B"}:
            raise FailedPrecondition(
                f"adapter {name!r} has lora_A without lora_B (or the reverse) for {module}",
                reason=Reason.MODEL_FILES_INVALID,
            )
        layers[module] = LoraLayer(pair["A"], pair["B"])
    targets = tuple(sorted({module.rsplit(".", 1)[-1] for module in layers}))
    return PeftAdapter(name, rank, alpha, scaling, targets, layers)


def check_fits(
    adapter: PeftAdapter, base_layers: Mapping[str, tuple[int, int]] | None, max_rank: int
) -> None:
    """Refuse an adapter its base cannot take, naming the mismatch: a rank above max_rank, a
    layer the base lacks (another architecture, or target modules it has not), or a layer
    shaped otherwise (another hidden size). base_layers: (out, in) of each linear layer; None
    where they are not known here (the library checks the shapes itself)."""

    def refuse(why: str) -> FailedPrecondition:
        return FailedPrecondition(
            f"adapter {adapter.name!r} does not fit the base model: {why}",
            reason=Reason.ADAPTER_INCOMPATIBLE,
            metadata={"adapter": adapter.name},
        )

    if adapter.rank > max_rank:
        raise refuse(f"its rank {adapter.rank} is above the model's max_lora_rank {max_rank}")
    if base_layers is None:
        return
    missing = sorted(module for module in adapter.layers if module not in base_layers)
    if missing:
        have = sorted({module.rsplit(".", 1)[-1] for module in base_layers})
        raise refuse(
            f"it adapts {len(missing)} layers the base lacks (e.g. {missing[0]}; another architecture, "
            f"or target modules {', '.join(adapter.target_modules)} where the base's linear layers are "
            f"{', '.join(have)})"
        )
    for module, layer in adapter.layers.items():
        out_features, in_features = base_layers[module]
        rank = layer.a.shape[0]
        if layer.a.shape != (rank, in_features) or layer.b.shape != (out_features, rank):
            raise refuse(
                f"{module} is {out_features}x{in_features} in the base but the adapter's matrices are "
                f"A {tuple(layer.a.shape)} and B {tuple(layer.b.shape)} (another hidden size)"
            )
        if rank > max_rank:
            raise refuse(f"{module} has rank {rank}, above the model's max_lora_rank {max_rank}")


# Model types with Llama's linear layers: self_attn.{q,k,v,o}_proj and mlp.{gate,up,down}_proj.
LLAMA_SHAPED = frozenset({"llama", "mistral", "qwen2", "qwen3"})


def llama_layer_shapes(
    n_layer: int, n_embd: int, n_head: int, n_head_kv: int, head_dim: int, n_ff: int
) -> dict[str, tuple[int, int]]:
    """(out, in) of each linear layer of a Llama, by its Hugging Face module path."""
    shapes = {
        "self_attn.q_proj": (n_head * head_dim, n_embd),
        "self_attn.k_proj": (n_head_kv * head_dim, n_embd),
        "self_attn.v_proj": (n_head_kv * head_dim, n_embd),
        "self_attn.o_proj": (n_embd, n_head * head_dim),
        "mlp.gate_proj": (n_ff, n_embd),
        "mlp.up_proj": (n_ff, n_embd),
        "mlp.down_proj": (n_embd, n_ff),
    }
    return {
        f"model.layers.{layer}.{name}": shape for layer in range(n_layer) for name, shape in shapes.items()
    }


def config_layer_shapes(config: Mapping) -> dict[str, tuple[int, int]] | None:
    """The linear layers of a Hugging Face config.json's model, where it is Llama-shaped; else None."""
    if config.get("model_type") not in LLAMA_SHAPED:
        return None
    n_head = int(config["num_attention_heads"])
    return llama_layer_shapes(
        n_layer=int(config["num_hidden_layers"]),
        n_embd=int(config["hidden_size"]),
        n_head=n_head,
        n_head_kv=int(config.get("num_key_value_heads") or n_head),
        head_dim=int(config.get("head_dim") or int(config["hidden_size"]) // n_head),
        n_ff=int(config["intermediate_size"]),
    )


def unknown_adapter(name: str, known: list[str], model_uid: str = "") -> NotFound:
    """The error for a request naming an adapter the model does not have."""
    return NotFound(
        f"model {model_uid or 'this model'} has no adapter {name!r}; its adapters: "
        f"{', '.join(known) or 'none'} (leave adapter empty for the base model)",
        reason=Reason.ADAPTER_NOT_FOUND,
        metadata={"adapter": name, **({"model_uid": model_uid} if model_uid else {})},
    )


class LibraryAdapters:
    """The adapters of an engine whose library loads and batches them itself (vLLM, SGLang):
    their names, paths and ranks, checked here before the library ever sees them.

    The library applies an adapter at its own scale (lora_alpha / r): a scale other than 1 is
    refused rather than silently ignored."""

    def __init__(self, library: str, max_rank: int):
        self.library, self.max_rank = library, max_rank
        self._lock = threading.Lock()
        self._paths: dict[str, str] = {}
        self._ranks: dict[str, int] = {}

    def load(self, module: LoraModule, path: str, base_layers: Mapping[str, tuple[int, int]] | None) -> int:
        """Check the adapter (against base_layers when known) and keep it; its rank."""
        if module.scale != 1.0:
            raise FailedPrecondition(
                f"adapter {module.name!r}: {self.library} applies an adapter at its own scale "
                f"(lora_alpha / r), so scale {module.scale} cannot be honoured here: leave scale unset",
                reason=Reason.ADAPTER_INCOMPATIBLE,
            )
        adapter = read_peft_adapter(module.name, Path(path))
        check_fits(adapter, base_layers, self.max_rank)
        with self._lock:
            self._paths[module.name], self._ranks[module.name] = path, adapter.rank
        return adapter.rank

    def unload(self, name: str) -> None:
        with self._lock:
            if name not in self._paths:
                raise unknown_adapter(name, sorted(self._paths))
            del self._paths[name], self._ranks[name]

    def path(self, name: str) -> str:
        """The adapter a request names, or NOT_FOUND."""
        with self._lock:
            if name not in self._paths:
                raise unknown_adapter(name, sorted(self._paths))
            return self._paths[name]

    def ranks(self) -> dict[str, int]:
        with self._lock:
            return dict(self._ranks)
