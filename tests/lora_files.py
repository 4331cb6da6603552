"""The LoRA adapters the adapter tests load, and peft's own greedy output to compare with.

The good ones are the tiny model's (llmgrpc.engines.weights.tiny_adapters); the bad ones are
made here: a rank above the default max_lora_rank, one for another hidden size, one for
another architecture (GPT-2's c_attn, a module Llama lacks).
"""

from __future__ import annotations

from pathlib import Path

from llmgrpc.engines.weights import tiny_adapters, tiny_model

TINY = tiny_model.NAME
GOOD = ("tiny-lora-a", "tiny-lora-b", "tiny-lora-c", "tiny-lora-d")


def base_files(cache_dir: Path) -> Path:
    """The tiny model's files, where the server generates them too."""
    return tiny_model.ensure(Path(cache_dir) / TINY / "pytorch")


def good_adapters(cache_dir: Path, folder: Path) -> dict[str, Path]:
    base = base_files(cache_dir)
    return {name: tiny_adapters.ensure(base, Path(folder) / name, name) for name in GOOD}


def wide_adapter(cache_dir: Path, folder: Path) -> Path:
    """Rank 32: above the default max_lora_rank of 16."""
    return tiny_adapters.generate(base_files(cache_dir), Path(folder) / "wide", seed=5, rank=32)


def other_hidden_size_adapter(folder: Path) -> Path:
    """For a Llama of hidden size 128 (the tiny model's is 256): the same module names, other shapes."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    base = Path(folder) / "llama-128"
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2
    )
    LlamaForCausalLM(config).save_pretrained(base)
    return tiny_adapters.generate(base, Path(folder) / "llama-128-lora", seed=6)


def other_architecture_adapter(folder: Path) -> Path:
    """For a GPT-2: it adapts c_attn, which a Llama has not."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    base = Path(folder) / "gpt2"
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=64, n_layer=1, n_head=2)).save_pretrained(base)
    return tiny_adapters.generate(base, Path(folder) / "gpt2-lora", seed=7, target_modules=("c_attn",))


def peft_greedy(base: Path, adapter: Path | None, prompt: str, count: int) -> list[int]:
    """Greedy tokens of PeftModel.from_pretrained(base, adapter).merge_and_unload() generating
    alone (adapter None: the base model), ignoring end-of-text."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    ids = AutoTokenizer.from_pretrained(base)(prompt, return_tensors="pt").input_ids
    output = model.eval().generate(ids, max_new_tokens=count, min_new_tokens=count, do_sample=False)
    return output[0, ids.shape[1] :].tolist()
