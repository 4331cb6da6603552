"""LoRA adapters for the tiny model, generated deterministically with peft on this machine.

Each is what PEFT saves (``adapter_config.json`` and ``adapter_model.safetensors``): rank 8
on q/k/v/o of every layer, lora_alpha 16. PEFT starts B at zero (an adapter that changes
nothing); these draw both A and B from a seeded normal, so each one's greedy output differs
from the base model's and from the others'. Like the model, they exist to run the real
adapter path (peft's files, loading, batching, conversion to GGUF) anywhere, with no download.

Usage: ``python -m llmgrpc.engines.weights.tiny_adapters BASE_DIR OUTPUT_DIR [NAME]``.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

from llmgrpc.engines.weights import tiny_model

# Name -> seed of the adapters made for the tiny model.
SEEDS = {"tiny-lora-a": 11, "tiny-lora-b": 22, "tiny-lora-c": 33, "tiny-lora-d": 44}
RANK = 8
ALPHA = 16
TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
# Standard deviation of A's and B's entries: large enough that greedy tokens change.
INIT_STD = 0.2
COMPLETE_MARKER = tiny_model.COMPLETE_MARKER


def generate(
    base_dir: Path,
    output_dir: Path,
    seed: int,
    rank: int = RANK,
    target_modules: tuple[str, ...] = TARGET_MODULES,
) -> Path:
    """Write a LoRA adapter for the Hugging Face model in base_dir to output_dir, its weights
    drawn from seed."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    output_dir = Path(output_dir)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    config = LoraConfig(r=rank, lora_alpha=ALPHA, target_modules=list(target_modules), lora_dropout=0.0)
    peft_model = get_peft_model(model, config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in sorted(peft_model.named_parameters()):
            if "lora_" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * INIT_STD)
    scratch = Path(tempfile.mkdtemp(prefix=".adapter-", dir=output_dir.parent))
    try:
        peft_model.save_pretrained(scratch)
        tiny_model.publish(scratch, output_dir, {"seed": seed, "rank": rank, "torch": torch.__version__})
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return output_dir


def ensure(base_dir: Path, output_dir: Path, name: str) -> Path:
    """The tiny adapter called name at output_dir, generated first if it is not complete there."""
    if not (Path(output_dir) / COMPLETE_MARKER).exists():
        generate(base_dir, output_dir, SEEDS[name])
    return Path(output_dir)


if __name__ == "__main__":
    if len(sys.argv) not in (3, 4):
        raise SystemExit(
            f"usage: python -m llmgrpc.engines.weights.tiny_adapters BASE_DIR OUTPUT_DIR [NAME]\n\n{__doc__}"
        )
    name = sys.argv[3] if len(sys.argv) == 4 else "tiny-lora-a"
    print(generate(Path(sys.argv[1]), Path(sys.argv[2]), SEEDS[name]))
