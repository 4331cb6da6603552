"""A loaded model's vocabulary facts and tokenizer folder, for the gateways' engine contract.

Owner: the vLLM engine contract (``llmgrpc.server.engine_api``). A model gateway that routes
to llmgrpc tokenizes and applies chat templates itself, so it needs the model's tokenizer,
exactly as the engine tokenizes, and its end-of-generation ids (it never sends them as stop
ids: the engine stops on them itself). The worker answers both from here (its ``Describe``):

- Hugging Face weights (a folder): the folder itself holds the tokenizer files; the facts
  come from its ``config.json`` and the engine's own end-of-generation ids;
- GGUF weights (a file): a tokenizer folder is built once from the GGUF's own vocabulary
  (its tokens, merges and special ids, with its chat template) by Hugging Face's GGUF
  converter and kept under the cache folder, so the gateway's ids are the engine's.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmgrpc.clients.errors import FailedPrecondition, Reason

# The files of a Hugging Face tokenizer a gateway reads (the ones a folder has, of these).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "config.json",
    "generation_config.json",
)
# Where tokenizer folders built from GGUF files are kept, under the server's cache folder.
GGUF_TOKENIZERS = "gguf-tokenizers"


@dataclass(frozen=True)
class ModelFacts:
    """What a gateway needs to know of a model's vocabulary; ids -1 where there is none."""

    eos_token_ids: list[int]
    bos_token_id: int
    pad_token_id: int
    vocab_size: int
    model_type: str
    architectures: list[str] = field(default_factory=list)
    tokenizer_dir: str = ""
    model_path: str = ""


def _id(value: Any) -> int:
    if isinstance(value, list):
        value = value[0] if value else None
    return int(value) if isinstance(value, int) and not isinstance(value, bool) else -1


def _ids(value: Any) -> list[int]:
    values = value if isinstance(value, list) else [value]
    return [int(v) for v in values if isinstance(v, int) and not isinstance(v, bool)]


def _read_json(path: Path) -> dict:
    try:
        document = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return document if isinstance(document, dict) else {}


def _engine_facts(engine: Any) -> tuple[list[int], int]:
    """The engine's own end-of-generation ids and vocabulary size, where its runner tells them."""
    runner = getattr(engine, "runner", None)
    eos = sorted(getattr(runner, "eos_token_ids", None) or [])
    return [int(token) for token in eos], int(getattr(runner, "vocab_size", 0) or 0)


def folder_facts(folder: Path, engine: Any = None) -> ModelFacts:
    """The facts of a folder of Hugging Face weights (its own tokenizer files)."""
    config = _read_json(folder / "config.json")
    generation = _read_json(folder / "generation_config.json")
    eos, vocab_size = _engine_facts(engine)
    if not eos:
        eos = sorted(set(_ids(generation.get("eos_token_id")) + _ids(config.get("eos_token_id"))))
    if not (folder / "tokenizer.json").is_file() and not (folder / "tokenizer.model").is_file():
        raise FailedPrecondition(
            f"the model's folder {folder} has no tokenizer.json or tokenizer.model: a gateway cannot "
            "tokenize for it",
            reason=Reason.MODEL_FILES_INVALID,
        )
    return ModelFacts(
        eos_token_ids=eos,
        bos_token_id=_id(generation.get("bos_token_id", config.get("bos_token_id"))),
        pad_token_id=_id(generation.get("pad_token_id", config.get("pad_token_id"))),
        vocab_size=vocab_size or int(config.get("vocab_size") or 0),
        model_type=str(config.get("model_type") or ""),
        architectures=[str(a) for a in config.get("architectures") or []],
        tokenizer_dir=str(folder),
        model_path=str(folder),
    )


def _gguf_field(reader: Any, key: str) -> Any:
    """A scalar, string or list value of a GGUF metadata key (None when absent)."""
    found = reader.fields.get(key)
    if found is None:
        return None
    values = [found.contents(index) for index in range(len(found.data))] if found.data else []
    return values[0] if len(values) == 1 else values


def _export_gguf_tokenizer(gguf_file: Path, target: Path, vocab_size: int) -> None:
    """Write the Hugging Face tokenizer Hugging Face's GGUF converter builds from the file's
    vocabulary into target (atomically: a half-written folder is never seen)."""
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise FailedPrecondition(
            "building a tokenizer folder from a GGUF file needs the transformers package in the "
            "llama.cpp worker's environment (pip install 'llmgrpc[transformers]')",
            reason=Reason.ENGINE_UNAVAILABLE,
        ) from None
    scratch = target.with_name(f"{target.name}.{os.getpid()}.partial")
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name)
    tokenizer.save_pretrained(str(scratch))
    _drop_tokens_beyond(scratch, vocab_size)
    os.replace(scratch, target)


def _drop_tokens_beyond(folder: Path, vocab_size: int) -> None:
    """Leave out the tokens the converter adds past the GGUF's own vocabulary (it adds an
    ``<|endoftext|>`` to byte-level BPE vocabularies): the engine knows no such id."""
    tokenizer_file = folder / "tokenizer.json"
    document = json.loads(tokenizer_file.read_text())
    added = document.get("added_tokens") or []
    extra = {token["content"] for token in added if token.get("id", 0) >= vocab_size}
    if not extra:
        return
    document["added_tokens"] = [token for token in added if token.get("id", 0) < vocab_size]
    tokenizer_file.write_text(json.dumps(document, ensure_ascii=False))
    config_file = folder / "tokenizer_config.json"
    config = _read_json(config_file)
    decoder = config.get("added_tokens_decoder") or {}
    config["added_tokens_decoder"] = {key: value for key, value in decoder.items() if int(key) < vocab_size}
    for name in ("unk_token", "pad_token", "eos_token", "bos_token"):
        if config.get(name) in extra:
            config[name] = None
    config_file.write_text(json.dumps(config, ensure_ascii=False, indent=2))


def gguf_facts(gguf_file: Path, cache_dir: Path, engine: Any = None) -> ModelFacts:
    """The facts of a GGUF file, with a tokenizer folder built from its own vocabulary."""
    import gguf

    reader = gguf.GGUFReader(str(gguf_file))
    architecture = str(_gguf_field(reader, "general.architecture") or "")
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    eos, vocab_size = _engine_facts(engine)
    if not eos:
        eos = _ids(_gguf_field(reader, "tokenizer.ggml.eos_token_id"))
    stat = gguf_file.stat()
    key = hashlib.sha256(f"{gguf_file.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()
    target = Path(cache_dir) / GGUF_TOKENIZERS / f"{gguf_file.stem}-{key[:16]}"
    if not (target / "tokenizer.json").is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        _export_gguf_tokenizer(gguf_file, target, len(tokens.data) if tokens is not None else vocab_size)
    return ModelFacts(
        eos_token_ids=eos,
        bos_token_id=_id(_gguf_field(reader, "tokenizer.ggml.bos_token_id")),
        pad_token_id=_id(_gguf_field(reader, "tokenizer.ggml.padding_token_id")),
        vocab_size=vocab_size or (len(tokens.data) if tokens is not None else 0),
        model_type=architecture,
        architectures=[],
        tokenizer_dir=str(target),
        model_path=str(gguf_file),
    )


def describe(weights: str, cache_dir: str, engine: Any = None) -> ModelFacts:
    """The facts of the weights a worker loaded (a folder, or a GGUF file or its first part)."""
    path = Path(weights)
    if path.is_dir():
        return folder_facts(path, engine)
    if path.suffix == ".gguf":
        return gguf_facts(path, Path(cache_dir), engine)
    raise FailedPrecondition(
        f"the model's weights {path} are neither a folder of Hugging Face files nor a GGUF file: "
        "its tokenizer cannot be described",
        reason=Reason.MODEL_FILES_INVALID,
    )
