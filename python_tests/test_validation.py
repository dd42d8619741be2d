"""Bad input to every public op raises ValueError naming the argument, before anything is written."""
import pytest
import torch

import tidar_kernels as tk

K = 2  # draft length of the decode cases
ROWS = K + K * K


def decode_args(**override):
    args = dict(q=torch.randn(2, ROWS, 4, 8), k_new=torch.randn(2, ROWS, 2, 8), v_new=torch.randn(2, ROWS, 2, 8),
                k_cache=torch.randn(2, 10, 2, 8), v_cache=torch.randn(2, 10, 2, 8),
                cache_seqlens=torch.tensor([0, 3], dtype=torch.int32), draft_len=K)
    args.update(override)
    return args


DECODE_CASES = {
    "q-rank": (dict(q=torch.randn(2, ROWS, 32)), "q must be a 4-d"),
    "q-int": (dict(q=torch.zeros(2, ROWS, 4, 8, dtype=torch.int32)), "q must be float16"),
    "k-dtype": (dict(k_new=torch.randn(2, ROWS, 2, 8, dtype=torch.float64)), "k_new must have q's dtype"),
    "heads-not-divisible": (dict(k_new=torch.randn(2, ROWS, 3, 8), v_new=torch.randn(2, ROWS, 3, 8),
                                 k_cache=torch.randn(2, 10, 3, 8), v_cache=torch.randn(2, 10, 3, 8)),
                            "multiple of k_new heads"),
    "v-shape": (dict(v_new=torch.randn(2, ROWS, 2, 4)), "v_new must have k_new's shape"),
    "rows": (dict(q=torch.randn(2, ROWS + 1, 4, 8), k_new=torch.randn(2, ROWS + 1, 2, 8),
                  v_new=torch.randn(2, ROWS + 1, 2, 8)), "k \\+ k\\*k"),
    "draft-len-0": (dict(draft_len=0), "draft_len must be an integer >= 1"),
    "cache-shape": (dict(k_cache=torch.randn(2, 10, 1, 8)), "k_cache must be"),
    "cache-dtype": (dict(v_cache=torch.randn(2, 10, 2, 8, dtype=torch.float16)), "v_cache must have q's dtype"),
    "seqlens-int64": (dict(cache_seqlens=torch.tensor([0, 3])), "cache_seqlens must be an int32"),
    "seqlens-shape": (dict(cache_seqlens=torch.tensor([0], dtype=torch.int32)), "cache_seqlens must have shape"),
    "overflow": (dict(cache_seqlens=torch.tensor([0, 9], dtype=torch.int32)), "cache overflow"),
    "negative": (dict(cache_seqlens=torch.tensor([-1, 0], dtype=torch.int32)), "cache_seqlens must be >= 0"),
}


@pytest.mark.parametrize("case", list(DECODE_CASES), ids=list(DECODE_CASES))
def test_decode_attention_rejects_bad_input_and_writes_nothing(case):
    override, message = DECODE_CASES[case]
    args = decode_args(**override)
    before = {name: t.clone() for name, t in args.items() if isinstance(t, torch.Tensor)}
    with pytest.raises(ValueError, match=message):
        tk.decode_attention(**args)
    for name, tensor in before.items():
        assert torch.equal(args[name], tensor), f"{name} was modified"


def test_training_attention_rejects_bad_layouts():
    q = torch.randn(1, 10, 2, 8)
    with pytest.raises(ValueError, match="multiple of block_size"):
        tk.training_attention(q, q, q, block_size=2)  # S = 5
    with pytest.raises(ValueError, match="odd length"):
        tk.training_attention(q[:, :9], q[:, :9], q[:, :9], block_size=1)
    with pytest.raises(ValueError, match="block_size must be an integer >= 1"):
        tk.training_attention(q, q, q, block_size=0)
    with pytest.raises(ValueError, match="softmax_scale must be > 0"):
        tk.training_attention(q, q, q, block_size=5, softmax_scale=-1.0)
    with pytest.raises(ValueError, match="k must have q's batch and seq"):
        tk.causal_attention(q, q[:, :4], q[:, :4])


def test_prefill_attention_rejects_bad_prompt_lens():
    args = decode_args(q=torch.randn(2, 5, 4, 8), k_new=torch.randn(2, 5, 2, 8), v_new=torch.randn(2, 5, 2, 8))
    del args["draft_len"]
    before = args["k_cache"].clone()
    with pytest.raises(ValueError, match="prompt_lens must lie in"):
        tk.prefill_attention(**args, prompt_lens=torch.tensor([0, 3], dtype=torch.int32), draft_len=2)
    with pytest.raises(ValueError, match="prompt_lens must be an int32"):
        tk.prefill_attention(**args, prompt_lens=[3, 3], draft_len=2)
    with pytest.raises(ValueError, match="padded prompt length"):
        tk.prefill_attention(**args, prompt_lens=torch.tensor([1, 1], dtype=torch.int32), draft_len=5)
    assert torch.equal(args["k_cache"], before)


def test_accept_drafts_rejects_bad_input_and_keeps_lengths():
    seqlens = torch.tensor([1, 2], dtype=torch.int32)
    drafts, logits = torch.zeros(2, 3, dtype=torch.long), torch.randn(2, 3, 7)
    cases = [
        (dict(drafts=drafts.int()), "drafts must be int64"),
        (dict(draft_logits=logits[:, :2]), "draft_logits must be"),
        (dict(block_logits=torch.randn(2, 3, 6)), "block_logits must have draft_logits' shape"),
        (dict(beta=1.5), "beta must lie in"),
        (dict(active=torch.ones(2)), "active must be bool"),
        (dict(cache_seqlens=seqlens.long()), "cache_seqlens must be an int32"),
    ]
    for override, message in cases:
        args = dict(drafts=drafts, draft_logits=logits, block_logits=logits.clone(), cache_seqlens=seqlens)
        args.update(override)
        with pytest.raises(ValueError, match=message):
            tk.accept_drafts(**args)
    assert seqlens.tolist() == [1, 2]
