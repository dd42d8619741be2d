"""The one mask definition: the matrices of docs/semantics.md, hand-checked cases, and the
compact rule (key_ranges, classify_tile, position ids) against the token rule."""
import pytest
import torch
from helpers import mask_cases
from hypothesis import given, settings
from hypothesis import strategies as st

import tidar_kernels as tk
from tidar_kernels.kernels import mask as M
from tidar_kernels.kernels.mask import Layout, TileKind


def rows(text: str) -> torch.Tensor:
    return torch.tensor([[c == "1" for c in line.replace("|", "")] for line in text.split()], dtype=torch.bool)


def test_decode_mask_equals_tidar_md_example():
    # docs/semantics.md#decode-step, k = 3, cache A B C (n = 3); one row per query, blocks repeat their row.
    expected = rows("""
        111|100|000|000|000
        111|110|000|000|000
        111|111|000|000|000
        111|100|111|000|000 111|100|111|000|000 111|100|111|000|000
        111|110|000|111|000 111|110|000|111|000 111|110|000|111|000
        111|111|000|000|111 111|111|000|000|111 111|111|000|000|111""")
    assert torch.equal(tk.decode_mask(3, 3), expected)
    assert tk.decode_position_ids(3, 3).tolist() == [3, 4, 5, 4, 5, 6, 5, 6, 7, 6, 7, 8]


def test_training_mask_block_size_2_by_hand():
    # S = 4, B = 2: clean causal; mask block 0 sees no clean token; block 1 sees x_0, x_1.
    expected = rows("""
        1000|0000
        1100|0000
        1110|0000
        1111|0000
        0000|1100
        0000|1100
        1100|0011
        1100|0011""")
    assert torch.equal(tk.training_mask(4, 2), expected)


def test_training_mask_block_size_1_sees_strict_prefix_and_itself():
    m = tk.training_mask(5, 1)
    for i in range(5):
        assert m[5 + i, :5].tolist() == [j < i for j in range(5)]
        assert m[5 + i, 5:].tolist() == [j == i for j in range(5)]


@pytest.mark.parametrize("seq_len", [1, 7, 9], ids=lambda s: f"S{s}")
def test_training_mask_block_size_equal_to_odd_seq_len_is_one_block_with_no_context(seq_len):
    m = tk.training_mask(seq_len, seq_len)
    assert not m[seq_len:, :seq_len].any()  # block 0 sees no clean token
    assert m[seq_len:, seq_len:].all()  # bidirectional inside the block
    assert torch.equal(m[:seq_len, :seq_len], torch.ones(seq_len, seq_len, dtype=torch.bool).tril())
    assert not m[:seq_len, seq_len:].any()  # clean rows never see mask keys


def test_prefill_mask_and_position_ids():
    m = tk.prefill_mask(3, 2)
    assert m[3:, :3].all() and m[3:, 3:].all()
    assert not m[:3, 3:].any()
    toks = M.prefill_tokens(3, 2)
    assert toks.pos.tolist() == [0, 1, 2, 3, 4]


def test_training_position_ids():
    assert tk.training_position_ids(3).tolist() == [0, 1, 2, 0, 1, 2]


@pytest.mark.parametrize("call", [
    lambda: tk.training_mask(0, 1), lambda: tk.training_mask(5, 2), lambda: tk.decode_mask(-1, 2),
    lambda: tk.decode_mask(3, 0), lambda: tk.decode_position_ids(0, 0), lambda: tk.prefill_mask(0, 2),
], ids=["S0", "S-not-multiple", "negative-prefix", "k0", "pos-k0", "empty-prompt"])
def test_bad_mask_arguments_raise_value_error(call):
    with pytest.raises(ValueError):
        call()


# --- compact rule == token rule --------------------------------------------------------------


def layout_cases():
    return st.one_of(
        st.builds(lambda s, b: (Layout.TRAINING, 2 * s * b, s * b, b, 0), st.integers(1, 6), st.integers(1, 5)),
        st.builds(lambda k: (Layout.DECODE, k + k * k, k, k, 0), st.integers(1, 7)),
        st.builds(lambda p, extra, k: (Layout.PREFILL, p + extra + k, p + extra, k, p),
                  st.integers(1, 9), st.integers(0, 4), st.integers(1, 6)),
        st.builds(lambda t: (Layout.CAUSAL, t, t, 1, 0), st.integers(1, 20)),
    )


def token_rule_mask(layout, num_rows, clean_rows, block, context):
    """Dense local mask straight from the token rule, docs/semantics.md#attention-rule (padded prefill rows: causal)."""
    if layout == Layout.TRAINING:
        toks = M.training_tokens(clean_rows, block)
    elif layout == Layout.DECODE:
        toks = M.decode_tokens(0, block)
    elif layout == Layout.PREFILL:
        toks = M.clean_tokens(0, clean_rows).cat(M.mask_block_tokens(context, block, 0, context))
    else:
        toks = M.clean_tokens(0, num_rows)
    return M.may_attend(toks, toks)


@settings(max_examples=150, deadline=None)
@given(layout_cases())
def test_key_ranges_equal_token_rule(case):
    assert torch.equal(M.local_mask(*case), token_rule_mask(*case))


@settings(max_examples=100, deadline=None)
@given(layout_cases(), st.integers(1, 5), st.integers(1, 5), st.data())
def test_classify_tile_matches_dense_mask(case, tile_rows, tile_cols, data):
    layout, num_rows, clean_rows, block, context = case
    dense = M.local_mask(*case)
    r0 = data.draw(st.integers(0, num_rows - 1))
    c0 = data.draw(st.integers(0, num_rows - 1))
    r1, c1 = min(r0 + tile_rows, num_rows), min(c0 + tile_cols, num_rows)
    tile = dense[r0:r1, c0:c1]
    expected = TileKind.EMPTY if not tile.any() else TileKind.FULL if tile.all() else TileKind.PARTIAL
    assert M.classify_tile(layout, r0, r1, c0, c1, clean_rows, block, context) == expected


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 50), st.integers(1, 6))
def test_decode_position_ids_follow_tokens_and_batch_form(prefix, k):
    pos = M.local_position_ids(Layout.DECODE, k + k * k, k, k, start=prefix)
    assert torch.equal(pos, tk.decode_position_ids(prefix, k))
    batched = M.local_position_ids(Layout.DECODE, k + k * k, k, k, start=torch.tensor([prefix, prefix + 3]))
    assert torch.equal(batched[1] - 3, pos)


def test_position_ids_live_on_the_device_of_the_lengths():
    """Batched positions follow ``start`` / ``context_len``'s device (a CPU tensor there breaks CUDA prefill)."""
    lens = torch.tensor([2, 4], dtype=torch.int32)
    pos = M.local_position_ids(Layout.PREFILL, 7, 4, 3, context_len=lens)
    assert pos.tolist() == [[0, 1, 2, 3, 2, 3, 4], [0, 1, 2, 3, 4, 5, 6]]
    assert M.local_position_ids(Layout.PREFILL, 7, 4, 3, context_len=lens.to("meta")).device.type == "meta"
    assert M.local_position_ids(Layout.DECODE, 6, 2, 2, start=lens.to("meta")).device.type == "meta"


def test_prefill_and_training_position_ids_from_compact_form():
    pos = M.local_position_ids(Layout.PREFILL, 7, 5, 2, context_len=3)
    assert pos.tolist() == [0, 1, 2, 3, 4, 3, 4]  # padded prompt rows 3,4 then the block at L=3
    assert torch.equal(M.local_position_ids(Layout.TRAINING, 8, 4, 2), tk.training_position_ids(4))


def test_committed_cpp_cases_are_current():
    """csrc/tests/mask_cases.txt (read by CTest) must be what mask.py produces today."""
    assert mask_cases.CASES_FILE.read_text() == mask_cases.render(), \
        "run `python python_tests/helpers/mask_cases.py` to regenerate the C++ cases"


def _can_run_triton():
    import os
    return torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"


@pytest.mark.skipif(not _can_run_triton(), reason="needs CUDA or TRITON_INTERPRET=1")
@pytest.mark.parametrize("case", [
    (Layout.TRAINING, 12, 6, 3, 0), (Layout.DECODE, 20, 4, 4, 0), (Layout.PREFILL, 9, 6, 3, 4),
    (Layout.CAUSAL, 7, 7, 1, 0)], ids=["training", "decode", "prefill", "causal"])
def test_triton_key_ranges_equal_python(case):
    """The Triton twin of key_ranges, run element-wise over every row, equals the Python rule."""
    import triton
    import triton.language as tl

    @triton.jit
    def ranges_kernel(out_ptr, num_rows, clean_rows, block_size, context_len,
                      LAYOUT: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.arange(0, BLOCK)
        clean_end, block_start, block_end = M.key_ranges_tl(LAYOUT, row, clean_rows, block_size, context_len)
        keep = row < num_rows
        tl.store(out_ptr + row * 3, clean_end, mask=keep)
        tl.store(out_ptr + row * 3 + 1, block_start, mask=keep)
        tl.store(out_ptr + row * 3 + 2, block_end, mask=keep)

    layout, num_rows, clean_rows, block, context = case
    device = "cuda" if torch.cuda.is_available() else "cpu"
    out = torch.zeros(num_rows, 3, dtype=torch.int32, device=device)
    ranges_kernel[(1,)](out, num_rows, clean_rows, block, context, LAYOUT=int(layout), BLOCK=32)
    rows_ = torch.arange(num_rows)
    expected = torch.stack(M.key_ranges(layout, rows_, clean_rows, block, context), dim=1)
    assert torch.equal(out.cpu().long(), expected)


def test_layout_clean_rows_and_rows_written():
    assert M.layout_clean_rows(Layout.TRAINING, 12, 3) == 6
    assert M.layout_clean_rows(Layout.DECODE, 12, 3) == 3
    assert M.layout_clean_rows(Layout.PREFILL, 9, 3) == 6
    assert M.layout_clean_rows(Layout.CAUSAL, 5, 1) == 5
    assert M.rows_written_to_cache(Layout.DECODE, 12, 3) == 3  # the drafts, never the mask blocks
    assert M.rows_written_to_cache(Layout.PREFILL, 9, 3) == 6  # the (padded) prompt
    assert M.rows_written_to_cache(Layout.CAUSAL, 5, 1) == 5
