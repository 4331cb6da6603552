"""Checks of a local model folder in Hugging Face's layout, before any library reads it.

A folder given as model_path is the user's: its config.json may be missing, not JSON, or
describe an impossible model (zero attention heads), and its tokenizer files may be
broken. Libraries meet these deep inside their loaders with errors that say little
(a ZeroDivisionError, a JSONDecodeError); these checks say which file is wrong and how.
Pure and synchronous: no library is imported, and only regular files are opened, so a
FIFO or a device named config.json cannot block the caller.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

from llmgrpc.clients.errors import FailedPrecondition, Reason

CONFIG_FILE = "config.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
# Sizes every decoder-only transformer has, under the names Llama-like configs give them.
# Checked only where present: other architectures name them differently, or nest them.
POSITIVE_SIZES = (
    "num_attention_heads",
    "num_key_value_heads",
    "hidden_size",
    "num_hidden_layers",
    "vocab_size",
    "head_dim",
    "max_position_embeddings",
)
# Larger files are not configurations: refuse them rather than read them whole.
MAX_JSON_BYTES = 64 * 1024 * 1024


def read_model_config(folder: Path) -> dict:
    """The folder's config.json as a dict, refusing (FailedPrecondition, MODEL_FILES_INVALID)
    a missing or unreadable file, one that is not a JSON object, and sizes that are not
    positive whole numbers."""
    config = _read_json_object(folder / CONFIG_FILE)
    for key in POSITIVE_SIZES:
        value = config.get(key)
        # JSON null is how some configs leave a size to its default (head_dim: null).
        if value is not None and not (isinstance(value, int) and not isinstance(value, bool) and value > 0):
            raise _invalid(
                folder / CONFIG_FILE, f"{key} is {_shown(value)}; it must be a whole number above 0"
            )
    return config


def check_tokenizer_files(folder: Path) -> None:
    """Refuse tokenizer files of the folder that are present but not JSON objects."""
    for name in TOKENIZER_FILES:
        if os.path.lexists(folder / name):
            _read_json_object(folder / name)


def read_regular_file(path: Path, max_bytes: int) -> bytes:
    """The bytes of path, refusing with a ValueError that says why (as "it ...") a path that is
    missing, unreadable, not a regular file or larger than max_bytes. Never blocks: a FIFO or
    a device is refused before it is opened."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise ValueError("it does not exist") from None
    except OSError as error:
        raise ValueError(f"it cannot be read ({error.strerror})") from None
    if not stat.S_ISREG(info.st_mode):
        raise ValueError("it is not a regular file")
    if info.st_size > max_bytes:
        raise ValueError(f"it has {info.st_size} bytes, more than {max_bytes}")
    try:
        # O_NONBLOCK: should the path be swapped for a FIFO after the check, opening it still returns.
        descriptor = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        with os.fdopen(descriptor, "rb") as file:
            data = file.read(max_bytes + 1)
    except OSError as error:
        raise ValueError(f"it cannot be read ({error.strerror})") from None
    if len(data) > max_bytes:  # it grew after the check
        raise ValueError(f"it has more than {max_bytes} bytes")
    return data


def _read_json_object(path: Path) -> dict:
    try:
        data = read_regular_file(path, MAX_JSON_BYTES)
    except ValueError as error:
        raise _invalid(path, str(error)) from None
    try:
        value = json.loads(data)
    except ValueError as error:  # not UTF-8, not JSON, or an integer of thousands of digits
        where = (
            f" at line {error.lineno} column {error.colno}" if isinstance(error, json.JSONDecodeError) else ""
        )
        raise _invalid(path, f"it is not JSON{where}") from None
    except RecursionError:
        raise _invalid(path, "it is JSON nested too deeply") from None
    if not isinstance(value, dict):
        kind = {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(
            type(value), "a number"
        )
        raise _invalid(path, f"it holds {kind}, not a JSON object")
    return value


def _invalid(path: Path, what: str) -> FailedPrecondition:
    return FailedPrecondition(f"model file {path} is not usable: {what}", reason=Reason.MODEL_FILES_INVALID)


def _shown(value: object) -> str:
    text = (
        json.dumps(value) if isinstance(value, (int, float, str, bool, type(None))) else type(value).__name__
    )
    return text if len(text) <= 24 else text[:21] + "..."
