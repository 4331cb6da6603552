"""llama.cpp engine: GGUF models through llama-cpp-python's low-level API, continuously batched.

One model and one context serve every request. The context holds ``n_seq_max`` (the
plan's max_batch_size) sequences; each live request occupies one of those sequence
slots, and each ``llama_decode`` feeds the last token of every live sequence at once.
Logits are asked for only where a token is sampled next: the last token of each prompt
and every decoded token.

KV cache sizing: ``engine_options.context_length`` is the whole cache, in tokens, shared
by all slots (default: 4096 per slot, at most the model's trained context per slot).
Each sequence may use ``context_length // n_seq_max`` of it (llama.cpp rounds that up to
a multiple of 256), and that is the context length the engine reports: the batcher
refuses longer prompts and ends a generation
with LENGTH when it reaches it. So the slots together never need more cells than the
cache has, and one long request can never starve the others of KV space.

KV layout: by default each slot has its own stream of ``context_length // n_seq_max``
cells (``kv_unified`` false). A sequence's keys then sit where they would if it ran
alone, and it attends over its own cells only, so what is decoded beside it does not
change its attention by a single bit, and attention costs grow with its own length, not
with the batch's. ``kv_unified: true`` puts every sequence in one buffer instead (what
llama.cpp prefers for sequences that share a long prefix): the interleaved layout
changes rounding in attention, so a greedy output can then depend on its neighbours.

Batch invariance: with per-slot streams and ``flash_attention: false``, Q8_0 weights give
every request the very logits it gets alone. (Flash attention pads each step's keys to
the longest sequence in the step, so once sequences of different lengths share steps its
rounding moves, and a greedy output can change after a few hundred tokens.)
Other weight types go through llama.cpp matrix kernels that pick
a different code path (repacked tiles, tinyBLAS, gemv or gemm) with the number of rows
in the batch; their last-bit differences, amplified where activations are quantized,
can flip a greedy choice between two near-equal tokens. That is llama.cpp's arithmetic,
not this engine's bookkeeping.

Precision: llama.cpp's defaults (an f16 KV cache; flash attention where it runs, which
on the CPU computes in f16 too) shift logits by about 1e-3. With an F32 GGUF,
``kv_cache_type: "f32"`` and ``flash_attention: false`` give the Transformers engine's
logits to about 1e-6, so the same greedy tokens.

The high-level ``llama_cpp.Llama`` is not used: it is not thread-safe and decodes one
sequence at a time. All calls into the context come from the batcher's one thread.
"""

from __future__ import annotations

import ctypes
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from llmgrpc.clients.errors import FailedPrecondition, InvalidArgument, ResourceExhausted
from llmgrpc.engines.base import EngineStats, GenerationRequest, LoadPlan, ProgressReport, SamplingParams
from llmgrpc.engines.batched_engine import BatchedEngine
from llmgrpc.engines.chat import Chat, chat_prompt_ids
from llmgrpc.engines.constraints import tokenizer_from_llama_cpp
from llmgrpc.engines.cpu_threads import llama_cpp_threads, usable_cores
from llmgrpc.engines.llamacpp_build import import_llama_cpp
from llmgrpc.engines.llamacpp_slots import SlotTable
from llmgrpc.engines.lora import LoraModule
from llmgrpc.engines.model_runner import ModelRunner
from llmgrpc.engines.prefix_cache import KvEventLog

if TYPE_CHECKING:
    from llmgrpc.engines.llamacpp_lora import LoraLlamaCppRunner

llama_cpp = import_llama_cpp()

log = logging.getLogger("llmgrpc.llama_cpp")

DEFAULT_CONTEXT_PER_SEQUENCE = 4096
KV_CACHE_TYPES = {"f16": llama_cpp.GGML_TYPE_F16, "f32": llama_cpp.GGML_TYPE_F32}
# Most tokens one llama_decode takes (llama.cpp's default); longer prefills are split.
BATCH_TOKENS = 2048

# ggml log levels (enum ggml_log_level) as Python logging levels; CONT continues the last message.
# llama.cpp's INFO is load chatter (every metadata key): kept at DEBUG.
_GGML_LEVELS = {0: logging.DEBUG, 1: logging.DEBUG, 2: logging.DEBUG, 3: logging.WARNING, 4: logging.ERROR}
_GGML_LOG_CONT = 5
_last_level = logging.DEBUG


@llama_cpp.llama_log_callback
def _route_log(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
    """llama.cpp's messages to Python logging: its warnings and errors show, the load chatter does not."""
    global _last_level
    if level != _GGML_LOG_CONT:
        _last_level = _GGML_LEVELS.get(level, logging.DEBUG)
    message = text.decode("utf-8", errors="replace").rstrip()
    if message and log.isEnabledFor(_last_level):
        log.log(_last_level, "%s", message)


# Set once at import: llama-cpp-python's own callback would print every load message to stderr.
# The module-level name keeps the ctypes callback alive as long as llama.cpp may call it.
llama_cpp.llama_log_set(_route_log, ctypes.c_void_p(0))


class LlamaCppRunner(ModelRunner):
    """Forward passes of one llama.cpp context; batcher sequence ids map to llama.cpp slots."""

    def __init__(self, model: llama_cpp.llama_model_p, context: llama_cpp.llama_context_p, slots: SlotTable):
        self.model = model
        self.context = context
        self.vocab = llama_cpp.llama_model_get_vocab(model)
        self.memory = llama_cpp.llama_get_memory(context)
        self.vocab_size = int(llama_cpp.llama_vocab_n_tokens(self.vocab))
        # Per sequence: a stream's size, or an equal share of the unified buffer.
        per_sequence = int(llama_cpp.llama_n_ctx(context)) // len(slots.slots)
        self.context_length = min(per_sequence, int(llama_cpp.llama_n_ctx_seq(context)))
        self.eos_token_ids = frozenset(self._end_of_generation_ids())
        self._pieces = [self._piece(token) for token in range(self.vocab_size)]
        # Each control token's spelling: where a chat template writes one, it is that token.
        self._control_ids = {
            self._piece(token, special=True).decode("utf-8", errors="replace"): token
            for token in range(self.vocab_size)
            if llama_cpp.llama_vocab_is_control(self.vocab, token)
        }
        # llama.cpp lowers n_batch to n_ctx for small contexts: a bigger batch would abort it.
        self._batch_capacity = int(llama_cpp.llama_n_batch(context))
        # One sequence id per token: each token here belongs to exactly one sequence.
        self._batch = llama_cpp.llama_batch_init(self._batch_capacity, 0, 1)
        self.slots = slots
        self._slot_of: dict[int, int] = {}
        self._held: dict[int, list[int]] = {}  # per sequence: the tokens its slot holds KV for
        self._adapter_of: dict[int, str] = {}  # per sequence: the adapter it runs under ("": the base)
        self._uncached: set[int] = set()  # sequences asked not to use the cache (cache_prompt false)
        self._spoiled: set[int] = set()  # sequences whose KV a failed llama_decode left unknown

    def _end_of_generation_ids(self) -> set[int]:
        vocab = self.vocab
        ids = {llama_cpp.llama_vocab_eos(vocab), llama_cpp.llama_vocab_eot(vocab)}
        ids |= {token for token in range(self.vocab_size) if llama_cpp.llama_vocab_is_eog(vocab, token)}
        return {int(token) for token in ids if 0 <= token < self.vocab_size}

    def _piece(self, token: int, special: bool = False) -> bytes:
        """The bytes token stands for; empty for control tokens (BOS, EOS, chat markers)
        unless special, which spells them as written."""
        if not special and llama_cpp.llama_vocab_is_control(self.vocab, token):
            return b""
        size = 32
        while True:
            buffer = ctypes.create_string_buffer(size)
            written = llama_cpp.llama_token_to_piece(self.vocab, token, buffer, size, 0, special)
            if written >= 0:
                return buffer.raw[:written]
            size = -written

    def tokenize(self, text: str, parse_special: bool = False) -> list[int]:
        # add_special: BOS if the model's metadata says so; parse_special False: user text
        # that spells "<|eot_id|>" stays text, it does not become the control token.
        return self._tokenize(text, add_special=True, parse_special=parse_special)

    def _tokenize(self, text: str, *, add_special: bool, parse_special: bool) -> list[int]:
        data = text.encode("utf-8")
        size = len(data) + 2  # byte-level BPE: at most a token per byte, plus BOS and EOS
        while True:
            buffer = (llama_cpp.llama_token * size)()
            count = llama_cpp.llama_tokenize(
                self.vocab, data, len(data), buffer, size, add_special, parse_special
            )
            if count >= 0:
                return list(buffer[:count])
            size = -count  # other vocabularies can need more: llama.cpp says how many

    def chat_prompt_ids(self, chat: Chat) -> list[int]:
        """The conversation rendered by the GGUF's own chat template (tokenizer.chat_template), with
        the Jinja rules Hugging Face uses: control tokens (<|start_header_id|>, ...) where the
        template writes them, the rest tokenized as text, with no BOS added (the template writes it)."""
        specials = {
            "bos_token": self._piece(llama_cpp.llama_vocab_bos(self.vocab), special=True).decode(),
            "eos_token": self._piece(llama_cpp.llama_vocab_eos(self.vocab), special=True).decode(),
        }

        def tokenize_text(texts: list[str]) -> list[list[int]]:
            return [self._tokenize(text, add_special=False, parse_special=False) for text in texts]

        return chat_prompt_ids(self._chat_template(), chat, specials, self._control_ids, tokenize_text)

    def _chat_template(self) -> str:
        key = b"tokenizer.chat_template"
        size = llama_cpp.llama_model_meta_val_str(self.model, key, None, 0)
        if size < 0:
            return ""
        buffer = ctypes.create_string_buffer(size + 1)
        llama_cpp.llama_model_meta_val_str(self.model, key, buffer, size + 1)
        return buffer.value.decode("utf-8")

    def detokenize(self, token_ids: list[int]) -> str:
        pieces = self._pieces
        data = b"".join(pieces[t] for t in token_ids if 0 <= t < len(pieces))
        return data.decode("utf-8", errors="replace")

    def token_text(self, token_id: int) -> str:
        piece = self._pieces[token_id] or self._piece(token_id, special=True)
        return piece.decode("utf-8", errors="replace")

    def grammar_tokenizer(self):
        return tokenizer_from_llama_cpp(self.vocab, self.vocab_size, self.eos_token_ids)

    @property
    def caches_prefixes(self) -> bool:
        return self.slots.enabled

    @property
    def kv_events(self) -> KvEventLog:
        return self.slots.events

    def admit(self, sequence_id: int, prompt_ids: list[int], request: GenerationRequest) -> int:
        # KV computed under an adapter serves only prompts for that adapter.
        slot, kept = self.slots.take(prompt_ids, request.adapter, reuse=request.cache_prompt)
        if kept and not llama_cpp.llama_memory_seq_rm(self.memory, slot, kept, -1):
            kept = 0  # this memory cannot drop part of a sequence (a recurrent model): start cold
        if not kept:
            llama_cpp.llama_memory_seq_rm(self.memory, slot, -1, -1)
        self._slot_of[sequence_id] = slot
        self._held[sequence_id] = list(prompt_ids[:kept])
        self._adapter_of[sequence_id] = request.adapter
        if not request.cache_prompt:
            self._uncached.add(sequence_id)
        return kept

    def prefill(self, sequences: list[tuple[int, list[int]]]) -> np.ndarray:
        # Each sequence carries on at its next position: after its cached prefix, or its last part.
        try:
            return self._prefill(sequences)
        except BaseException:
            # A half-fed part leaves cells behind: these sequences' slots keep nothing.
            self._spoiled.update(sequence_id for sequence_id, _ in sequences)
            raise

    def _prefill(self, sequences: list[tuple[int, list[int]]]) -> np.ndarray:
        rows = np.empty((len(sequences), self.vocab_size), dtype=np.float32)
        pending: list[tuple[int, int]] = []  # (row, index in batch) of prompts ending in this batch
        count = 0
        in_slot_order = sorted(enumerate(sequences), key=lambda item: self._slot_of[item[1][0]])  # see decode
        for row, (sequence_id, prompt_ids) in in_slot_order:
            for index, token in enumerate(prompt_ids):
                if count == self._batch_capacity:  # full: run it, carry on in a fresh batch
                    self._run(count)
                    self._read_logits(pending, rows)
                    pending, count = [], 0
                last = index == len(prompt_ids) - 1
                self._put(count, sequence_id, token, wants_logits=last)
                if last:
                    pending.append((row, count))
                count += 1
        if count:
            self._run(count)
            self._read_logits(pending, rows)
        return rows

    def decode(self, last_tokens: dict[int, int]) -> np.ndarray:
        # The step's tokens go in slot order: with a KV stream per slot, llama.cpp computes a
        # batch whose sequences are out of slot order about twice as slowly (measured: 16
        # sequences of bench-llama-100m, 20 ms a step in order, 44 ms reversed).
        ids = list(last_tokens)
        by_slot = sorted(range(len(ids)), key=lambda row: self._slot_of[ids[row]])
        for index, row in enumerate(by_slot):
            self._put(index, ids[row], last_tokens[ids[row]], wants_logits=True)
        try:
            self._run(len(ids))
        except BaseException:
            self._spoiled.update(ids)
            raise
        # Every token of the step asked for logits, so llama.cpp's output buffer holds their rows
        # in batch order: a view of it, not a copy (a step of 16 sequences of a 128k vocabulary
        # would copy 8 MB). It stays valid until the next call into the context.
        logits = llama_cpp.llama_get_logits(self.context)
        if not logits:
            raise RuntimeError("llama.cpp returned no logits for a decode step")
        rows = np.ctypeslib.as_array(logits, shape=(len(ids), self.vocab_size))
        if by_slot == list(range(len(ids))):
            return rows
        return rows[np.argsort(by_slot)]  # back in the caller's order (a copy, when they differ)

    def release(self, sequence_id: int) -> None:
        slot = self._slot_of.pop(sequence_id, None)
        held = self._held.pop(sequence_id, [])
        adapter = self._adapter_of.pop(sequence_id, "")
        if slot is None:
            return
        if sequence_id in self._spoiled or sequence_id in self._uncached:
            self._spoiled.discard(sequence_id)
            self._uncached.discard(sequence_id)
            held = []
        if not held or not self.slots.enabled:
            llama_cpp.llama_memory_seq_rm(self.memory, slot, -1, -1)
        self.slots.give_back(slot, held, adapter)

    def _put(self, index: int, sequence_id: int, token: int, wants_logits: bool) -> None:
        batch = self._batch
        held = self._held[sequence_id]
        batch.token[index] = token
        batch.pos[index] = len(held)
        batch.n_seq_id[index] = 1
        batch.seq_id[index][0] = self._slot_of[sequence_id]
        batch.logits[index] = wants_logits
        held.append(token)

    def _run(self, count: int) -> None:
        self._batch.n_tokens = count
        status = llama_cpp.llama_decode(self.context, self._batch)
        if status == 1:
            # Cannot happen while each sequence stays within context_length; say so if it does.
            raise ResourceExhausted("llama.cpp found no room in its KV cache for this step")
        if status != 0:
            raise RuntimeError(f"llama_decode failed with status {status}")

    def _read_logits(self, wanted: list[tuple[int, int]], rows: np.ndarray) -> None:
        for row, index in wanted:
            pointer = llama_cpp.llama_get_logits_ith(self.context, index)
            if not pointer:
                raise RuntimeError(f"llama.cpp has no logits for batch position {index}")
            rows[row] = np.ctypeslib.as_array(pointer, shape=(self.vocab_size,))

    def close(self) -> None:
        """Free the batch, the context and the model (once; the runner is unusable after)."""
        if self.context is None:
            return
        llama_cpp.llama_batch_free(self._batch)
        llama_cpp.llama_free(self.context)
        llama_cpp.llama_model_free(self.model)
        self.context = self.model = None


def _int_option(options: dict, name: str, default: int) -> int:
    """An int option for one of llama.cpp's C int fields. The server checked its range; one that
    reached a worker unchecked is refused here rather than wrapped by ctypes (2**32 + 4 threads
    would become 4)."""
    value = options.get(name)
    value = default if value is None else int(value)
    if not -(2**31) <= value < 2**31:
        raise InvalidArgument(f"engine_options.{name} {value} does not fit llama.cpp's C int")
    return value


class LlamaCppEngine(BatchedEngine):
    """A GGUF model in llama.cpp behind the continuous batcher."""

    runner: LoraLlamaCppRunner

    @classmethod
    def load(cls, plan: LoadPlan, weights: str, report: ProgressReport) -> LlamaCppEngine:
        options = plan.engine_options  # as the server admitted them (engines.catalogue, LLAMA_CPP)
        # The context's sequences: one per request decoding at once, and any more kept as cache.
        n_seq_max = _int_option(options, "cache_slots", plan.max_batch_size)
        if not plan.max_batch_size <= n_seq_max <= llama_cpp.llama_max_parallel_sequences():
            raise InvalidArgument(
                f"llama.cpp keeps at most {llama_cpp.llama_max_parallel_sequences()} sequences in a context, "
                f"and at least one per request decoding at once ({plan.max_batch_size}), but it was asked "
                f"for {n_seq_max}: set engine_options.cache_slots or max_running_requests within that"
            )
        single, batched = llama_cpp_threads(usable_cores())
        n_threads = _int_option(options, "n_threads", single)
        # n_threads alone sets both, as it always has; n_threads_batch refines the second.
        given = options.get("n_threads") is not None
        n_threads_batch = _int_option(options, "n_threads_batch", n_threads if given else batched)
        on_gpu = plan.device.startswith("cuda")
        n_gpu_layers = _int_option(options, "n_gpu_layers", -1 if on_gpu else 0)
        kv_cache_type = options.get("kv_cache_type", "f16")
        flash_attention = options.get("flash_attention")
        kv_unified = bool(options.get("kv_unified", False))
        if not os.path.isfile(weights):
            raise FailedPrecondition(f"the llama.cpp engine loads a .gguf file, and {weights} is not a file")

        llama_cpp.llama_backend_init()
        report("loading weights", 0, 0)
        model_params = llama_cpp.llama_model_default_params()
        model_params.n_gpu_layers = n_gpu_layers
        model = llama_cpp.llama_model_load_from_file(weights.encode(), model_params)
        if not model:
            raise FailedPrecondition(f"llama.cpp could not load {weights} (not a GGUF model it supports?)")
        try:
            trained = int(llama_cpp.llama_model_n_ctx_train(model))
            per_sequence = min(DEFAULT_CONTEXT_PER_SEQUENCE, trained)
            context_length = _int_option(options, "context_length", per_sequence * n_seq_max)
            if not 2 * n_seq_max <= context_length <= trained * n_seq_max:
                raise InvalidArgument(
                    f"engine_options.context_length {context_length} must be in [{2 * n_seq_max}, "
                    f"{trained * n_seq_max}]: the KV cache is shared by {n_seq_max} sequences, "
                    f"each of at most the model's trained context of {trained} tokens"
                )
            context_params = llama_cpp.llama_context_default_params()
            context_params.n_ctx = context_length
            context_params.n_seq_max = n_seq_max
            context_params.kv_unified = kv_unified
            context_params.n_batch = max(BATCH_TOKENS, n_seq_max)
            context_params.n_threads = n_threads
            context_params.n_threads_batch = n_threads_batch
            context_params.type_k = context_params.type_v = KV_CACHE_TYPES[kv_cache_type]
            if flash_attention is not None:
                context_params.flash_attn_type = (
                    llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED
                    if flash_attention
                    else llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
                )
            context = llama_cpp.llama_init_from_model(model, context_params)
            if not context:
                raise ResourceExhausted(
                    f"llama.cpp could not create a context of {context_length} tokens for {n_seq_max} "
                    "sequences: lower engine_options.context_length"
                )
        except BaseException:
            llama_cpp.llama_model_free(model)
            raise
        slots = SlotTable(
            n_seq_max,
            KvEventLog(),
            enabled=bool(options.get("prefix_cache", True)),
            similarity=float(options.get("slot_prompt_similarity", 0.5)),
        )
        from llmgrpc.engines.llamacpp_lora import LoraLlamaCppRunner  # it builds on this module

        converted = Path(plan.cache_dir) / "lora-gguf"
        runner = LoraLlamaCppRunner(model, context, slots, plan.max_lora_rank, converted)
        try:
            report("warming up", 0, 0)
            warm_up = runner.tokenize("warm up")
            runner.admit(0, warm_up, GenerationRequest("warm-up", SamplingParams(), cache_prompt=False))
            runner.prefill([(0, warm_up)])
            runner.decode({0: 0})
            runner.release(0)
        except BaseException:
            runner.close()
            raise
        wants_gpu = on_gpu and n_gpu_layers != 0
        if wants_gpu and not llama_cpp.llama_supports_gpu_offload():
            log.warning("%s asked for, but this llama.cpp build runs on the CPU only", plan.device)
            wants_gpu = False
        device = plan.device if wants_gpu else "cpu"
        return cls(runner, plan.max_batch_size, device, **cls.step_budget(options))

    def load_adapter(self, module: LoraModule, path: str) -> int:
        return self.runner.load_adapter(module, path)

    def unload_adapter(self, name: str) -> None:
        self.runner.unload_adapter(name)

    def stats(self) -> EngineStats:
        stats = super().stats()
        stats.adapter_ranks = self.runner.ranks()
        stats.resident_adapters = list(stats.adapter_ranks)
        return stats

    def close(self) -> None:
        super().close()  # stops the batcher thread first: nothing decodes while the context is freed
        self.runner.close()


ENGINE = LlamaCppEngine
