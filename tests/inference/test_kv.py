"""The transformers engine's running batch: rows keep exactly their own keys and values as rows join, leave and
decode steps append, whether the buffers are reused in place or copied."""

import torch

from espalier.inference.kv import DecodeBatch

LAYERS, HEADS, DIM = 2, 2, 4


class Rows:
    """A DecodeBatch and, for each of its rows, the keys and values it must hold."""

    def __init__(self, max_rows: int) -> None:
        self.batch, self.truth, self.next_id = DecodeBatch(max_rows), {}, 0

    def join(self, count: int, length: int, shared: bool = False) -> None:
        kv = [(torch.randn(1 if shared else count, HEADS, length, DIM), torch.randn(1 if shared else count, HEADS, length, DIM))
              for _ in range(LAYERS)]
        ids = list(range(self.next_id, self.next_id + count))
        self.next_id += count
        for j, row in enumerate(ids):
            self.truth[row] = [(k[0 if shared else j], v[0 if shared else j]) for k, v in kv]
        self.batch.join(ids, kv, torch.zeros((count, 1), dtype=torch.long))
        self.check()

    def step(self) -> None:
        """What a decode step does to the batch: every layer appends one column per row, the mask grows."""
        b = self.batch
        new = [(torch.randn(len(b), HEADS, 1, DIM), torch.randn(len(b), HEADS, 1, DIM)) for _ in range(LAYERS)]
        for layer, (k, v) in zip(b.cache.layers, new, strict=True):
            layer.update(k, v)
        b.mask = torch.cat([b.mask, torch.ones((len(b), 1), dtype=torch.long)], dim=1)
        for i, row in enumerate(b.rows):
            self.truth[row] = [(torch.cat([tk, k[i]], 1), torch.cat([tv, v[i]], 1))
                               for (tk, tv), (k, v) in zip(self.truth[row], new, strict=True)]
        self.check()

    def keep(self, indices: list[int]) -> None:
        self.batch.keep(indices)
        self.check()

    def check(self) -> None:
        b = self.batch
        if not b.rows:
            assert b.cache is None and b.mask is None
            return
        assert b.mask.shape == (len(b), b.width) and all(k.shape[:3] == (len(b), HEADS, b.width) for k, _ in b.kv)
        for i, row in enumerate(b.rows):
            valid = int(b.mask[i].sum())
            assert bool(b.mask[i, b.width - valid :].all())  # right-aligned
            for (k, v), (tk, tv), (bk, bv) in zip(b.row_kv(i), self.truth[row], b.kv, strict=True):
                assert torch.equal(k[0], tk) and torch.equal(v[0], tv)
                assert not bk[i, :, : b.width - valid].any() and not bv[i, :, : b.width - valid].any()


def test_rows_keep_their_own_kv_through_joins_departures_steps_and_regrowth():
    torch.manual_seed(0)
    rows = Rows(max_rows=8)
    rows.join(2, 5)
    layer = rows.batch.cache.layers[0]
    buffer = layer._k
    for _ in range(3):
        rows.step()
    rows.join(1, 12)  # longer than the rows in flight, within the spare columns: written in place
    rows.keep([1, 2])  # row 2 moves into row 0's place
    rows.join(2, 4, shared=True)  # n samples of one prompt share its KV
    rows.step()
    assert layer._k is buffer, "joins and departures within the buffers' capacity copy only their own rows"
    rows.keep([0, 2, 3])
    rows.join(4, 300)  # longer than the buffers' columns: copied once into larger ones
    assert layer._k is not buffer
    for _ in range(150):  # past the spare columns at the end: copied again
        rows.step()
    rows.keep([5])
    rows.join(2, 3)
    rows.step()
    rows.keep([])
