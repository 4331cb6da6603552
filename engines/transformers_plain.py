"""The Transformers engine's plain runner: the decode batch's KV cache in buffers written in
place (the CPU default, engine_options.decode plain)."""

from __future__ import annotations

import numpy as np
import torch
from transformers import DynamicCache
from transformers.cache_utils import Cache, DynamicLayer

from llmgrpc.engines.transformers_runner import HuggingFaceRunner


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
        _, column, window = self.runner._target
        return column - window.start

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

    A prompt's last part, after earlier parts or a prefix found in the prefix cache, is
    computed in the new row it joins: its KV goes into the batch's buffers in one copy, not
    one into a buffer of its own and another when it joins.
    """

    def __init__(self, model, tokenizer, context_length: int, prefix_cache_tokens: int = 0):
        super().__init__(model, tokenizer, context_length, prefix_cache_tokens)
        self._order: list[int] = []  # sequence id of each batch row
        self._keys: list[torch.Tensor] = []  # per layer: [rows, heads, columns, head dim]
        self._values: list[torch.Tensor] = []
        self._valid = torch.zeros((0, 0), dtype=torch.bool, device=self.device)  # [rows, columns]
        self._positions = torch.zeros(0, dtype=torch.long, device=self.device)  # each row's next position
        self._start = self._end = 0  # the window: [first used column, write column)
        self._cache: Cache | None = None
        # What the next forward pass writes and reads: its rows, the column its first token is
        # written at, and the columns it attends to.
        self._target: tuple[slice, int, slice] = (slice(0, 0), 0, slice(0, 0))

    @torch.inference_mode()
    def prefill(self, sequences: list[tuple[int, list[int]]]) -> np.ndarray:
        last_parts = {s: part for s, part in sequences if self._ends_prompt(s, part)}
        others = [(s, part) for s, part in sequences if s not in last_parts]
        rows = dict(zip((s for s, _ in others), super().prefill(others), strict=True)) if others else {}
        for sequence_id, part in last_parts.items():
            rows[sequence_id] = self._prefill_in_row(sequence_id, part)
            self._held[sequence_id].extend(part)
        return np.stack([rows[sequence_id] for sequence_id, _ in sequences])

    def _ends_prompt(self, sequence_id: int, part: list[int]) -> bool:
        """Whether part is the last of a prompt that has KV already (earlier parts, a cached prefix)."""
        return sequence_id in self._prefilling and len(self._held[sequence_id]) + len(part) == (
            self._prompt_length.get(sequence_id)
        )

    def _prefill_in_row(self, sequence_id: int, part: list[int]) -> np.ndarray:
        """Join a prompt's KV so far as a new row ending len(part) columns before the write column,
        and compute its last part there, in that row alone; logits after it."""
        cache = self._prefilling.pop(sequence_id)
        held = cache.get_seq_length()
        length = held + len(part)
        self._join(sequence_id, cache, ahead=len(part))
        row, start = len(self._order) - 1, self._end - length
        positions = torch.arange(held, length, device=self.device)
        causal = torch.arange(length, device=self.device)[None, :] <= positions[:, None]
        self._target = (slice(row, row + 1), self._end - len(part), slice(start, self._end))
        self._adapters_for_tokens([(sequence_id, len(part))])
        output = self.model(
            input_ids=torch.tensor([part], device=self.device),
            position_ids=positions[None],
            attention_mask=self._attention_mask(causal[None, None]),
            cache=self._cache,
            use_cache=True,
            **self._logits_at(-1),
        )
        return output.logits[0, -1].float().cpu().numpy()

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
        self._target = (slice(0, rows), self._end, slice(self._start, self._end + 1))
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
        self._decoded(last_tokens)
        logits = output.logits[:, -1].float().cpu().numpy()
        row_of = {sequence_id: row for row, sequence_id in enumerate(self._order)}
        return logits[[row_of[s] for s in last_tokens]]

    def _write(self, layer: int, keys: torch.Tensor, values: torch.Tensor):
        """A layer's keys and values of this pass into the target's rows and columns; the window
        of those rows to attend to."""
        rows, column, window = self._target
        written = slice(column, column + keys.shape[2])
        self._keys[layer][rows, :, written] = keys
        self._values[layer][rows, :, written] = values
        return self._keys[layer][rows, :, window], self._values[layer][rows, :, window]

    def _join(self, sequence_id: int, cache: DynamicCache, ahead: int = 0) -> None:
        """Copy a prefilled prompt's KV into a new last row, ending `ahead` columns before the
        write column (those are the columns of its last part, computed in the row)."""
        length = cache.get_seq_length() + ahead
        self._make_room(len(self._order) + 1, length, cache)
        row, start = len(self._order), self._end - length
        for keys, values, layer in zip(self._keys, self._values, cache.layers, strict=True):
            keys[row, :, start : self._end - ahead] = layer.keys[0]
            values[row, :, start : self._end - ahead] = layer.values[0]
        self._valid[row] = False
        self._valid[row, start : self._end] = True
        self._positions[row] = length
        self._start = min(self._start, start) if self._order else start
        self._order.append(sequence_id)

    @torch.inference_mode()
    def release(self, sequence_id: int) -> None:
        if not self._leave(sequence_id, sequence_id in self._order):
            return
        row, last = self._order.index(sequence_id), len(self._order) - 1
        # Its columns end at the write column.
        self._keep_row(sequence_id, zip(self._keys, self._values, strict=True), row, self._end)
        window = slice(self._start, self._end)
        if row != last:  # the last row's own columns only: the window may be far longer
            own = slice(self._end - int(self._positions[last]), self._end)
            for buffer in (*self._keys, *self._values):
                buffer[row, :, own] = buffer[last, :, own]
            self._valid[row] = False
            self._valid[row, own] = True
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
