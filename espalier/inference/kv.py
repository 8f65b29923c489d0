"""KV-cache pieces of the transformers engine: a running left-padded batch and a prefix cache.

A row's keys and values are right-aligned in the batch: its valid positions are the last
`valid` columns, left padding before them is masked out. Rows join (`DecodeBatch.join`) and
leave (`DecodeBatch.keep`) between decode steps, which is continuous batching. RoPE is
applied before caching, so moving a row's KV to other columns does not change it.

`PrefixCache` keeps the KV of recent prompts and finished sequences per adapter; a new
prompt reuses the longest common token prefix (the shared system prompt of a predictor, or
a field sampled one call earlier by `FieldwiseChatAdapter`) and prefills only the rest.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache
from transformers.cache_utils import Cache, DynamicLayer

KV = list[tuple[torch.Tensor, torch.Tensor]]  # per layer: keys, values, each (B, H, L, D)


def cache_kv(cache: DynamicCache) -> KV:
    return [(layer.keys, layer.values) for layer in cache.layers]


class GrowingLayer(DynamicLayer):
    """A cache layer on buffers with spare rows and columns: a step writes its keys and values in place.

    `DynamicLayer` concatenates the whole cache on every step (half of a decode step's time at
    12 rows x 600 tokens on CPU); here the buffers (R, H, C, D) are copied only when full. Rows
    `[0, rows)` and columns `[start, end)` are the cache: `keys` / `values` are views of them."""

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self._empty(key_states, rows=key_states.shape[0])
        add = key_states.shape[-2]
        if self.end + add > self._k.shape[-2]:
            self.move(self.rows, end_at=self.width, extra=add)
        self._k[: self.rows, :, self.end : self.end + add] = key_states
        self._v[: self.rows, :, self.end : self.end + add] = value_states
        self.end += add
        self._view()
        return self.keys, self.values

    @classmethod
    def empty(cls, like: torch.Tensor) -> GrowingLayer:
        """A layer of no rows for keys and values like `like` (B, H, L, D)."""
        layer = cls()
        layer._empty(like, rows=0)
        return layer

    @property
    def width(self) -> int:
        return self.end - self.start

    @property
    def row_capacity(self) -> int:
        return self._k.shape[0]

    def move(self, rows: int, end_at: int, extra: int = 0) -> None:
        """Copy the cache into new buffers of `rows` rows, its columns ending at `end_at` (the columns before
        them spare, for longer rows to join), with room for `extra` more and spare columns after them; in the
        cache's dtype (under bf16 autocast a step's values arrive in bf16)."""
        shape = (rows, self._k.shape[1], capacity(end_at + extra), self._k.shape[-1])
        k, v = self._k.new_empty(shape, dtype=self.dtype), self._v.new_empty(shape, dtype=self.dtype)
        start = end_at - self.width
        if self.width:
            k[: self.rows, :, start:end_at] = self.keys
            v[: self.rows, :, start:end_at] = self.values
        self._k, self._v, self.start, self.end = k, v, start, end_at
        self._view()

    def write(self, at: int, kv: tuple[torch.Tensor, torch.Tensor], width: int, count: int) -> None:
        """Put `count` rows at `at` (a one-row `kv` is broadcast to all of them), right-aligned at the end, and
        widen the cache to `width` columns: columns no row held before are zeroed (masked, but 0 x NaN would
        not be)."""
        length, start = kv[0].shape[-2], self.end - width
        for buf, src in zip((self._k, self._v), kv, strict=True):
            buf[: self.rows, :, start : self.start] = 0
            buf[at : at + count, :, start : self.end - length] = 0
            buf[at : at + count, :, self.end - length : self.end] = src
        self.rows, self.start = at + count, start
        self._view()

    def copy_row(self, source: int, target: int) -> None:
        self._k[target, :, self.start : self.end] = self._k[source, :, self.start : self.end]
        self._v[target, :, self.start : self.end] = self._v[source, :, self.start : self.end]

    def narrow(self, rows: int, drop: int) -> None:
        """Keep the first `rows` rows and drop the first `drop` columns (no copy)."""
        self.rows, self.start = rows, self.start + drop
        self._view()

    def _empty(self, like: torch.Tensor, rows: int) -> None:
        self.dtype, self.device, self.is_initialized = like.dtype, like.device, True
        self._k = like.new_empty((0, like.shape[1], 0, like.shape[-1]))
        self._v = self._k
        self.rows, self.start, self.end = rows, 0, 0
        self._view()

    def _view(self) -> None:
        self.keys = self._k[: self.rows, :, self.start : self.end]
        self.values = self._v[: self.rows, :, self.start : self.end]


def capacity(needed: int) -> int:
    """Columns to allocate for `needed`: room for at least 64 more decode steps before the next copy."""
    return needed + max(64, needed // 4)


class GrowingCache(DynamicCache):
    """A `DynamicCache` of `GrowingLayer`s, filled with `kv` (or `layers` as they are)."""

    def __init__(self, kv: KV, layers: list[GrowingLayer] | None = None) -> None:
        Cache.__init__(self, layers=layers if layers is not None else [GrowingLayer() for _ in kv])
        if layers is None:
            for layer, (k, v) in zip(self.layers, kv, strict=True):
                layer.update(k, v)


def kv_bytes(kv: KV) -> int:
    return sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in kv)


@dataclass
class DecodeBatch:
    """Rows decoding together: their KV, attention mask (B, W) and next input ids (B, 1), at most `max_rows`.

    Rows join into spare rows of the cache's buffers and leave by moving rows from the end into
    their places, so a join or a departure copies only the rows that join or move; the buffers
    are copied when they run out of rows or columns."""

    max_rows: int = 32
    rows: list = field(default_factory=list)
    cache: DynamicCache | None = None  # the model appends each step's KV to it in place
    mask: torch.Tensor | None = None
    next_ids: torch.Tensor | None = None
    adapter: str | None = None

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def kv(self) -> KV:
        return cache_kv(self.cache)

    @property
    def width(self) -> int:
        return 0 if self.mask is None else self.mask.shape[1]

    def join(self, rows: list, kv: KV, next_ids: torch.Tensor) -> None:
        """Add rows whose KV (one per row, or one row shared by all) covers `kv` columns, all valid."""
        n, length, old = len(rows), kv[0][0].shape[-2], len(self.rows)
        width = max(self.width, length)
        if self.cache is None:
            self.cache = GrowingCache([], layers=[GrowingLayer.empty(k) for k, _ in kv])
        for layer, part in zip(self.cache.layers, kv, strict=True):
            if old + n > layer.row_capacity or width > layer.end:  # spare rows, and columns for longer rows
                spare = min(self.max_rows, old + n + max(2, (old + n) // 4))
                layer.move(max(spare, old + n), end_at=width + max(32, width // 8))
            layer.write(old, part, width, n)
        mask = torch.ones((n, length), dtype=torch.long, device=next_ids.device)
        self.mask = _left_pad(mask, width) if self.mask is None else torch.cat([_left_pad(self.mask, width),
                                                                                _left_pad(mask, width)])
        self.next_ids = next_ids if self.next_ids is None else torch.cat([self.next_ids, next_ids])
        self.rows += rows

    def keep(self, indices: list[int]) -> None:
        """Keep only these rows (ascending): rows past the kept count move into the places of rows that leave,
        and leading columns no remaining row uses are dropped."""
        if not indices:
            self.rows, self.cache, self.mask, self.next_ids = [], None, None, None
            return
        count, kept = len(indices), set(indices)
        order = list(range(count))
        for hole, mover in zip([i for i in order if i not in kept], [i for i in indices if i >= count], strict=True):
            order[hole] = mover
            for layer in self.cache.layers:
                layer.copy_row(mover, hole)
        idx = torch.tensor(order, device=self.mask.device)
        mask = self.mask.index_select(0, idx)
        drop = int(self.width - mask.sum(-1).max())
        for layer in self.cache.layers:
            layer.narrow(count, drop)
        self.mask = mask[:, drop:]
        self.next_ids = self.next_ids.index_select(0, idx)
        self.rows = [self.rows[i] for i in order]

    def row_kv(self, i: int) -> KV:
        """Row i's valid KV, (1, H, valid, D) per layer."""
        valid = int(self.mask[i].sum())
        return [(k[i : i + 1, :, self.width - valid :], v[i : i + 1, :, self.width - valid :]) for k, v in self.kv]


def _left_pad(mask: torch.Tensor, width: int) -> torch.Tensor:
    return torch.cat([mask.new_zeros((mask.shape[0], width - mask.shape[1])), mask], dim=1)


def _starts(tokens: torch.Tensor, prefix: torch.Tensor) -> bool:
    return len(prefix) <= len(tokens) and bool((tokens[: len(prefix)] == prefix).all())


@dataclass
class _Entry:
    adapter: str | None
    tokens: torch.Tensor  # (L,) the ids whose KV is held
    kv: KV  # (1, H, L, D) per layer
    used: float


class PrefixCache:
    """KV of recent token sequences per adapter, at most `max_bytes`, least recently used out first."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._entries: list[_Entry] = []
        self.hits = self.lookups = self.reused_tokens = 0

    def lookup(self, adapter: str | None, prompt: torch.Tensor) -> tuple[int, KV | None]:
        """The longest held prefix of `prompt` (at most len - 1 tokens: one must be fed) and its KV."""
        self.lookups += 1
        best, best_len = None, 0
        for e in self._entries:
            if e.adapter != adapter:
                continue
            n = min(len(e.tokens), len(prompt) - 1)
            same = e.tokens[:n] == prompt[:n]
            common = n if bool(same.all()) else int((~same).int().argmax())
            if common > best_len:
                best, best_len = e, common
        if best is None:
            return 0, None
        best.used = time.monotonic()
        self.hits += 1
        self.reused_tokens += best_len
        return best_len, [(k[:, :, :best_len], v[:, :, :best_len]) for k, v in best.kv]

    def add(self, adapter: str | None, tokens: torch.Tensor, kv: KV) -> None:
        if self.max_bytes <= 0 or kv_bytes(kv) > self.max_bytes:
            return
        self._entries = [e for e in self._entries if not (e.adapter == adapter and _starts(tokens, e.tokens))]
        self._entries.append(
            _Entry(adapter, tokens, [(k.clone(memory_format=torch.contiguous_format), v.clone(memory_format=torch.contiguous_format)) for k, v in kv], time.monotonic())
        )
        self._entries.sort(key=lambda e: e.used, reverse=True)
        total = 0
        for i, e in enumerate(self._entries):
            total += kv_bytes(e.kv)
            if total > self.max_bytes:
                del self._entries[i:]
                break

    def drop(self, adapter: str | None) -> None:
        """Forget an adapter's entries (it was replaced or unloaded)."""
        self._entries = [e for e in self._entries if e.adapter != adapter]
