"""Transformers engine: Hugging Face transformers + torch, on the CPU or a CUDA GPU.

Concurrent requests share forward passes: the runner keeps one batched KV cache for
every live sequence, left-padded to a common length with an attention mask, and each
sequence its own position ids. A new request is prefilled alone, then joins the batch
between steps; a finished or aborted one leaves it at the next step.
"""

from __future__ import annotations

import gc
import os

import numpy as np
import torch
from llmgrpc.engines.base import LoadPlan, ProgressReport
from llmgrpc.engines.batching import BatchedEngine, ModelRunner
from llmgrpc.engines.errors import InvalidArgument
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class TransformersRunner(ModelRunner):
    """Forward passes over one batched, left-padded DynamicCache."""

    def __init__(self, model, tokenizer, context_length: int):
        self.model = model
        self.tokenizer = tokenizer
        self.device = model.device
        self.context_length = context_length
        self.vocab_size = int(model.config.vocab_size)
        eos = model.generation_config.eos_token_id
        eos = [eos] if isinstance(eos, int) else list(eos or [])
        if tokenizer.eos_token_id is not None:
            eos.append(tokenizer.eos_token_id)
        self.eos_token_ids = frozenset(eos)
        self._order: list[int] = []  # sequence id of each batch row
        self._cache: DynamicCache | None = None
        self._mask: torch.Tensor | None = None  # [rows, cached tokens]: 0 where left padding
        self._positions: torch.Tensor | None = None  # [rows]: position of each row's next token

    def tokenize(self, text: str) -> list[int]:
        return list(self.tokenizer(text).input_ids)

    def detokenize(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)

    @torch.inference_mode()
    def prefill(self, sequences: list[tuple[int, list[int]]]) -> np.ndarray:
        rows = []
        for sequence_id, prompt_ids in sequences:
            cache = DynamicCache()
            input_ids = torch.tensor([prompt_ids], device=self.device)
            output = self.model(input_ids=input_ids, cache=cache, use_cache=True)
            rows.append(output.logits[0, -1].float().cpu().numpy())
            self._join(sequence_id, cache, len(prompt_ids))
        return np.stack(rows)

    @torch.inference_mode()
    def decode(self, last_tokens: dict[int, int]) -> np.ndarray:
        assert self._cache is not None and self._mask is not None and self._positions is not None
        input_ids = torch.tensor([[last_tokens[s]] for s in self._order], device=self.device)
        self._mask = torch.cat([self._mask, self._mask.new_ones((len(self._order), 1))], dim=1)
        output = self.model(
            input_ids=input_ids,
            attention_mask=self._mask,
            position_ids=self._positions[:, None],
            cache=self._cache,
            use_cache=True,
        )
        self._positions += 1
        logits = output.logits[:, -1].float().cpu().numpy()
        row_of = {sequence_id: row for row, sequence_id in enumerate(self._order)}
        return logits[[row_of[s] for s in last_tokens]]

    def release(self, sequence_id: int) -> None:
        row = self._order.index(sequence_id)
        del self._order[row]
        if not self._order:
            self._cache = self._mask = self._positions = None
            return
        assert self._cache is not None and self._mask is not None and self._positions is not None
        keep = torch.tensor([r for r in range(self._mask.shape[0]) if r != row], device=self.device)
        mask = self._mask[keep]
        # Columns that are padding in every remaining row cost attention for nothing: drop them.
        first_used = int(mask.any(dim=0).nonzero()[0])
        self._mask = mask[:, first_used:]
        self._positions = self._positions[keep]
        for layer in self._cache.layers:
            layer.keys = layer.keys[keep, :, first_used:]
            layer.values = layer.values[keep, :, first_used:]

    def _join(self, sequence_id: int, cache: DynamicCache, length: int) -> None:
        """Add a prefilled sequence as a new batch row, left-padding it or the batch to one length."""
        new_mask = torch.ones((1, length), dtype=torch.long, device=self.device)
        new_position = torch.tensor([length], device=self.device)
        if self._cache is None:
            self._cache, self._mask, self._positions = cache, new_mask, new_position
            self._order = [sequence_id]
            return
        assert self._mask is not None and self._positions is not None
        width = max(self._mask.shape[1], length)
        layers = []
        for old, new in zip(self._cache.layers, cache.layers, strict=True):
            layers.append(
                (
                    torch.cat([_left_pad(old.keys, width), _left_pad(new.keys, width)]),
                    torch.cat([_left_pad(old.values, width), _left_pad(new.values, width)]),
                )
            )
        self._cache = DynamicCache(ddp_cache_data=layers)
        self._mask = torch.cat([_left_pad(self._mask, width, dim=1), _left_pad(new_mask, width, dim=1)])
        self._positions = torch.cat([self._positions, new_position])
        self._order.append(sequence_id)


def _left_pad(tensor: torch.Tensor, width: int, dim: int = 2) -> torch.Tensor:
    missing = width - tensor.shape[dim]
    if missing == 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)


class TransformersEngine(BatchedEngine):
    """A transformers causal LM behind the continuous batcher."""

    @classmethod
    def load(cls, plan: LoadPlan, weights: str, report: ProgressReport) -> TransformersEngine:
        options = plan.engine_options
        torch.set_num_threads(int(options.get("n_threads") or os.cpu_count() or 1))
        device = torch.device(plan.device)
        dtype_name = options.get("dtype", "auto")
        if dtype_name == "auto":
            dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        elif dtype_name in DTYPES:
            dtype = DTYPES[dtype_name]
        else:
            raise InvalidArgument(
                f"engine_options.dtype {dtype_name!r} is not one of: auto, {', '.join(DTYPES)}"
            )
        attention = options.get("attn_implementation", "sdpa")
        if attention not in ("sdpa", "eager"):
            raise InvalidArgument(
                f"engine_options.attn_implementation {attention!r} is not one of: sdpa, eager"
            )

        report("loading weights", 0, 0)
        tokenizer = AutoTokenizer.from_pretrained(weights)
        model = AutoModelForCausalLM.from_pretrained(weights, dtype=dtype, attn_implementation=attention)
        model = model.to(device).eval()
        model_context = int(getattr(model.config, "max_position_embeddings", 0) or 2048)
        context_length = int(options.get("context_length") or model_context)
        if not 1 < context_length <= model_context:
            raise InvalidArgument(
                f"engine_options.context_length {context_length} must be in [2, {model_context}] "
                "for this model"
            )
        runner = TransformersRunner(model, tokenizer, context_length)

        report("warming up", 0, 0)
        runner.prefill([(0, runner.tokenize("warm up"))])
        runner.decode({0: 0})
        runner.release(0)
        return cls(runner, plan.max_batch_size, str(device))

    def gpu_memory_bytes(self) -> int:
        device = self.runner.device
        return int(torch.cuda.memory_reserved(device)) if device.type == "cuda" else 0

    def close(self) -> None:
        super().close()
        device = self.runner.device
        del self.runner
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()


ENGINE = TransformersEngine
