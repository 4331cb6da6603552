"""The Transformers engine's runners: what both share (the model, its tokenizer, prefilling
prompts part by part, the prefix cache); the plain runner is in transformers_plain, the
static-cache one in transformers_static."""

from __future__ import annotations

import inspect
from collections.abc import Callable

import numpy as np
import torch
from transformers import DynamicCache
from transformers.cache_utils import Cache, DynamicLayer

from llmgrpc.engines.base import GenerationRequest
from llmgrpc.engines.chat import Chat, hugging_face_chat_ids
from llmgrpc.engines.constraints import tokenizer_from_hugging_face
from llmgrpc.engines.model_runner import ModelRunner
from llmgrpc.engines.prefix_cache import KvEventLog, PrefixStore
from llmgrpc.engines.transformers_attention import BOOLEAN_MASKS
from llmgrpc.engines.transformers_lora import LoraSlots

# Per layer: keys and values of one sequence, [1, heads, tokens, head dim] each.
LayerKV = list[tuple[torch.Tensor, torch.Tensor]]


class PromptLayer(DynamicLayer):
    """One layer of a prompt's KV while it is prefilled part by part, written in place into a
    buffer with room for the whole prompt. DynamicLayer's update concatenates: it copies all it
    holds for every part (measured on the tiny model, 12,000 tokens in: most of a part's time).

    The KV it starts from (a stored run's, or its slice of a packed first pass) is read where it
    is until a part is written: a prompt whose last part goes straight into the batch's buffers
    (the plain runner) has its cached prefix copied once, not twice (12,000 tokens of the tiny
    model: 7 ms a copy, in the step of every waiting stream)."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, capacity: int):
        super().__init__()
        self.capacity = capacity
        self.device, self.is_initialized = keys.device, True
        self._key_buffer: torch.Tensor | None = None
        self._value_buffer: torch.Tensor | None = None
        self.filled, self.keys, self.values = keys.shape[-2], keys, values

    def _own(self, capacity: int) -> None:
        """Move what it holds into buffers of its own with room for capacity tokens."""
        shape = (*self.keys.shape[:2], max(capacity, self.filled), self.keys.shape[3])
        key_buffer, value_buffer = self.keys.new_empty(shape), self.values.new_empty(shape)
        key_buffer[:, :, : self.filled] = self.keys
        value_buffer[:, :, : self.filled] = self.values
        self._key_buffer, self._value_buffer = key_buffer, value_buffer

    def update(self, key_states, value_states, *args, **kwargs):
        end = self.filled + key_states.shape[-2]
        if self._key_buffer is None:
            self._own(max(self.capacity, end))
        elif end > self._key_buffer.shape[-2]:  # longer than announced: grow (not on the usual path)
            self._own(2 * end)
        assert self._key_buffer is not None and self._value_buffer is not None
        self._key_buffer[:, :, self.filled : end] = key_states
        self._value_buffer[:, :, self.filled : end] = value_states
        self.filled = end
        self.keys = self._key_buffer[:, :, :end]
        self.values = self._value_buffer[:, :, :end]
        return self.keys, self.values


def prompt_cache(kv: LayerKV, capacity: int) -> Cache:
    """A prompt's KV cache holding kv (per layer, [1, heads, tokens, head dim]), with room for
    capacity tokens in all."""
    return Cache(layers=[PromptLayer(keys, values, capacity) for keys, values in kv])


def _prefix_tokens_per_token(config) -> float:
    """Positions a token attends to for the floating-point work of a layer's linear maps on it
    (a decoder of the Llama kind: the attention's four, a gated MLP's three), 4 per position
    and head against 2 per weight. The tiny test model: 1,536; an 8B Llama: about 27,000."""
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    intermediate = getattr(config, "intermediate_size", None) or 4 * config.hidden_size
    weights = config.hidden_size * (head_dim * 2 * (heads + kv_heads) + 3 * intermediate)
    return weights / (2 * heads * head_dim)


class HuggingFaceRunner(ModelRunner):
    """What both runners share: the model, its tokenizer, and prefilling prompts part by part."""

    def __init__(self, model, tokenizer, context_length: int, prefix_cache_tokens: int = 0):
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
        self._prefilling: dict[int, Cache] = {}  # prompt KV of sequences yet to join
        self._held: dict[int, list[int]] = {}  # per sequence: the tokens its KV is of
        self._prompt_length: dict[int, int] = {}
        self._adapter_of: dict[int, str] = {}  # per sequence: the adapter its KV is computed under
        self._uncached: set[int] = set()  # sequences asked not to use the cache (cache_prompt false)
        self.lora: LoraSlots | None = None  # set when the model serves LoRA adapters
        self.prefix_store = PrefixStore(prefix_cache_tokens, KvEventLog())
        # Models of the library compute logits only where asked (not at every prompt token);
        # a model's own code (trust_remote_code) may not take the argument.
        self._keeps_logits = "logits_to_keep" in inspect.signature(model.forward).parameters
        # A 4-D mask goes to the attention as is: SDPA takes booleans, eager attention adds it.
        self._additive_masks = model.config._attn_implementation not in BOOLEAN_MASKS
        self._token_texts: dict[int, str] = {}
        self.prefix_tokens_per_token = _prefix_tokens_per_token(model.config)

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

    @property
    def caches_prefixes(self) -> bool:
        return self.prefix_store.capacity_tokens > 0

    @property
    def kv_events(self) -> KvEventLog:
        return self.prefix_store.events

    def admit(self, sequence_id: int, prompt_ids: list[int], request: GenerationRequest) -> int:
        """Start from the stored KV of the longest cached prefix of the prompt, if any (computed
        under the same adapter)."""
        if self.lora is not None:
            self.lora.acquire(sequence_id, request.adapter)
        self._held[sequence_id] = []
        self._adapter_of[sequence_id] = request.adapter
        self._prompt_length[sequence_id] = len(prompt_ids)
        if not request.cache_prompt:
            self._uncached.add(sequence_id)
            return 0
        run, length = self.prefix_store.longest_prefix(prompt_ids, request.adapter)
        if run is None or length <= 0:
            return 0
        self._prefilling[sequence_id] = prompt_cache(
            [(keys[:, :, :length], values[:, :, :length]) for keys, values in run.kv], len(prompt_ids)
        )
        self._held[sequence_id] = list(prompt_ids[:length])
        return length

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

    @torch.inference_mode()
    def prefill(self, sequences: list[tuple[int, list[int]]]) -> np.ndarray:
        rows: dict[int, np.ndarray] = {}
        first_parts = [(s, part) for s, part in sequences if s not in self._prefilling]
        if first_parts:
            rows.update(zip((s for s, _ in first_parts), self._prefill_together(first_parts), strict=True))
        for sequence_id, part in sequences:
            if sequence_id not in rows:
                rows[sequence_id] = self._prefill_part(sequence_id, part)
        for sequence_id, part in sequences:
            self._held.setdefault(sequence_id, []).extend(part)
        return np.stack([rows[sequence_id] for sequence_id, _ in sequences])

    def _decoded(self, last_tokens: dict[int, int]) -> None:
        """Note that a decode step has put each sequence's last token in its KV."""
        for sequence_id, token in last_tokens.items():
            self._held[sequence_id].append(token)

    def _leave(self, sequence_id: int, in_a_row: bool) -> bool:
        """What every runner does for a leaving sequence: its adapter slot goes back, and one not
        in a row yet offers its prompt's KV to the prefix store. Returns in_a_row: the runner
        then frees the row (after _keep_row)."""
        self._release_adapter(sequence_id)
        if not in_a_row:
            self._keep(sequence_id, None)
            self._prefilling.pop(sequence_id, None)
        return in_a_row

    def _keep_row(self, sequence_id: int, layers, row: int, end: int) -> None:
        """Offer the KV of a sequence in a row of the batch's buffers (layers: each layer's keys
        and values buffers), its columns ending at column end, to the prefix store, which copies
        it out only if it keeps it."""
        held = slice(end - len(self._held.get(sequence_id, ())), end)
        self._keep(
            sequence_id,
            lambda: [
                (keys[row : row + 1, :, held].clone(), values[row : row + 1, :, held].clone())
                for keys, values in layers
            ],
        )

    def _keep(self, sequence_id: int, row_kv: Callable[[], LayerKV] | None) -> None:
        """Offer a leaving sequence's KV to the prefix store: row_kv copies it out of its row;
        None: it is not in a row, and its prompt cache is offered."""
        held = self._held.pop(sequence_id, [])
        adapter = self._adapter_of.pop(sequence_id, "")
        self._prompt_length.pop(sequence_id, None)
        if not held or sequence_id in self._uncached:
            self._uncached.discard(sequence_id)
            return
        if row_kv is None:
            cache = self._prefilling.get(sequence_id)
            if cache is None:
                return
            row_kv = lambda: [(layer.keys, layer.values) for layer in cache.layers]  # noqa: E731
        self.prefix_store.store(held, row_kv, adapter)

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
            self._prefilling[sequence_id] = prompt_cache(
                [(layer.keys[:, :, start:end], layer.values[:, :, start:end]) for layer in cache.layers],
                self._prompt_length.get(sequence_id, end - start),
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

    def _prefilled(self, sequence_ids) -> list[tuple[int, Cache]]:
        """The sequences among sequence_ids whose prompts are all in, with their KV caches."""
        return [(s, self._prefilling.pop(s)) for s in sequence_ids if s in self._prefilling]
