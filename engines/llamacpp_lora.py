"""LoRA adapters on the llama.cpp engine: each step's rows grouped by adapter, one llama_decode a group.

llama.cpp applies adapters per context (``llama_set_adapters_lora``), not per row, so the
runner splits a step: the rows of the base model in one ``llama_decode``, the rows of each
adapter in one more, the context's adapter set switched between them (only when it
changes). The cost: a step with k adapters present (base counted) reads the model's weights
k times, so where decoding is bound by memory bandwidth (the CPU, small batches) its time
grows about k-fold while the rows per pass shrink; a batch of one adapter costs what a base
batch costs. One context per resident adapter would instead hold a KV cache per adapter and
still run one pass per adapter. docs/benchmarks.md measures the cost.

A PEFT folder is converted to a GGUF LoRA at load (``gguf_lora``), after ``check_fits``
against the shapes the GGUF's metadata gives; a ``.gguf`` LoRA file is taken as it is, and
llama.cpp checks it itself. Every loaded adapter stays resident (its tensors are small beside
the model's, and on the CPU there is no other memory to swap them to): ``max_loras`` does
not apply here.

``llama_adapter_lora_init`` reads the model while the batcher decodes with it, so adapter
loads and the runner's passes take one lock.
"""

from __future__ import annotations

import ctypes
import hashlib
import threading
from pathlib import Path

import numpy as np

from llmgrpc.clients.errors import FailedPrecondition, Reason
from llmgrpc.engines.llamacpp_engine import LlamaCppRunner, llama_cpp
from llmgrpc.engines.llamacpp_slots import SlotTable
from llmgrpc.engines.lora import (
    LoraModule,
    check_fits,
    llama_layer_shapes,
    read_peft_adapter,
    unknown_adapter,
)
from llmgrpc.engines.weights.gguf_lora import write_gguf_lora


class _Loaded:
    def __init__(self, pointer, scale: float, rank: int):
        self.pointer, self.scale, self.rank = pointer, scale, rank


class LoraLlamaCppRunner(LlamaCppRunner):
    """A llama.cpp runner whose sequences may each name a LoRA adapter."""

    def __init__(self, model, context, slots: SlotTable, max_rank: int, converted_dir: Path):
        super().__init__(model, context, slots)
        self.max_rank = max_rank
        self.converted_dir = converted_dir
        self.lock = threading.Lock()
        self._adapters: dict[str, _Loaded] = {}
        self._applied = ""  # the adapter set on the context now

    # LoadAdapter and UnloadAdapter (other threads).

    def load_adapter(self, module: LoraModule, path: str) -> int:
        source = Path(path)
        if source.is_file():  # a GGUF LoRA as it is
            gguf_path, rank = source, _gguf_lora_rank(source)
        else:
            adapter = read_peft_adapter(module.name, source)
            check_fits(adapter, self._base_layers(), self.max_rank)
            digest = hashlib.sha256((source / "adapter_model.safetensors").read_bytes()).hexdigest()[:16]
            gguf_path, rank = self.converted_dir / f"{module.name}-{digest}.gguf", adapter.rank
            if not gguf_path.exists():
                n_head, n_head_kv = (
                    int(self._meta(f"{self._architecture()}.attention.{k}"))
                    for k in ("head_count", "head_count_kv")
                )
                write_gguf_lora(adapter, gguf_path, self._architecture(), n_head, n_head_kv)
        if rank > self.max_rank:
            raise FailedPrecondition(
                f"adapter {module.name!r} does not fit the base model: its rank {rank} is above the "
                f"model's max_lora_rank {self.max_rank}",
                reason=Reason.ADAPTER_INCOMPATIBLE,
            )
        with self.lock:
            pointer = llama_cpp.llama_adapter_lora_init(self.model, str(gguf_path).encode())
            if not pointer:
                raise FailedPrecondition(
                    f"adapter {module.name!r} does not fit the base model: llama.cpp refused "
                    f"{gguf_path.name} (another architecture, or tensors shaped otherwise; see the "
                    "worker's log)",
                    reason=Reason.ADAPTER_INCOMPATIBLE,
                )
            self._adapters[module.name] = _Loaded(pointer, module.scale, rank)
        return rank

    def unload_adapter(self, name: str) -> None:
        with self.lock:
            if name not in self._adapters:
                raise unknown_adapter(name, sorted(self._adapters))
            if name in self._adapter_of.copy().values():  # a copy: the batcher's thread changes it
                raise FailedPrecondition(
                    f"adapter {name!r} has sequences running", reason=Reason.ADAPTER_IN_USE
                )
            if self._applied == name:
                self._apply("")
            # Its tensors stay with the model until the model is freed (llama.cpp frees them then).
            del self._adapters[name]

    def ranks(self) -> dict[str, int]:
        with self.lock:
            return {name: loaded.rank for name, loaded in self._adapters.items()}

    # The batcher's thread.

    def admit(self, sequence_id: int, prompt_ids: list[int], request) -> int:
        # The base runner records the sequence's adapter (_adapter_of) once it has a slot.
        if request.adapter and request.adapter not in self._adapters:
            raise unknown_adapter(request.adapter, sorted(self._adapters))
        return super().admit(sequence_id, prompt_ids, request)

    def prefill(self, sequences: list[tuple[int, list[int]]]) -> np.ndarray:
        groups = self._groups([sequence_id for sequence_id, _ in sequences])
        parts = dict(sequences)
        with self.lock:
            if len(groups) == 1:
                self._apply(next(iter(groups)))
                return super().prefill(sequences)
            rows = np.empty((len(sequences), self.vocab_size), dtype=np.float32)
            row_of = {sequence_id: row for row, (sequence_id, _) in enumerate(sequences)}
            for adapter, ids in groups.items():
                self._apply(adapter)
                rows[[row_of[s] for s in ids]] = super().prefill([(s, parts[s]) for s in ids])
            return rows

    def decode(self, last_tokens: dict[int, int]) -> np.ndarray:
        groups = self._groups(list(last_tokens))
        with self.lock:
            if len(groups) == 1:
                self._apply(next(iter(groups)))
                return super().decode(last_tokens)
            rows = np.empty((len(last_tokens), self.vocab_size), dtype=np.float32)
            row_of = {sequence_id: row for row, sequence_id in enumerate(last_tokens)}
            for adapter, ids in groups.items():
                self._apply(adapter)
                rows[[row_of[s] for s in ids]] = super().decode({s: last_tokens[s] for s in ids})
            return rows

    def _groups(self, sequence_ids: list[int]) -> dict[str, list[int]]:
        groups: dict[str, list[int]] = {}
        for sequence_id in sequence_ids:
            groups.setdefault(self._adapter_of.get(sequence_id, ""), []).append(sequence_id)
        return groups

    def _apply(self, name: str) -> None:
        """Set the context's adapters to name's alone (empty: none), when it is not already."""
        if name == self._applied:
            return
        loaded = self._adapters.get(name)
        count = 1 if loaded is not None else 0
        pointers = (llama_cpp.llama_adapter_lora_p_ctypes * max(count, 1))()
        scales = (ctypes.c_float * max(count, 1))()
        if loaded is not None:
            pointers[0], scales[0] = loaded.pointer, loaded.scale
        status = llama_cpp.llama_set_adapters_lora(self.context, pointers, count, scales)
        if status != 0:
            raise RuntimeError(f"llama_set_adapters_lora failed with status {status}")
        self._applied = name

    # The base model's shapes, from its GGUF metadata.

    def _meta(self, key: str) -> str:
        size = llama_cpp.llama_model_meta_val_str(self.model, key.encode(), None, 0)
        if size < 0:
            return ""
        buffer = ctypes.create_string_buffer(size + 1)
        llama_cpp.llama_model_meta_val_str(self.model, key.encode(), buffer, size + 1)
        return buffer.value.decode()

    def _architecture(self) -> str:
        return self._meta("general.architecture")

    def _base_layers(self) -> dict[str, tuple[int, int]]:
        arch = self._architecture()
        if arch != "llama":
            raise FailedPrecondition(
                f"PEFT adapters are converted for llama models here, and this GGUF is {arch!r}: give a GGUF "
                "LoRA file made for it instead",
                reason=Reason.ADAPTER_INCOMPATIBLE,
            )
        n_embd = int(llama_cpp.llama_model_n_embd(self.model))
        n_head = int(self._meta(f"{arch}.attention.head_count"))
        return llama_layer_shapes(
            n_layer=int(llama_cpp.llama_model_n_layer(self.model)),
            n_embd=n_embd,
            n_head=n_head,
            n_head_kv=int(self._meta(f"{arch}.attention.head_count_kv") or n_head),
            head_dim=int(self._meta(f"{arch}.attention.key_length") or n_embd // n_head),
            n_ff=int(self._meta(f"{arch}.feed_forward_length")),
        )


def _gguf_lora_rank(path: Path) -> int:
    """The rank of a GGUF LoRA file (its first lora_a's rows)."""
    import gguf

    reader = gguf.GGUFReader(path)
    for tensor in reader.tensors:
        if tensor.name.endswith(".lora_a"):
            return int(tensor.shape[-1])  # ggml's order: (in, r)
    raise FailedPrecondition(f"{path.name} holds no LoRA tensors", reason=Reason.MODEL_FILES_INVALID)
