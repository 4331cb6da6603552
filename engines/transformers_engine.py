"""Transformers engine: Hugging Face transformers + torch, on the CPU or a CUDA GPU.

Concurrent requests share forward passes, through one of two runners chosen by
``engine_options.decode``:

- ``plain`` (the CPU default): one batched KV cache in preallocated buffers that a step
  writes in place, each sequence right-aligned to a shared write column (left padding
  masked), each with its own position ids.
- ``compiled`` (the CUDA default), or ``static`` (the same without compiling): a KV cache
  of fixed size and a decode step compiled by torch.compile, with CUDA graphs on CUDA.

Either way the prompts that start in one batcher step are prefilled together, in one
forward pass over their parts packed end to end (a block-diagonal causal mask keeps them
apart), each into a KV cache of its own; a long prompt's later parts are fed alone, after
its own cache. A prefilled sequence joins the batch at its first decode step, and a
finished or aborted one leaves it at the next step.

On the CPU the linear layers run through oneDNN with weights prepacked once
(``engine_options.cpu_matmul``): torch's default CPU matmul is several times slower at
the few rows of a decode step (measured in docs/benchmarks-vllm.md's setting)."""

from __future__ import annotations

import gc
import inspect
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache, StaticCache
from transformers.cache_utils import Cache, DynamicLayer

from llmgrpc.clients.errors import FailedPrecondition, InvalidArgument, Reason
from llmgrpc.engines.base import EngineStats, GenerationRequest, LoadPlan, ProgressReport
from llmgrpc.engines.batching import BatchedEngine, ModelRunner
from llmgrpc.engines.chat import Chat, hugging_face_chat_ids
from llmgrpc.engines.constraints import tokenizer_from_hugging_face
from llmgrpc.engines.cpu_threads import usable_cores
from llmgrpc.engines.lora import LoraModule
from llmgrpc.engines.model_folder import check_tokenizer_files, read_model_config
from llmgrpc.engines.transformers_lora import LoraSlots

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
        # Models of the library compute logits only where asked (not at every prompt token);
        # a model's own code (trust_remote_code) may not take the argument.
        self._keeps_logits = "logits_to_keep" in inspect.signature(model.forward).parameters
        # A 4-D mask goes to the attention as is: SDPA takes booleans, eager attention adds it.
        self._additive_masks = model.config._attn_implementation != "sdpa"
        self._token_texts: dict[int, str] = {}
        self.lora: LoraSlots | None = None  # set when the model serves LoRA adapters

    def admit(self, sequence_id: int, prompt_ids: list[int], request: GenerationRequest) -> int:
        if self.lora is not None:
            self.lora.acquire(sequence_id, request.adapter)
        return super().admit(sequence_id, prompt_ids, request)

    def can_admit(self, request: GenerationRequest) -> bool:
        return self.lora is None or self.lora.can_admit(request.adapter)

    def _release_adapter(self, sequence_id: int) -> None:
        if self.lora is not None:
            self.lora.release(sequence_id)

    def _adapters_for_rows(self, sequence_ids: list[int]) -> None:
        if self.lora is not None:
            self.lora.for_rows(sequence_ids)

    def _adapters_for_tokens(self, parts: list[tuple[int, int]]) -> None:
        if self.lora is not None:
            self.lora.for_tokens(parts)

    def _logits_at(self, positions: int | torch.Tensor) -> dict:
        """The forward argument that asks for logits at these positions only (-1: the last),
        where the model takes it."""
        if not self._keeps_logits:
            return {}
        return {"logits_to_keep": 1 if isinstance(positions, int) else positions.to(self.device)}

    def _attention_mask(self, allowed: torch.Tensor) -> torch.Tensor:
        """A 4-D boolean mask (True: attend) in the form the model's attention takes."""
        if not self._additive_masks:
            return allowed
        dtype = self.model.dtype
        return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(
            ~allowed, torch.finfo(dtype).min
        )

    def tokenize(self, text: str, parse_special: bool = False) -> list[int]:
        return list(self.tokenizer(text, split_special_tokens=not parse_special).input_ids)

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
        rows: dict[int, np.ndarray] = {}
        first_parts = [(s, part) for s, part in sequences if s not in self._prefilling]
        if first_parts:
            rows.update(zip((s for s, _ in first_parts), self._prefill_together(first_parts), strict=True))
        for sequence_id, part in sequences:
            if sequence_id not in rows:
                rows[sequence_id] = self._prefill_part(sequence_id, part)
        return np.stack([rows[sequence_id] for sequence_id, _ in sequences])

    def _prefill_together(self, sequences: list[tuple[int, list[int]]]) -> np.ndarray:
        """Start several prompts in one forward pass, their first parts packed into one row.

        One pass reads the weights once for all the parts and multiplies them in large
        matrices, where a pass per prompt reads them once each, in small ones (16 prompts of
        16 tokens: a quarter of the time on 2 CPU cores). A block-diagonal causal mask keeps
        each part to its own tokens, and each restarts the positions at 0. Each sequence gets
        a KV cache of its own: its slice of the pass's."""
        lengths = torch.tensor([len(part) for _, part in sequences])
        ends = lengths.cumsum(0)
        starts = ends - lengths
        segment = torch.repeat_interleave(torch.arange(len(sequences)), lengths)
        positions = torch.arange(int(ends[-1])) - starts[segment]
        mask = (segment[:, None] == segment[None, :]) & (positions[:, None] >= positions[None, :])
        input_ids = torch.tensor([[token for _, part in sequences for token in part]], device=self.device)
        cache = DynamicCache()
        self._adapters_for_tokens([(s, len(part)) for s, part in sequences])
        output = self.model(
            input_ids=input_ids,
            position_ids=positions[None].to(self.device),
            attention_mask=self._attention_mask(mask[None, None].to(self.device)),
            cache=cache,
            use_cache=True,
            **self._logits_at(ends - 1),
        )
        for (sequence_id, _), start, end in zip(sequences, starts.tolist(), ends.tolist(), strict=True):
            self._prefilling[sequence_id] = DynamicCache(
                ddp_cache_data=[
                    (layer.keys[:, :, start:end], layer.values[:, :, start:end]) for layer in cache.layers
                ]
            )
        logits = output.logits[0]
        return (logits if self._keeps_logits else logits[ends - 1]).float().cpu().numpy()

    def _prefill_part(self, sequence_id: int, part: list[int]) -> np.ndarray:
        """Feed the next part of a prompt into the sequence's own KV cache; logits after it."""
        cache = self._prefilling[sequence_id]
        input_ids = torch.tensor([part], device=self.device)
        self._adapters_for_tokens([(sequence_id, len(part))])
        output = self.model(input_ids=input_ids, cache=cache, use_cache=True, **self._logits_at(-1))
        return output.logits[0, -1].float().cpu().numpy()

    def _prefilled(self, sequence_ids) -> list[tuple[int, DynamicCache]]:
        """The sequences among sequence_ids whose prompts are all in, with their KV caches."""
        return [(s, self._prefilling.pop(s)) for s in sequence_ids if s in self._prefilling]


class _BatchLayer(DynamicLayer):
    """One layer of the decode batch's KV cache, as the model sees it: each step writes its
    keys and values at the runner's write column and attends to the batch's window."""

    def __init__(self, runner: DynamicCacheRunner, index: int):
        super().__init__()
        self.runner, self.index = runner, index
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        return self.runner._write(self.index, key_states, value_states)

    def get_seq_length(self) -> int:
        return self.runner._end - self.runner._start

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0


class DynamicCacheRunner(HuggingFaceRunner):
    """The plain path: the batch's KV cache in buffers that grow only now and then.

    Each layer's keys and values live in one buffer of [rows, heads, columns, head dim],
    allocated with room to spare. Every row writes each step at one shared column (the
    write column); a joining sequence's prompt is copied in to end there, left padding
    masked out; the step attends to the window from the first column any row uses to the
    write column, a view of the buffer, so a step copies nothing. A leaving row is filled
    by the last row. When the write column reaches the end of the buffer (or a joining
    prompt is longer than the columns before it, or the rows run out), the window moves
    to the start of a new buffer, twice as long where it has to grow: a copy every so
    many steps instead of every step.
    """

    def __init__(self, model, tokenizer, context_length: int):
        super().__init__(model, tokenizer, context_length)
        self._order: list[int] = []  # sequence id of each batch row
        self._keys: list[torch.Tensor] = []  # per layer: [rows, heads, columns, head dim]
        self._values: list[torch.Tensor] = []
        self._valid = torch.zeros((0, 0), dtype=torch.bool, device=self.device)  # [rows, columns]
        self._positions = torch.zeros(0, dtype=torch.long, device=self.device)  # each row's next position
        self._start = self._end = 0  # the window: [first used column, write column)
        self._cache: Cache | None = None

    @torch.inference_mode()
    def decode(self, last_tokens: dict[int, int]) -> np.ndarray:
        joining = self._prefilled(last_tokens)
        if joining:  # room for all of them at once: at most one move
            longest = max(cache.get_seq_length() for _, cache in joining)
            self._make_room(len(self._order) + len(joining), longest, joining[0][1])
        for sequence_id, cache in joining:
            self._join(sequence_id, cache)
        self._make_room(len(self._order), 0)
        rows = len(self._order)
        input_ids = torch.tensor([[last_tokens[s]] for s in self._order], device=self.device)
        self._valid[:rows, self._end] = True
        self._adapters_for_rows(self._order)
        output = self.model(
            input_ids=input_ids,
            position_ids=self._positions[:rows, None],
            attention_mask=self._attention_mask(self._valid[:rows, None, None, self._start : self._end + 1]),
            cache=self._cache,
            use_cache=True,
            **self._logits_at(-1),
        )
        self._end += 1
        self._positions[:rows] += 1
        logits = output.logits[:, -1].float().cpu().numpy()
        row_of = {sequence_id: row for row, sequence_id in enumerate(self._order)}
        return logits[[row_of[s] for s in last_tokens]]

    def _write(self, layer: int, keys: torch.Tensor, values: torch.Tensor):
        """A layer's keys and values of this step into the write column; the window to attend to."""
        rows, column = keys.shape[0], self._end
        self._keys[layer][:rows, :, column : column + 1] = keys
        self._values[layer][:rows, :, column : column + 1] = values
        window = slice(self._start, column + 1)
        return self._keys[layer][:rows, :, window], self._values[layer][:rows, :, window]

    def _join(self, sequence_id: int, cache: DynamicCache) -> None:
        """Copy a prefilled prompt's KV into a new last row, ending at the write column."""
        length = cache.get_seq_length()
        self._make_room(len(self._order) + 1, length, cache)
        row, start = len(self._order), self._end - length
        for keys, values, layer in zip(self._keys, self._values, cache.layers, strict=True):
            keys[row, :, start : self._end] = layer.keys[0]
            values[row, :, start : self._end] = layer.values[0]
        self._valid[row] = False
        self._valid[row, start : self._end] = True
        self._positions[row] = length
        self._start = min(self._start, start) if self._order else start
        self._order.append(sequence_id)

    @torch.inference_mode()
    def release(self, sequence_id: int) -> None:
        self._release_adapter(sequence_id)
        if self._prefilling.pop(sequence_id, None) is not None or sequence_id not in self._order:
            return
        row, last = self._order.index(sequence_id), len(self._order) - 1
        window = slice(self._start, self._end)
        if row != last:
            for buffer in (*self._keys, *self._values):
                buffer[row, :, window] = buffer[last, :, window]
            self._valid[row, window] = self._valid[last, window]
            self._positions[row] = self._positions[last]
            self._order[row] = self._order[last]
        self._order.pop()
        if not self._order:  # nothing left: the memory goes back
            self._keys, self._values, self._cache = [], [], None
            self._valid, self._positions = self._valid[:0, :0], self._positions[:0]
            self._start = self._end = 0
            return
        # Columns no remaining row uses leave the window: attending to them costs for nothing.
        self._start += int(self._valid[:last, window].any(dim=0).nonzero()[0])

    def _grown(self, columns: int) -> int:
        """Columns of a buffer for `columns` used ones: room for as many steps again, within the context."""
        return min(max(2 * columns, columns + 64), self.context_length + 1)

    def _make_room(self, rows: int, length: int, prompt: DynamicCache | None = None) -> None:
        """Make sure the buffers have `rows` rows, `length` columns before the write column and
        the write column itself; if not, move the window into new buffers that do (shaped
        like the prompt's KV where there are none yet)."""
        capacity, columns = self._valid.shape
        if self._keys and rows <= capacity and length <= self._end < columns:
            return
        width = self._end - self._start
        end = max(width, length)
        columns = max(columns, self._grown(end))
        assert end < columns, "a sequence longer than the context: the batcher's context check failed"
        rows = max(rows, 2 * capacity) if rows > capacity else capacity
        used, old_window, new_window = (
            len(self._order),
            slice(self._start, self._end),
            slice(end - width, end),
        )
        if not self._keys:  # the first row: buffers shaped like its prompt's KV
            assert prompt is not None
            self._keys = [layer.keys for layer in prompt.layers]
            self._values = [layer.values for layer in prompt.layers]
        for buffers in (self._keys, self._values):
            for index, old in enumerate(buffers):
                # Zeros, not uninitialised memory: a masked column is still multiplied in, and a NaN
                # left there by the allocator would poison the row (NaN + -inf is NaN).
                new = old.new_zeros((rows, old.shape[1], columns, old.shape[3]))
                new[:used, :, new_window] = old[:used, :, old_window]
                buffers[index] = new
        valid = torch.zeros((rows, columns), dtype=torch.bool, device=self.device)
        valid[:used, new_window] = self._valid[:used, old_window]
        positions = torch.zeros(rows, dtype=torch.long, device=self.device)
        positions[:used] = self._positions[:used]
        self._valid, self._positions = valid, positions
        self._start, self._end = end - width, end
        if self._cache is None:
            self._cache = Cache(layers=[_BatchLayer(self, index) for index in range(len(self._keys))])


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
        self._release_adapter(sequence_id)
        if self._prefilling.pop(sequence_id, None) is not None or sequence_id not in self._row_of:
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


class OneDnnLinear(torch.nn.Module):
    """nn.Linear on the CPU through oneDNN, its weight reordered once into oneDNN's layout.

    torch's own CPU matmul (MKL) was about 3 times slower at the 1 to 16 rows of a decode
    step on the AMD EPYC this was measured on; oneDNN also gives each row the same result
    whatever the number of rows beside it, where MKL changed kernels below 16 rows."""

    # Rows the weight's layout is chosen for: oneDNN's results then match across 1 to 256 rows.
    ROWS_HINT = 16

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.packed_weight = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), self.ROWS_HINT)
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed_weight, self.bias, "none", [], "")


def use_onednn_linears(model: torch.nn.Module) -> int:
    """Swap the model's float32 and bfloat16 linear layers for OneDnnLinear; how many were swapped.

    A layer whose weight another module shares (an output layer tied to the embeddings)
    keeps it: a reordered copy would double that memory."""
    if not torch.backends.mkldnn.is_available():
        return 0
    counts: dict[int, int] = {}
    for _, parameter in model.named_parameters(remove_duplicate=False):
        counts[id(parameter)] = counts.get(id(parameter), 0) + 1
    swaps = [
        (parent, name, child)
        for parent in model.modules()
        for name, child in parent.named_children()
        if type(child) is torch.nn.Linear
        and child.weight.dtype in (torch.float32, torch.bfloat16)
        and counts[id(child.weight)] == 1
    ]
    for parent, name, child in swaps:
        setattr(parent, name, OneDnnLinear(child))
    return len(swaps)


def _sliding_window(config) -> int:
    """The attention window of a model with sliding-window layers (Mistral's kind); 0 if none."""
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if not window or (layer_types is not None and "sliding_attention" not in layer_types):
        return 0
    return int(window)


class TransformersEngine(BatchedEngine):
    """A transformers causal LM behind the continuous batcher."""

    @classmethod
    def load(cls, plan: LoadPlan, weights: str, report: ProgressReport) -> TransformersEngine:
        options = plan.engine_options  # as the server admitted them (engines.catalogue, TRANSFORMERS)
        # A broken folder would fail deep inside transformers (a JSONDecodeError, a division by zero).
        read_model_config(Path(weights))
        check_tokenizer_files(Path(weights))
        torch.set_num_threads(int(options.get("n_threads") or usable_cores()))
        device = torch.device(plan.device)
        dtype_name = options.get("dtype", "auto")
        if dtype_name == "auto":
            dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        else:
            dtype = DTYPES[dtype_name]
        attention = options.get("attn_implementation", "sdpa")

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
        window = _sliding_window(model.config)
        if window:
            # Both runners hand the attention one mask for all its layers: a model with
            # sliding-window layers is served within its window, where that mask is exact.
            model_context = min(model_context, window)
        decode = options.get("decode", "compiled" if device.type == "cuda" else "plain")
        # A static cache is allocated whole up front: bound its default size.
        default_context = model_context if decode == "plain" else min(model_context, STATIC_CONTEXT_DEFAULT)
        context_length = int(options.get("context_length") or default_context)
        if not 1 < context_length <= model_context:
            raise InvalidArgument(
                f"engine_options.context_length {context_length} must be in [2, {model_context}] "
                "for this model"
            )
        # torch.compile lowers the linear layers itself (and cannot take prepacked weights).
        if device.type == "cpu" and decode != "compiled" and options.get("cpu_matmul", "onednn") == "onednn":
            use_onednn_linears(model)
        if decode == "plain":
            runner: HuggingFaceRunner = DynamicCacheRunner(model, tokenizer, context_length)
        else:  # static or compiled, with sdpa attention
            compiled = decode == "compiled"
            runner = StaticCacheRunner(model, tokenizer, context_length, plan.max_batch_size, compiled)

        report("warming up", 0, 0)  # also compiles the decode step, when it is compiled
        runner.prefill([(0, runner.tokenize("warm up"))])
        for _ in range(StaticCacheRunner.WARM_STEPS_BEFORE_GRAPH + 1):  # compiles and records the graph
            runner.decode({0: 0})
        runner.release(0)
        if decode == "plain":  # the static runners' compiled step and CUDA graph have no adapter path yet
            runner.lora = LoraSlots(model, plan.max_loras, plan.max_lora_rank)
        return cls(runner, plan.max_batch_size, str(device))

    def load_adapter(self, module: LoraModule, path: str) -> int:
        if self.runner.lora is None:
            raise FailedPrecondition(
                "LoRA adapters are served by the Transformers engine's plain decode path only: launch "
                'with engine_options {"decode": "plain"} (the static and compiled paths have none yet)',
                reason=Reason.ADAPTER_INCOMPATIBLE,
            )
        return self.runner.lora.load(module, path)

    def unload_adapter(self, name: str) -> None:
        if self.runner.lora is not None:
            self.runner.lora.unload(name)

    def stats(self) -> EngineStats:
        stats = super().stats()
        if self.runner.lora is not None:
            stats.resident_adapters = self.runner.lora.resident()
            stats.adapter_ranks = self.runner.lora.ranks()
        return stats

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
