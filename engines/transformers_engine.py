"""Transformers engine: Hugging Face transformers + torch, on the CPU or a CUDA GPU.

Concurrent requests share forward passes, through one of two runners chosen by
``engine_options.decode``:

- ``plain`` (the CPU default): one batched KV cache that grows each step, left-padded
  to a common length with an attention mask, each sequence with its own position ids.
- ``compiled`` (the CUDA default), or ``static`` (the same without compiling): a KV cache
  of fixed size and a decode step compiled by torch.compile, with CUDA graphs on CUDA.

Either way a new request is prefilled alone, into a KV cache of its own, part by part
as the batcher feeds it; it joins the batch at its first decode step, and a finished or
aborted one leaves it at the next step."""

from __future__ import annotations

import gc
import os
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache, StaticCache

from llmgrpc.clients.errors import InvalidArgument
from llmgrpc.engines.base import LoadPlan, ProgressReport
from llmgrpc.engines.batching import BatchedEngine, ModelRunner
from llmgrpc.engines.catalogue import engine_info, validate_engine_options
from llmgrpc.engines.chat import Chat, hugging_face_chat_ids
from llmgrpc.engines.constraints import tokenizer_from_hugging_face
from llmgrpc.engines.model_folder import check_tokenizer_files, read_model_config

STATIC_CONTEXT_DEFAULT = 4096
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class HuggingFaceRunner(ModelRunner):
    """What both runners share: the model, its tokenizer, and prefilling prompts part by part."""

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
        self._prefilling: dict[int, DynamicCache] = {}  # prompt KV of sequences yet to join
        self._token_texts: dict[int, str] = {}

    def tokenize(self, text: str) -> list[int]:
        return list(self.tokenizer(text).input_ids)

    def detokenize(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)

    def chat_prompt_ids(self, chat: Chat) -> list[int]:
        return hugging_face_chat_ids(self.tokenizer, chat)

    def token_text(self, token_id: int) -> str:
        text = self._token_texts.get(token_id)
        if text is None:
            text = self._token_texts[token_id] = self.tokenizer.decode([token_id], skip_special_tokens=False)
        return text

    def grammar_tokenizer(self):
        return tokenizer_from_hugging_face(self.tokenizer, self.vocab_size, self.eos_token_ids)

    @torch.inference_mode()
    def prefill(self, sequences: list[tuple[int, list[int]]]) -> np.ndarray:
        return np.stack([self._prefill_part(sequence_id, part) for sequence_id, part in sequences])

    def _prefill_part(self, sequence_id: int, part: list[int]) -> np.ndarray:
        """Feed the next part of a prompt into the sequence's own KV cache; logits after it."""
        cache = self._prefilling.get(sequence_id)
        if cache is None:
            cache = DynamicCache()
        input_ids = torch.tensor([part], device=self.device)
        output = self.model(input_ids=input_ids, cache=cache, use_cache=True)
        self._prefilling[sequence_id] = cache
        return output.logits[0, -1].float().cpu().numpy()

    def _prefilled(self, sequence_ids) -> list[tuple[int, DynamicCache]]:
        """The sequences among sequence_ids whose prompts are all in, with their KV caches."""
        return [(s, self._prefilling.pop(s)) for s in sequence_ids if s in self._prefilling]


class DynamicCacheRunner(HuggingFaceRunner):
    """The plain path: one batched, left-padded DynamicCache that grows with each step."""

    def __init__(self, model, tokenizer, context_length: int):
        super().__init__(model, tokenizer, context_length)
        self._order: list[int] = []  # sequence id of each batch row
        self._cache: DynamicCache | None = None
        self._mask: torch.Tensor | None = None  # [rows, cached tokens]: 0 where left padding
        self._positions: torch.Tensor | None = None  # [rows]: position of each row's next token

    @torch.inference_mode()
    def decode(self, last_tokens: dict[int, int]) -> np.ndarray:
        for sequence_id, cache in self._prefilled(last_tokens):
            self._join(sequence_id, cache, cache.get_seq_length())
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
        if self._prefilling.pop(sequence_id, None) is not None:
            return
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


class StaticCacheRunner(HuggingFaceRunner):
    """The fast decode path: a fixed-size KV cache and a compiled decode step.

    The cache has one row per batch slot and context_length columns, allocated once, so
    the decode step has fixed shapes and addresses: it is compiled by torch.compile and,
    on CUDA, recorded once as a CUDA graph that each step replays. Replaying one graph
    removes the per-kernel launch cost that dominates small-batch decoding, and calling
    it directly (not through torch.compile's own graph trees) also skips the per-call
    guard checks and input copies, which cost about a millisecond per step on an 8B model.

    All rows write each step's keys and values at one shared column (the cache's write
    position) while each row keeps its own RoPE position; a boolean mask lets each row
    attend to its own columns only. A joining sequence is prefilled alone and its KV
    copied into a free row, right-aligned to end at the write column; when the write
    column reaches the end of the cache, or a prompt is longer than the columns before
    it, every row is moved to end at a new column (rare).
    """

    # Steps run through the compiled function before the graph is recorded: the first
    # compiles, the next ones let lazily initialised libraries (cuBLAS workspaces) settle.
    WARM_STEPS_BEFORE_GRAPH = 2

    def __init__(self, model, tokenizer, context_length: int, max_batch_size: int, compile_step: bool):
        super().__init__(model, tokenizer, context_length)
        config = model.config
        self.rows = max_batch_size
        self.columns = context_length + 1  # one spare: a full-length sequence still has its write column
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.cache = StaticCache(config=config, max_cache_len=self.columns)
        self.cache.early_initialization(
            batch_size=self.rows,
            num_heads=config.num_key_value_heads,
            head_dim=head_dim,
            dtype=model.dtype,
            device=self.device,
        )
        self._valid = torch.zeros((self.rows, self.columns), dtype=torch.bool, device=self.device)
        self._mask = self._valid[:, None, None, :]  # the 4-D view the attention takes, as is
        self._input_ids = torch.zeros((self.rows, 1), dtype=torch.long, device=self.device)
        self._position_ids = torch.zeros((self.rows, 1), dtype=torch.long, device=self.device)
        # Host-side staging in page-locked memory: copies to and from the GPU then run
        # asynchronously instead of through a pageable bounce buffer.
        pinned = self.device.type == "cuda"
        self._host_inputs = torch.zeros((2, self.rows, 1), dtype=torch.long, pin_memory=pinned)
        self._host_logits = torch.zeros((self.rows, self.vocab_size), dtype=torch.float32, pin_memory=pinned)
        self._column = 0  # where the next step writes, in every row
        self._row_of: dict[int, int] = {}
        self._length: dict[int, int] = {}  # tokens each sequence has in the cache
        self._free_rows = list(range(self.rows))
        self._step = torch.compile(self._decode_step, dynamic=False) if compile_step else self._decode_step
        self._use_graph = compile_step and self.device.type == "cuda"
        self._graph: torch.cuda.CUDAGraph | None = None
        self._graph_logits: torch.Tensor | None = None
        self._steps_run = 0

    def _decode_step(self, input_ids: torch.Tensor, position_ids: torch.Tensor, mask: torch.Tensor):
        output = self.model(
            input_ids=input_ids,
            position_ids=position_ids,
            attention_mask=mask,
            cache=self.cache,
            use_cache=True,
        )
        return output.logits[:, -1]

    def _join(self, sequence_id: int, cache: DynamicCache) -> None:
        """Copy a prefilled prompt's KV into a free row, ending at the write column."""
        length = cache.get_seq_length()
        if self._column < length:
            self._realign(end=length)
        row = self._free_rows.pop(0)
        start = self._column - length
        for static_layer, prompt_layer in zip(self.cache.layers, cache.layers, strict=True):
            static_layer.keys[row, :, start : self._column] = prompt_layer.keys[0]
            static_layer.values[row, :, start : self._column] = prompt_layer.values[0]
        self._valid[row] = False
        self._valid[row, start : self._column] = True
        self._row_of[sequence_id] = row
        self._length[sequence_id] = length

    @torch.inference_mode()
    def decode(self, last_tokens: dict[int, int]) -> np.ndarray:
        for sequence_id, cache in self._prefilled(last_tokens):
            self._join(sequence_id, cache)
        if self._column >= self.columns:
            self._realign()
        host = self._host_inputs.numpy()  # writing through numpy: no per-element torch calls
        host.fill(0)
        for sequence_id, token in last_tokens.items():
            row = self._row_of[sequence_id]
            host[0, row, 0] = token
            host[1, row, 0] = self._length[sequence_id]
        self._input_ids.copy_(self._host_inputs[0], non_blocking=True)
        self._position_ids.copy_(self._host_inputs[1], non_blocking=True)
        # Every row, used or not, attends to the column it writes now (a free row thus never
        # attends to nothing, which would give NaNs).
        self._valid[:, self._column] = True
        logits = self._run_step()
        self._column += 1
        for sequence_id in last_tokens:
            self._length[sequence_id] += 1
        rows = [self._row_of[sequence_id] for sequence_id in last_tokens]
        host_logits = self._host_logits[: len(rows)]
        host_logits.copy_(logits[rows], non_blocking=True)
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()
        return host_logits.numpy().copy()

    def _run_step(self) -> torch.Tensor:
        """One decode step over every row: a replay of the recorded graph once there is one."""
        if self._graph is None and self._use_graph and self._steps_run >= self.WARM_STEPS_BEFORE_GRAPH:
            # Recording does not execute the step: the cache is untouched until replay.
            self._graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self._graph):
                self._graph_logits = self._step(self._input_ids, self._position_ids, self._mask)
        if self._graph is not None:
            self._graph.replay()
            return self._graph_logits
        self._steps_run += 1
        return self._step(self._input_ids, self._position_ids, self._mask)

    def release(self, sequence_id: int) -> None:
        if self._prefilling.pop(sequence_id, None) is not None:
            return
        row = self._row_of.pop(sequence_id)
        del self._length[sequence_id]
        self._valid[row] = False
        self._free_rows.append(row)

    def _realign(self, end: int = 0) -> None:
        """Move every sequence's columns to end at column `end` (at least the longest sequence)."""
        end = max(end, *self._length.values(), 0)
        assert end < self.columns, "a sequence longer than the cache: the batcher's context check failed"
        for sequence_id, row in self._row_of.items():
            old = self._valid[row].nonzero().squeeze(1)
            new = torch.arange(end - self._length[sequence_id], end, device=self.device)
            for layer in self.cache.layers:
                layer.keys[row, :, new] = layer.keys[row, :, old].clone()
                layer.values[row, :, new] = layer.values[row, :, old].clone()
            self._valid[row] = False
            self._valid[row, new] = True
        for row in self._free_rows:
            self._valid[row] = False
        for layer in self.cache.layers:
            layer.cumulative_length.fill_(end)
        self._column = end


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
        validate_engine_options(engine_info("transformers"), options)  # the server checked too
        # A broken folder would fail deep inside transformers (a JSONDecodeError, a division by zero).
        read_model_config(Path(weights))
        check_tokenizer_files(Path(weights))
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
        # The server passes trust_remote_code only where the operator allows it (allow_trust_remote_code).
        remote_code = bool(options.get("trust_remote_code", False))
        tokenizer = AutoTokenizer.from_pretrained(weights, trust_remote_code=remote_code)
        model = AutoModelForCausalLM.from_pretrained(
            weights,
            dtype=dtype,
            attn_implementation=attention,
            trust_remote_code=remote_code,
            use_safetensors=True,  # never unpickle a .bin checkpoint found in model_path
            # Several GPUs: accelerate spreads the layers over all the worker sees.
            **({"device_map": "auto"} if plan.gpu_count > 1 else {}),
        )
        model = (model if plan.gpu_count > 1 else model.to(device)).eval()
        model_context = int(getattr(model.config, "max_position_embeddings", 0) or 2048)
        decode = options.get("decode", "compiled" if device.type == "cuda" else "plain")
        # A static cache is allocated whole up front: bound its default size.
        default_context = model_context if decode == "plain" else min(model_context, STATIC_CONTEXT_DEFAULT)
        context_length = int(options.get("context_length") or default_context)
        if not 1 < context_length <= model_context:
            raise InvalidArgument(
                f"engine_options.context_length {context_length} must be in [2, {model_context}] "
                "for this model"
            )
        if decode == "plain":
            runner: HuggingFaceRunner = DynamicCacheRunner(model, tokenizer, context_length)
        elif decode in ("static", "compiled"):
            if attention != "sdpa":
                raise InvalidArgument(
                    "engine_options.decode static and compiled need attn_implementation sdpa"
                )
            compiled = decode == "compiled"
            runner = StaticCacheRunner(model, tokenizer, context_length, plan.max_batch_size, compiled)
        else:
            raise InvalidArgument(f"engine_options.decode {decode!r} is not one of: plain, static, compiled")

        report("warming up", 0, 0)  # also compiles the decode step, when it is compiled
        runner.prefill([(0, runner.tokenize("warm up"))])
        for _ in range(StaticCacheRunner.WARM_STEPS_BEFORE_GRAPH + 1):  # compiles and records the graph
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
