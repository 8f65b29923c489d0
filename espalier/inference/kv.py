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
    """A cache layer with spare columns: a step writes its keys and values in place.

    `DynamicLayer` concatenates the whole cache on every step (half of a decode step's time
    at 12 rows x 600 tokens on CPU); here the cache is copied only when its buffer is full.
    `keys` / `values` are views of the filled part."""

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.dtype, self.device, self.is_initialized = key_states.dtype, key_states.device, True
            self._k = self._v = None
            self._n = 0
        n, add = self._n, key_states.shape[-2]
        if self._k is None or n + add > self._k.shape[-2]:
            self._k, self._v = self._grown(self._k, key_states, n + add), self._grown(self._v, value_states, n + add)
        self._k[:, :, n : n + add] = key_states
        self._v[:, :, n : n + add] = value_states
        self._n = n + add
        self.keys, self.values = self._k[:, :, : self._n], self._v[:, :, : self._n]
        return self.keys, self.values

    def _grown(self, old: torch.Tensor | None, new: torch.Tensor, needed: int) -> torch.Tensor:
        # (B, H, capacity, D) in the cache's dtype: under bf16 autocast a step's values arrive in bf16
        buf = new.new_empty((*new.shape[:2], capacity(needed), new.shape[-1]), dtype=self.dtype)
        if old is not None and self._n:
            buf[:, :, : self._n] = old[:, :, : self._n]
        return buf

    @classmethod
    def holding(cls, keys: torch.Tensor, values: torch.Tensor, filled: int) -> GrowingLayer:
        """A layer whose buffers are `keys` and `values` (B, H, capacity, D), the first `filled` columns valid:
        taken as they are, not copied."""
        layer = cls()
        layer.dtype, layer.device, layer.is_initialized = keys.dtype, keys.device, True
        layer._k, layer._v, layer._n = keys, values, filled
        layer.keys, layer.values = keys[:, :, :filled], values[:, :, :filled]
        return layer


def capacity(needed: int) -> int:
    """Columns to allocate for `needed`: room for at least 64 more decode steps before the next copy."""
    return needed + max(64, needed // 2)


class GrowingCache(DynamicCache):
    """A `DynamicCache` of `GrowingLayer`s, filled with `kv`."""

    def __init__(self, kv: KV) -> None:
        Cache.__init__(self, layers=[GrowingLayer() for _ in kv])
        for layer, (k, v) in zip(self.layers, kv, strict=True):
            layer.update(k, v)

    @classmethod
    def holding(cls, layers: list[GrowingLayer]) -> GrowingCache:
        cache = cls([])
        cache.layers = layers
        return cache


def kv_bytes(kv: KV) -> int:
    return sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in kv)


@dataclass
class DecodeBatch:
    """Rows decoding together: their KV, attention mask (B, W) and next input ids (B, 1)."""

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
        """Add rows whose KV (one per row, or one row shared by all) covers `kv` columns, all valid.

        Each layer's KV is copied once, into a new buffer with room to grow: the rows in flight,
        then the new ones, right-aligned, their left padding zeroed (masked, but 0 x NaN would not be)."""
        n, length = len(rows), kv[0][0].shape[-2]
        mask = torch.ones((n, length), dtype=torch.long, device=next_ids.device)
        if not self.rows:
            kv = [(k.expand(n, -1, -1, -1), v.expand(n, -1, -1, -1)) for k, v in kv] if kv[0][0].shape[0] == 1 else kv
            self.rows, self.cache, self.mask, self.next_ids = list(rows), GrowingCache(kv), mask, next_ids
            return
        width, old = max(self.width, length), len(self.rows)
        self.cache = GrowingCache.holding([_stacked([((a.keys, a.values), old), (b, n)], width) for a, b in
                                           zip(self.cache.layers, kv, strict=True)])
        pad = lambda m: torch.cat([m.new_zeros((m.shape[0], width - m.shape[1])), m], dim=1)  # noqa: E731
        self.mask = torch.cat([pad(self.mask), pad(mask)])
        self.next_ids = torch.cat([self.next_ids, next_ids])
        self.rows += rows

    def keep(self, indices: list[int]) -> None:
        """Keep only these rows, and drop leading columns no remaining row uses (one copy of the KV)."""
        if not indices:
            self.rows, self.cache, self.mask, self.next_ids = [], None, None, None
            return
        idx = torch.tensor(indices, device=self.mask.device)
        mask = self.mask.index_select(0, idx)
        start = int(self.width - mask.sum(-1).max())
        width = self.width - start
        layers = []
        for layer in self.cache.layers:
            k, v = (_buffer(t, len(indices), width) for t in (layer.keys, layer.values))
            for j, i in enumerate(indices):
                k[j, :, :width] = layer.keys[i, :, start:]
                v[j, :, :width] = layer.values[i, :, start:]
            layers.append(GrowingLayer.holding(k, v, width))
        self.cache = GrowingCache.holding(layers)
        self.mask = mask[:, start:]
        self.next_ids = self.next_ids.index_select(0, idx)
        self.rows = [self.rows[i] for i in indices]

    def row_kv(self, i: int) -> KV:
        """Row i's valid KV, (1, H, valid, D) per layer."""
        valid = int(self.mask[i].sum())
        return [(k[i : i + 1, :, self.width - valid :], v[i : i + 1, :, self.width - valid :]) for k, v in self.kv]


def _buffer(like: torch.Tensor, rows: int, width: int) -> torch.Tensor:
    """An uninitialised (rows, H, capacity(width), D) buffer of `like`'s dtype and device."""
    return like.new_empty((rows, like.shape[1], capacity(width), like.shape[-1]))


def _stacked(parts: list[tuple], width: int) -> GrowingLayer:
    """A layer holding the rows of `parts` (((keys, values), rows) each) stacked, each part's valid columns
    right-aligned at `width`, the columns before them zero."""
    total, like = sum(rows for _, rows in parts), parts[0][0][0]
    k, v = _buffer(like, total, width), _buffer(like, total, width)
    at = 0
    for (pk, pv), rows in parts:
        length = pk.shape[-2]
        for buf, src in ((k, pk), (v, pv)):
            buf[at : at + rows, :, : width - length] = 0
            buf[at : at + rows, :, width - length : width] = src  # a (1, ...) part is broadcast to its rows
        at += rows
    return GrowingLayer.holding(k, v, width)


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
            _Entry(adapter, tokens, [(k.contiguous(), v.contiguous()) for k, v in kv], time.monotonic())
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
