"""PEFT LoRA adapters to GGUF LoRA files, for llama.cpp (as its convert_lora_to_gguf.py writes them).

The file has ``general.type = adapter``, ``adapter.type = lora``, ``adapter.lora.alpha``
and the base's ``general.architecture``; each adapted layer's A and B become
``blk.N.<name>.weight.lora_a`` (r x in) and ``.lora_b`` (out x r), under the GGUF names
the model conversion (``gguf_convert``) gives the layers. q and k projections get the
rotary row permutation the model's own q/k weights got: it reorders output rows, so it
applies to B alone. llama.cpp computes ``scale * alpha / r`` itself, so the alpha
written is the one that makes that equal the adapter's scaling (rsLoRA included), and
the scale given at load stays the request's.

Usage: ``python -m llmgrpc.engines.weights.gguf_lora ADAPTER_DIR BASE_CONFIG.json OUTPUT.gguf``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import gguf
import numpy as np

from llmgrpc.clients.errors import FailedPrecondition, Reason
from llmgrpc.engines.lora import PeftAdapter, read_peft_adapter
from llmgrpc.engines.weights.gguf_convert import LLAMA_LAYER_NAMES, permute_for_rope, write_atomically


def write_gguf_lora(
    adapter: PeftAdapter, output: Path, architecture: str, n_head: int, n_head_kv: int
) -> Path:
    """Write adapter (read by engines.lora, its load scale 1) as a GGUF LoRA for a base of architecture."""
    # llama.cpp's scaling is alpha / r (r from lora_a's shape) times the load scale.
    alpha = adapter.scaling * adapter.rank
    tensors = []
    for module, layer in sorted(adapter.layers.items()):
        prefix, _, hf_name = module.partition(".layers.")
        index, _, name = hf_name.partition(".")
        gguf_name = LLAMA_LAYER_NAMES.get(name)
        if prefix != "model" or gguf_name is None:
            raise FailedPrecondition(
                f"adapter {adapter.name!r} adapts {module}, which has no llama.cpp tensor",
                reason=Reason.ADAPTER_INCOMPATIBLE,
            )
        b = layer.b
        if name == "self_attn.q_proj":
            b = permute_for_rope(b, n_head)
        elif name == "self_attn.k_proj":
            b = permute_for_rope(b, n_head_kv)
        base = f"blk.{index}.{gguf_name}.weight"
        tensors.append((f"{base}.lora_a", layer.a))
        tensors.append((f"{base}.lora_b", b))

    def write(path: Path) -> None:
        writer = gguf.GGUFWriter(path, architecture)
        writer.add_string("general.type", "adapter")
        writer.add_string("adapter.type", "lora")
        writer.add_float32("adapter.lora.alpha", float(alpha))
        for name, array in tensors:
            writer.add_tensor(name, np.ascontiguousarray(array, dtype=np.float32))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    return write_atomically(Path(output), write)


def main(argv: list[str]) -> None:
    if len(argv) != 3:
        raise SystemExit(
            f"usage: python -m llmgrpc.engines.weights.gguf_lora ADAPTER_DIR CONFIG OUTPUT\n\n{__doc__}"
        )
    adapter_dir, config_path, output = (Path(arg) for arg in argv)
    config = json.loads(config_path.read_text())
    n_head = config["num_attention_heads"]
    adapter = read_peft_adapter(adapter_dir.name, adapter_dir)
    print(write_gguf_lora(adapter, output, "llama", n_head, config.get("num_key_value_heads") or n_head))


if __name__ == "__main__":
    main(sys.argv[1:])
