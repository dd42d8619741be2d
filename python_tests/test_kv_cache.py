"""KV cache state machine: random writes / commits / resets against a list-based model of the cache."""
import pytest
import torch
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from tidar_kernels import append_attention, decode_attention
from tidar_kernels.model.kv_cache import KVCache

BATCH, MAX_LEN, HEADS, DIM = 3, 12, 2, 4


class CacheMachine(RuleBasedStateMachine):
    """Each sequence's committed rows, as Python lists of row tags, must match the cache.

    A row's K value is filled with its tag, V with minus it, so rows are recognisable.
    """

    def __init__(self):
        super().__init__()
        self.cache = KVCache(n_layers=2, batch=BATCH, max_len=MAX_LEN, n_kv_heads=HEADS, head_dim=DIM)
        self.rows = [[] for _ in range(BATCH)]
        self.next_tag = 1.0

    def tagged(self, count):
        tags = torch.arange(self.next_tag, self.next_tag + BATCH * count).view(BATCH, count)
        self.next_tag += BATCH * count
        return tags, tags[..., None, None].expand(BATCH, count, HEADS, DIM).contiguous()

    @rule(count=st.integers(1, 5), keep=st.lists(st.integers(0, 5), min_size=BATCH, max_size=BATCH))
    def write_then_commit(self, count, keep):
        """A step writes ``count`` rows past each length; then a prefix of them is committed."""
        keep = [min(c, count) for c in keep]
        room = all(len(r) + count <= MAX_LEN for r in self.rows)
        if not room:
            before = [t.clone() for t in self.cache.k], self.cache.seqlens.clone()
            with pytest.raises(ValueError, match="overflow"):
                self.cache.check_room(count)
            with pytest.raises(ValueError, match="overflow"):  # the ops refuse before writing too
                self.append(count, check=True)
            assert all(torch.equal(a, b) for a, b in zip(before[0], self.cache.k))
            assert torch.equal(before[1], self.cache.seqlens)
            return
        self.cache.check_room(count)
        tags = self.append(count, check=False)
        self.cache.commit(torch.tensor(keep))
        for b in range(BATCH):
            self.rows[b].extend(tags[b, :keep[b]].tolist())

    @rule(draft_len=st.integers(1, 3), accept=st.lists(st.integers(1, 3), min_size=BATCH, max_size=BATCH))
    def decode_step(self, draft_len, accept):
        """A TiDAR step writes only the k drafts' rows (never mask rows); a prefix is committed."""
        if not all(len(r) + draft_len <= MAX_LEN for r in self.rows):
            return
        rows = draft_len + draft_len * draft_len
        tags, values = self.tagged(rows)
        for layer in range(2):
            decode_attention(values, values, -values, self.cache.k[layer], self.cache.v[layer], self.cache.seqlens,
                             draft_len, check_lengths=False)
        accept = [min(a, draft_len) for a in accept]
        self.cache.commit(torch.tensor(accept))
        for b in range(BATCH):
            self.rows[b].extend(tags[b, :accept[b]].tolist())

    @rule(lengths=st.lists(st.integers(0, 4), min_size=BATCH, max_size=BATCH))
    def rollback(self, lengths):
        """Setting shorter lengths drops rows (a rollback) without touching the rows kept."""
        lengths = [min(n, len(r)) for n, r in zip(lengths, self.rows)]
        self.cache.reset(lengths)
        self.rows = [r[:n] for r, n in zip(self.rows, lengths)]

    def append(self, count, check):
        tags, values = self.tagged(count)
        for layer in range(2):
            append_attention(values, values, -values, self.cache.k[layer], self.cache.v[layer], self.cache.seqlens,
                             check_lengths=check)
        return tags

    @invariant()
    def committed_rows_match(self):
        assert self.cache.seqlens.tolist() == [len(r) for r in self.rows]
        for b, rows in enumerate(self.rows):
            for layer in range(2):
                k = self.cache.k[layer][b, :len(rows)]
                v = self.cache.v[layer][b, :len(rows)]
                expected = torch.tensor(rows, dtype=k.dtype)[:, None, None].expand_as(k)
                assert torch.equal(k, expected) and torch.equal(v, -expected)


CacheMachine.TestCase.settings = settings(max_examples=40, stateful_step_count=12, deadline=None, derandomize=True)
TestKVCacheStateMachine = CacheMachine.TestCase


def test_cache_shapes_and_dtype():
    cache = KVCache(n_layers=3, batch=2, max_len=7, n_kv_heads=2, head_dim=8, dtype=torch.float64)
    assert len(cache.k) == len(cache.v) == 3
    assert cache.k[0].shape == (2, 7, 2, 8) and cache.k[0].dtype == torch.float64
    assert cache.seqlens.dtype == torch.int32 and cache.seqlens.tolist() == [0, 0]
    assert (cache.batch, cache.max_len) == (2, 7)


@pytest.mark.parametrize("name", ["n_layers", "batch", "max_len", "n_kv_heads", "head_dim"])
def test_bad_sizes(name):
    sizes = dict(n_layers=1, batch=1, max_len=4, n_kv_heads=1, head_dim=2) | {name: 0}
    with pytest.raises(ValueError, match=name):
        KVCache(**sizes)


def test_commit_and_reset_check_their_input():
    cache = KVCache(n_layers=1, batch=2, max_len=6, n_kv_heads=1, head_dim=2)
    cache.reset([2, 6])
    for bad in (torch.tensor([1]), torch.tensor([1.0, 2.0]), [1, 2]):
        with pytest.raises(ValueError, match="counts must be an integer tensor"):
            cache.commit(bad)
    for bad, match in (([1], "lengths must be integers"), ([0, 7], "lengths must lie in"), ([-1, 0], "must lie in")):
        with pytest.raises(ValueError, match=match):
            cache.reset(bad)
    assert cache.seqlens.tolist() == [2, 6]  # nothing changed by the refused calls
    cache.reset(torch.tensor([3, 1], dtype=torch.int32))
    cache.commit(torch.tensor([1, 2]))
    assert cache.seqlens.tolist() == [4, 3]
