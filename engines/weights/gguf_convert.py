"""Hugging Face Llama checkpoints to GGUF, and the tiny model's GGUF quantizations.

``convert_llama(model_dir, output)`` writes an F32 GGUF of a Llama-architecture folder
(config.json, *.safetensors, tokenizer.json with a byte-level BPE) the way llama.cpp's
own convert_hf_to_gguf.py does for Llama 3.1: the same metadata keys, tensor names,
rotary permutation of the q/k projections and llama3 ``rope_freqs`` factors.
``quantize(source, output, quantization)`` runs llama.cpp's quantizer on it, and
``ensure_tiny_gguf(cache_dir, quantization)`` gives the built-in tiny model in any of
the registry's quantizations, generating, converting and quantizing it on first use.

Usage: ``python -m llmgrpc.engines.weights.gguf_convert MODEL_DIR OUTPUT.gguf [QUANTIZATION]``
(no QUANTIZATION: F32).
"""

from __future__ import annotations

import ctypes
import json
import math
import os
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import gguf
import numpy as np

from llmgrpc.clients.errors import FailedPrecondition, InvalidArgument
from llmgrpc.engines.weights import tiny_model

# The quantizations llama.cpp's quantizer makes from an F32 file (F32 is the file itself).
QUANTIZATIONS = (
    "Q2_K",
    "Q3_K_L",
    "Q3_K_M",
    "Q3_K_S",
    "Q4_0",
    "Q4_1",
    "Q4_K_M",
    "Q4_K_S",
    "Q5_0",
    "Q5_1",
    "Q5_K_M",
    "Q5_K_S",
    "Q6_K",
    "Q8_0",
)
UNQUANTIZED = "F32"
TINY_FILE_NAME_TEMPLATE = f"{tiny_model.NAME}.{{quantization}}.gguf"
USAGE = "python -m llmgrpc.engines.weights.gguf_convert MODEL_DIR OUTPUT.gguf [QUANTIZATION]"

# A Llama layer's tensors: Hugging Face's name (after model.layers.N.) -> GGUF's (after blk.N.).
LLAMA_LAYER_NAMES = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}

_SAFETENSORS_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16}


def read_safetensors(path: Path) -> Iterator[tuple[str, np.ndarray]]:
    """(name, float32 array) of every tensor of a .safetensors file.

    The format is an 8-byte little-endian header size, a JSON header and the raw data;
    reading it here keeps safetensors (and torch) out of the llama.cpp environment.
    """
    with open(path, "rb") as file:
        header_size = int.from_bytes(file.read(8), "little")
        header = json.loads(file.read(header_size))
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + header_size)
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = _SAFETENSORS_DTYPES.get(info["dtype"])
        if dtype is None:
            raise InvalidArgument(f"{path.name}: tensor {name} is {info['dtype']}, not F32, F16 or BF16")
        start, end = info["data_offsets"]
        array = np.frombuffer(data[start:end], dtype=dtype).reshape(info["shape"])
        if info["dtype"] == "BF16":  # bfloat16 is the top half of a float32
            array = (array.astype(np.uint32) << 16).view(np.float32)
        yield name, array.astype(np.float32)


def permute_for_rope(weight: np.ndarray, n_head: int) -> np.ndarray:
    """Reorder q/k projection rows from Hugging Face's rotary layout to llama.cpp's.

    Hugging Face rotates the two halves of each head; llama.cpp rotates adjacent pairs.
    """
    return (
        weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def llama3_rope_factors(config: dict) -> np.ndarray | None:
    """Per-frequency divisors of llama3 RoPE scaling (None when the model does not use it).

    As convert_hf_to_gguf.py computes them: 1 for high frequencies, ``factor`` for low
    ones, and a smooth blend between the two wavelength bounds.
    """
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "")) != "llama3":
        return None
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    base = rope.get("rope_theta", config.get("rope_theta", 10000.0))
    factor = rope.get("factor", 8.0)
    low_freq_factor = rope.get("low_freq_factor", 1.0)
    high_freq_factor = rope.get("high_freq_factor", 4.0)
    old_context = rope.get("original_max_position_embeddings", 8192)
    low_freq_wavelen = old_context / low_freq_factor
    high_freq_wavelen = old_context / high_freq_factor
    factors = []
    for i in range(0, head_dim, 2):
        wavelen = 2 * math.pi * base ** (i / head_dim)
        if wavelen < high_freq_wavelen:
            factors.append(1.0)
        elif wavelen > low_freq_wavelen:
            factors.append(factor)
        else:
            smooth = (old_context / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(factors, dtype=np.float32)


def _special_token(tokenizer_config: dict, key: str) -> str | None:
    value = tokenizer_config.get(key)
    return value.get("content") if isinstance(value, dict) else value


def _add_tokenizer(writer: gguf.GGUFWriter, model_dir: Path, vocab_size: int) -> None:
    """The byte-level BPE vocabulary, merges, special ids and chat template."""
    tokenizer = json.loads((model_dir / "tokenizer.json").read_text())
    config_path = model_dir / "tokenizer_config.json"
    tokenizer_config = json.loads(config_path.read_text()) if config_path.exists() else {}
    model = tokenizer["model"]
    if model.get("type") != "BPE":
        raise InvalidArgument(f"{model_dir}: only byte-level BPE tokenizers convert, not {model.get('type')}")

    ids = dict(model["vocab"])
    special = set()
    for added in tokenizer.get("added_tokens", []):
        ids[added["content"]] = added["id"]
        if added.get("special"):
            special.add(added["content"])
    by_id = {token_id: text for text, token_id in ids.items()}
    tokens, types = [], []
    for token_id in range(vocab_size):
        text = by_id.get(token_id)
        if text is None:  # the embedding has more rows than the tokenizer has tokens
            tokens.append(f"[PAD{token_id}]")
            types.append(gguf.TokenType.UNUSED)
        else:
            tokens.append(text)
            types.append(gguf.TokenType.CONTROL if text in special else gguf.TokenType.NORMAL)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("llama-bpe")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    merges = [merge if isinstance(merge, str) else " ".join(merge) for merge in model.get("merges", [])]
    writer.add_token_merges(merges)

    for key, add in (
        ("bos_token", writer.add_bos_token_id),
        ("eos_token", writer.add_eos_token_id),
        ("pad_token", writer.add_pad_token_id),
    ):
        text = _special_token(tokenizer_config, key)
        if text is not None and text in ids:
            add(ids[text])
    add_bos = tokenizer_config.get("add_bos_token")
    if add_bos is None:  # tokenizers' post-processor says whether a BOS is prepended
        bos = _special_token(tokenizer_config, "bos_token")
        single = (tokenizer.get("post_processor") or {}).get("single") or [{}]
        add_bos = single[0].get("SpecialToken", {}).get("id") == bos
    writer.add_add_bos_token(bool(add_bos))
    writer.add_add_eos_token(bool(tokenizer_config.get("add_eos_token", False)))

    template_file = model_dir / "chat_template.jinja"
    template = template_file.read_text() if template_file.exists() else tokenizer_config.get("chat_template")
    if template:
        writer.add_chat_template(template)


def convert_llama(model_dir: Path, output: Path, name: str = "") -> Path:
    """Write an F32 GGUF of the Llama-architecture Hugging Face model in model_dir to output."""
    model_dir, output = Path(model_dir), Path(output)
    config = json.loads((model_dir / "config.json").read_text())
    if config.get("model_type") != "llama":
        raise InvalidArgument(f"{model_dir}: model_type {config.get('model_type')!r} is not llama")
    n_head = config["num_attention_heads"]
    n_head_kv = config.get("num_key_value_heads") or n_head
    head_dim = config.get("head_dim") or config["hidden_size"] // n_head
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}

    writer = gguf.GGUFWriter(output, "llama")
    writer.add_name(name or model_dir.name)
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_head_kv)
    writer.add_rope_freq_base(float(rope.get("rope_theta", config.get("rope_theta", 10000.0))))
    writer.add_layer_norm_rms_eps(float(config["rms_norm_eps"]))
    writer.add_rope_dimension_count(head_dim)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_vocab_size(config["vocab_size"])
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    _add_tokenizer(writer, model_dir, config["vocab_size"])

    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}
    names["lm_head.weight"] = "output.weight"
    for layer in range(config["num_hidden_layers"]):
        for hf_name, gguf_name in LLAMA_LAYER_NAMES.items():
            names[f"model.layers.{layer}.{hf_name}.weight"] = f"blk.{layer}.{gguf_name}.weight"

    factors = llama3_rope_factors(config)
    if factors is not None:
        writer.add_tensor("rope_freqs.weight", factors)
    tensors = {}
    for path in sorted(model_dir.glob("*.safetensors")):
        tensors.update(read_safetensors(path))
    if "lm_head.weight" not in tensors:  # tied embeddings
        tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"]
    for hf_name, array in tensors.items():
        if hf_name.endswith("rotary_emb.inv_freq"):
            continue
        if hf_name not in names:
            raise InvalidArgument(f"{model_dir}: unexpected tensor {hf_name} for a llama model")
        if hf_name.endswith("q_proj.weight"):
            array = permute_for_rope(array, n_head)
        elif hf_name.endswith("k_proj.weight"):
            array = permute_for_rope(array, n_head_kv)
        writer.add_tensor(names[hf_name], np.ascontiguousarray(array, dtype=np.float32))

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return output


def quantize(source: Path, output: Path, quantization: str, n_threads: int = 0) -> Path:
    """Quantize an F32 or F16 GGUF with llama.cpp's quantizer (n_threads 0: all cores)."""
    from llmgrpc.engines.llamacpp_build import import_llama_cpp

    llama_cpp = import_llama_cpp()

    ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{quantization.upper()}", None)
    if quantization.upper() not in QUANTIZATIONS or ftype is None:
        raise InvalidArgument(f"quantization {quantization!r} is not one of: {', '.join(QUANTIZATIONS)}")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = n_threads
    failed = llama_cpp.llama_model_quantize(str(source).encode(), str(output).encode(), ctypes.byref(params))
    if failed:
        raise FailedPrecondition(f"llama.cpp could not quantize {source} to {quantization} (error {failed})")
    return output


def write_atomically(target: Path, write) -> Path:
    """Call write(temporary path) then rename it to target: readers never see a partial file."""
    target.parent.mkdir(parents=True, exist_ok=True)
    # A name no other writer uses; the writer creates the file, so the umask sets its mode.
    scratch = target.with_name(f".{target.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.partial")
    try:
        write(scratch)
        os.replace(scratch, target)
    finally:
        scratch.unlink(missing_ok=True)
    return target


def ensure_tiny_gguf(
    cache_dir: Path,
    quantization: str,
    file_name_template: str = TINY_FILE_NAME_TEMPLATE,
    name: str = tiny_model.NAME,
) -> Path:
    """The tiny model called name as a GGUF file in quantization, made first if it is not in
    cache_dir yet.

    The Hugging Face files are the ones the pytorch spec uses; the F32 conversion is made
    once and every quantization from it.
    """
    quantization = quantization.upper()
    if quantization != UNQUANTIZED and quantization not in QUANTIZATIONS:
        valid = ", ".join((*QUANTIZATIONS, UNQUANTIZED))
        raise InvalidArgument(f"{name} has no GGUF quantization {quantization!r}; valid: {valid}")
    root = Path(cache_dir) / name
    folder = root / "ggufv2"
    target = folder / file_name_template.format(quantization=quantization)
    if target.exists():
        return target
    unquantized = folder / file_name_template.format(quantization=UNQUANTIZED)
    if not unquantized.exists():
        hf_files = tiny_model.ensure(root / "pytorch", name)
        write_atomically(unquantized, lambda path: convert_llama(hf_files, path, name=name))
    if quantization == UNQUANTIZED:
        return unquantized
    return write_atomically(target, lambda path: quantize(unquantized, path, quantization))


def main(argv: list[str]) -> None:
    if len(argv) not in (2, 3):
        raise SystemExit(f"usage: {USAGE}\n\n{__doc__}")
    model_dir, output = Path(argv[0]), Path(argv[1])
    output.parent.mkdir(parents=True, exist_ok=True)
    if len(argv) == 2:
        print(write_atomically(output, lambda path: convert_llama(model_dir, path)))
        return
    with tempfile.TemporaryDirectory(dir=output.parent) as scratch:
        unquantized = convert_llama(model_dir, Path(scratch) / "model.F32.gguf")
        print(write_atomically(output, lambda path: quantize(unquantized, path, argv[2])))


if __name__ == "__main__":
    main(sys.argv[1:])
