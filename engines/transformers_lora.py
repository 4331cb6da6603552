"""LoRA adapters on the Transformers engine: one forward pass for rows of different adapters.

Every adapted linear layer (q_proj, ...) is wrapped in a ``LoraLinear`` holding the
resident adapters' matrices side by side: A of all slots stacked into one (slots * r) x in
matrix, B into one out x (slots * r), each adapter's scaling folded into its B and a rank
below ``max_lora_rank`` padded with zeros. A forward pass computes, for every token,
``x A_all^T``, zeroes the columns of the slots that are not its own (a mask per token),
and adds ``(...) B_all^T``: two matrix products per layer whatever the mix of adapters,
where peft's ``adapter_names`` runs one pass of the layer per adapter present. Rows of the
base model have an all-zero mask; a pass with no adapter at all skips the layers' extra
work entirely.

``max_loras`` slots are resident; every loaded adapter stays in CPU memory, and one that
a new sequence needs is copied into a slot no running sequence uses, least recently used
first. A sequence whose adapter finds no such slot waits in the batcher's queue
(``can_admit``) until one frees.

Only the batcher's thread touches the slots and the wrapped layers; ``load``/``unload``
(LoadAdapter, on other threads) only change the set of adapters in CPU memory, under a lock.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from pathlib import Path

import torch

from llmgrpc.clients.errors import FailedPrecondition, Reason
from llmgrpc.engines.lora import LoraModule, PeftAdapter, check_fits, read_peft_adapter, unknown_adapter

BASE = -1  # the slot of a token of the base model


class LoraLinear(torch.nn.Module):
    """A linear layer plus the resident adapters' deltas, each token with its own (or none)."""

    def __init__(self, base: torch.nn.Module, slots: LoraSlots, in_features: int, out_features: int):
        super().__init__()
        self.base = base
        self.slots = slots
        width = slots.max_loras * slots.max_rank
        options = {"dtype": slots.dtype, "device": slots.device}
        self.a = torch.zeros((width, in_features), **options)  # slot s: rows s*r to (s+1)*r
        self.b = torch.zeros((out_features, width), **options)  # slot s: the same columns

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        mask = self.slots.mask
        if mask is None:
            return out
        return out + ((x @ self.a.T) * mask) @ self.b.T


class LoraSlots:
    """The adapters of one model: all in CPU memory, max_loras of them resident in the layers."""

    def __init__(self, model: torch.nn.Module, max_loras: int, max_rank: int):
        self.model = model
        self.max_loras, self.max_rank = max_loras, max_rank
        parameter = next(model.parameters())
        self.dtype, self.device = parameter.dtype, parameter.device
        # (out, in) of every linear layer an adapter may target, by module path.
        self.base_layers = {
            name: (int(module.out_features), int(module.in_features))
            for name, module in model.named_modules()
            if hasattr(module, "in_features") and hasattr(module, "out_features") and name
        }
        self.mask: torch.Tensor | None = None  # the current pass's, [batch, tokens, slots * r]
        self._lock = threading.Lock()
        self._adapters: dict[str, PeftAdapter] = {}  # loaded, in CPU memory
        self._resident: OrderedDict[str, int] = OrderedDict()  # adapter -> slot, least recent first
        self._users: dict[int, int] = {}  # slot -> sequences using it
        self._slot_of_sequence: dict[int, int] = {}
        self._wrapped: dict[str, LoraLinear] = {}
        self._column_slot = torch.arange(max_loras * max_rank, device=self.device) // max_rank

    # Other threads: LoadAdapter and UnloadAdapter.

    def load(self, module: LoraModule, path: str) -> int:
        adapter = read_peft_adapter(module.name, Path(path), module.scale)
        check_fits(adapter, self.base_layers, self.max_rank)
        with self._lock:
            self._adapters[module.name] = adapter
        return adapter.rank

    def unload(self, name: str) -> None:
        with self._lock:
            if name not in self._adapters:
                raise unknown_adapter(name, sorted(self._adapters))
            slot = self._resident.get(name)
            if slot is not None and self._users.get(slot):
                raise FailedPrecondition(
                    f"adapter {name!r} has sequences running", reason=Reason.ADAPTER_IN_USE
                )
            del self._adapters[name]
            # Its slot is reused by the next adapter that needs one (the zeroed weights come then).
            if slot is not None:
                del self._resident[name]

    def ranks(self) -> dict[str, int]:
        with self._lock:
            return {name: adapter.rank for name, adapter in self._adapters.items()}

    def resident(self) -> list[str]:
        with self._lock:
            return list(self._resident)

    # The batcher's thread.

    def can_admit(self, adapter: str) -> bool:
        """Whether a sequence of adapter can start now: resident, or a slot it can take."""
        with self._lock:
            return not adapter or adapter in self._resident or self._free_slot() is not None

    def acquire(self, sequence_id: int, adapter: str) -> None:
        """A new sequence of adapter (empty: the base): its adapter made resident and held."""
        if not adapter:
            return
        with self._lock:
            weights = self._adapters.get(adapter)
            if weights is None:
                raise unknown_adapter(adapter, sorted(self._adapters))
            slot = self._resident.get(adapter)
            if slot is None:
                slot = self._free_slot()
                if slot is None:  # the batcher asked can_admit first: a bug if it comes to this
                    raise FailedPrecondition(f"no LoRA slot is free for adapter {adapter!r}")
                self._install(weights, slot)
            self._resident.move_to_end(adapter)
            self._users[slot] = self._users.get(slot, 0) + 1
            self._slot_of_sequence[sequence_id] = slot

    def release(self, sequence_id: int) -> None:
        slot = self._slot_of_sequence.pop(sequence_id, None)
        if slot is not None:
            self._users[slot] -= 1

    def for_rows(self, sequence_ids: list[int]) -> None:
        """The next pass decodes these sequences, one token a row."""
        self._set_mask([[self._slot_of_sequence.get(s, BASE)] for s in sequence_ids])

    def for_tokens(self, parts: list[tuple[int, int]]) -> None:
        """The next pass feeds these (sequence id, tokens) parts packed end to end in one row."""
        self._set_mask([[self._slot_of_sequence.get(s, BASE) for s, length in parts for _ in range(length)]])

    def _set_mask(self, slots: list[list[int]]) -> None:
        if all(slot == BASE for row in slots for slot in row):
            self.mask = None
            return
        token_slots = torch.tensor(slots, device=self.device)
        self.mask = (token_slots[..., None] == self._column_slot).to(self.dtype)

    def _free_slot(self) -> int | None:
        """An unused slot, or the least recently used resident one no sequence holds (lock held)."""
        taken = set(self._resident.values())
        for slot in range(self.max_loras):
            if slot not in taken:
                return slot
        for slot in self._resident.values():
            if not self._users.get(slot):
                return slot
        return None

    def _install(self, adapter: PeftAdapter, slot: int) -> None:
        """Copy adapter's matrices into slot, evicting its previous adapter (lock held)."""
        for name, resident_slot in list(self._resident.items()):
            if resident_slot == slot:
                del self._resident[name]
        columns = slice(slot * self.max_rank, (slot + 1) * self.max_rank)
        for layer in self._wrapped.values():
            layer.a[columns] = 0
            layer.b[:, columns] = 0
        for module_path, pair in adapter.layers.items():
            layer = self._wrapped.get(module_path) or self._wrap(module_path)
            rank = pair.a.shape[0]
            layer.a[columns][:rank] = torch.from_numpy(pair.a).to(layer.a)
            layer.b[:, columns][:, :rank] = torch.from_numpy(pair.b * adapter.scaling).to(layer.b)
        self._resident[adapter.name] = slot

    def _wrap(self, module_path: str) -> LoraLinear:
        parent_path, _, child = module_path.rpartition(".")
        parent = self.model.get_submodule(parent_path)
        out_features, in_features = self.base_layers[module_path]
        layer = LoraLinear(getattr(parent, child), self, in_features, out_features)
        setattr(parent, child, layer)
        self._wrapped[module_path] = layer
        return layer
