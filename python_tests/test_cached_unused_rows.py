"""Every backend's cached ops read cache rows ``[0, n_b)`` only.

Rows at or past ``n_b`` hold NaN, +Inf or -Inf (uninitialised memory, a reused
buffer); a backend that reads them, even under a mask (``0 * NaN``, ``-inf + inf``),
returns NaN or garbage and fails the tolerance rule. Every backend that takes a CPU
cached call is checked (the reference; Triton under ``TRITON_INTERPRET=1``), on all
three cached ops.
"""
import pytest
import torch
from helpers.cached_cases import POISONS, check_cached_call, cpu_cached_backends

from tidar_kernels.kernels.mask import Layout

pytestmark = pytest.mark.usefixtures("one_thread")

OPS = {
    # (layout, cache lengths, (q_heads, kv_heads), draft_len, padded rows, prompt lengths)
    "decode-k3": (Layout.DECODE, (0, 5, 37), (4, 2), 3, 1, None),
    "prefill-P9-k2": (Layout.PREFILL, (0, 7, 20), (6, 2), 2, 9, (9, 1, 4)),
    "append-T1": (Layout.CAUSAL, (1, 0, 33), (2, 2), 1, 1, None),
    "append-T5": (Layout.CAUSAL, (12, 3), (4, 1), 1, 5, None),
}


@pytest.mark.parametrize("poison", list(POISONS))
@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("backend", cpu_cached_backends(paged=False))
def test_rows_past_n_are_never_read(backend, op, poison):
    layout, lens, heads, draft_len, padded, prompts = OPS[op]
    check_cached_call(backend, layout, lens, heads, draft_len=draft_len, padded=padded, prompt_lens=prompts,
                      poison=poison)


def test_reference_reads_only_up_to_the_longest_sequence(monkeypatch):
    """On the CPU the reference gathers rows ``[0, max n_b)``, not the whole capacity: its cost is O(n)."""
    from tidar_kernels.kernels.backends import reference
    spans = []
    real = reference.gather_cache
    monkeypatch.setattr(reference, "gather_cache",
                        lambda cache, lengths, table, span: spans.append(span) or real(cache, lengths, table, span))
    check_cached_call("reference", Layout.DECODE, (3, 11), (2, 1), draft_len=2)
    assert spans and set(spans) == {11}


def test_reference_on_fp16_with_inf_rows():
    check_cached_call("reference", Layout.DECODE, (4, 0), (2, 1), dtype=torch.float16, draft_len=2, poison="inf")
