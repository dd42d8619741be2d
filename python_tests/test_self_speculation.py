"""Self-speculation: quadratic (tidar_generate at k = block length, spec LoRA on mask rows) and linear
(linear_spec_generate: read-only draft block, causal verify), both equal to greedy AR.

A huge random LoRA (scale 1e3) changes the drafts but, being off wherever the verifier looks,
not a single token. The 6-token models of test_generate.py accept several drafts per step,
so every branch of acceptance and commit runs; the read-only draft is checked bitwise on a
cache whose unused rows hold NaN.
"""
import pytest
import torch
from helpers.decode_plan_cases import cuda_decode_plan
from helpers.lora import random_lora
from helpers.models import tiny_with_vocab

from tidar_kernels.kernels import ops
from tidar_kernels.kernels.backends import load
from tidar_kernels.kernels.mask import Layout
from tidar_kernels.kernels.backends.triton_ops import plan_cached
from tidar_kernels.kernels import roofline
from tidar_kernels.model import adapters
from tidar_kernels.model.generate import ar_generate, linear_spec_generate, pad_prompts, tidar_generate
from tidar_kernels.model.kv_cache import KVCache, PagedKVCache
from tidar_kernels.model.transformer import AttentionContext

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = [[1, 2, 3, 4, 0], [3, 2], [0, 1, 2, 3, 4, 0, 1]]
PAGED = [pytest.param(None, id="contiguous"), pytest.param(3, id="paged3")]


def with_lora(model):
    adapters.attach_lora(model, random_lora(model, targets=("q_proj", "v_proj", "o_proj", "up_proj")))
    return model


@pytest.fixture(scope="module")
def case():
    """A 6-token model (seed 2 accepts long drafts), its ragged batch and the AR reference."""
    model = tiny_with_vocab(2)
    ids, lens = pad_prompts(PROMPTS)
    return model, ids, lens, ar_generate(model, ids, 17, prompt_lens=lens).sequences()


@pytest.mark.parametrize("page_size", PAGED)
def test_linear_equals_ar_every_block_len(case, page_size):
    model, ids, lens, ar = case
    long_steps = 0
    for block_len in list(range(1, 9)) + [32]:
        result = linear_spec_generate(model, ids, 17, block_len, prompt_lens=lens, page_size=page_size)
        assert result.sequences() == ar, block_len
        assert result.acceptance_histogram[0] == 0
        long_steps += sum(result.acceptance_histogram[3:])
        assert (result.forwards - 1) % (2 if block_len > 1 else 1) == 0  # two forwards a step
    assert long_steps > 0  # acceptance beyond 2 was exercised


@pytest.mark.parametrize("page_size", PAGED)
def test_huge_lora_changes_drafts_not_tokens(case, page_size):
    model, ids, lens, ar = case
    plain = {k: linear_spec_generate(model, ids, 17, k, prompt_lens=lens).acceptance_histogram for k in (4, 8)}
    quad_plain = {k: tidar_generate(model, ids, 17, k, prompt_lens=lens).acceptance_histogram for k in (4, 8)}
    lora_model = with_lora(tiny_with_vocab(2))
    changed = 0
    for k in (1, 2, 3, 4, 5, 6, 7, 8):
        linear = linear_spec_generate(lora_model, ids, 17, k, prompt_lens=lens, page_size=page_size,
                                      spec_lora="draft")
        quadratic = tidar_generate(lora_model, ids, 17, k, prompt_lens=lens, page_size=page_size,
                                   spec_lora="mask_rows")
        assert linear.sequences() == ar and quadratic.sequences() == ar, k
        if k in plain:
            changed += (linear.acceptance_histogram != plain[k]) + (quadratic.acceptance_histogram != quad_plain[k])
    assert changed > 0  # the LoRA did change drafts


def test_block_len_32_wide_vocab_lora():
    model = with_lora(tiny_with_vocab(0, vocab_size=97))
    ids, lens = pad_prompts([[5, 17, 3], [90, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10], [42]])
    ar = ar_generate(model, ids, 5, prompt_lens=lens).sequences()
    for page_size in (None, 4):
        assert tidar_generate(model, ids, 5, 32, prompt_lens=lens, page_size=page_size,
                              spec_lora="mask_rows").sequences() == ar
        assert linear_spec_generate(model, ids, 5, 32, prompt_lens=lens, page_size=page_size,
                                    spec_lora="draft").sequences() == ar


def test_linear_left_padding_and_stop_tokens(case):
    model, ids, lens, _ = case
    left = torch.full_like(ids, 0)
    mask = torch.zeros_like(ids)
    for b, n in enumerate(lens.tolist()):
        left[b, ids.shape[1] - n:] = ids[b, :n]
        mask[b, ids.shape[1] - n:] = 1
    ar = ar_generate(model, left, 15, attention_mask=mask, eos_token_id=[3]).sequences()
    assert linear_spec_generate(model, left, 15, 5, attention_mask=mask, eos_token_id=[3]).sequences() == ar


@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
def test_draft_block_reads_cache_and_writes_nothing(paged):
    """The draft forward over a NaN-poisoned cache: every cache byte (NaN included) unchanged, finite output."""
    model = with_lora(tiny_with_vocab(1, vocab_size=97))
    batch, prompt_len, block = 2, 6, 5
    if paged:
        cache = PagedKVCache.for_model(model, batch, 16, page_size=4)
        cache.reserve([16, 16])
        for pool in cache.k + cache.v:
            pool.fill_(float("nan"))
    else:
        cache = KVCache.for_model(model, batch, 16)
        for rows in cache.k + cache.v:
            rows.fill_(float("nan"))
    prompt = torch.randint(0, 95, (batch, prompt_len), generator=torch.Generator().manual_seed(0))
    model(prompt, torch.arange(prompt_len).expand(batch, prompt_len), AttentionContext(Layout.CAUSAL, cache=cache))
    cache.reset([prompt_len, prompt_len - 2])  # sequence 1: two committed-looking rows become scratch
    before = [t.clone() for t in cache.k + cache.v]
    ids = torch.full((batch, block), model.config.mask_token_id)
    ids[:, 0] = 7
    positions = cache.seqlens.long()[:, None] + torch.arange(block)
    context = AttentionContext(Layout.PREFILL, block, cache, read_only=True, adapter_from=0)
    hidden = model(ids, positions, context)
    assert torch.isfinite(hidden).all()
    assert all(torch.equal(a.view(torch.int32), b.view(torch.int32)) for a, b in zip(cache.k + cache.v, before))
    assert cache.seqlens.tolist() == [prompt_len, prompt_len - 2]


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
@pytest.mark.parametrize("block", [1, 4, 32])
def test_block_attention_op(backend, block):
    """Bidirectional over the cache and the whole block, against a dense computation; no write."""
    if load(backend) is None or (backend == "triton" and not load(backend).supports(
            ops.backends.Call(ops.backends.CACHED_ATTENTION, torch.device("cpu"), torch.float32, 16, 2))):
        pytest.skip(f"{backend} is not available on the CPU here (the Triton interpreter needs TRITON_INTERPRET=1)")
    gen = torch.Generator().manual_seed(block)
    batch, heads, kv_heads, dim, max_len = 2, 2, 1, 16, 24
    q, k, v = (torch.randn(batch, block, h, dim, generator=gen) for h in (heads, kv_heads, kv_heads))
    k_cache, v_cache = (torch.randn(batch, max_len, kv_heads, dim, generator=gen) for _ in range(2))
    lengths = torch.tensor([0, 13], dtype=torch.int32)
    for b, n in enumerate(lengths.tolist()):
        k_cache[b, n:] = v_cache[b, n:] = float("nan")
    before = k_cache.clone(), v_cache.clone()
    out = ops.block_attention(q, k, v, k_cache, v_cache, lengths, backend=backend)
    for b, n in enumerate(lengths.tolist()):
        keys = torch.cat([k_cache[b, :n], k[b]]).repeat_interleave(heads // kv_heads, 1)
        values = torch.cat([v_cache[b, :n], v[b]]).repeat_interleave(heads // kv_heads, 1)
        probs = (torch.einsum("thd,khd->htk", q[b], keys) * dim ** -0.5).softmax(-1)
        torch.testing.assert_close(out[b], torch.einsum("htk,khd->thd", probs, values), rtol=1e-5, atol=1e-5)
    for cache, old in zip((k_cache, v_cache), before):
        assert torch.equal(cache.view(torch.int32), old.view(torch.int32))


def test_decode_step_k32_triton_matches_reference():
    """k = 32 (1,056 rows) through the Triton kernel (interpreter): tiny heads, a short cache."""
    call = ops.backends.Call(ops.backends.CACHED_ATTENTION, torch.device("cpu"), torch.float32, 16, 3)
    if load("triton") is None or not load("triton").supports(call):
        pytest.skip("the Triton interpreter needs TRITON_INTERPRET=1")
    k, rows, dim = 32, 32 + 32 * 32, 16
    gen = torch.Generator().manual_seed(0)
    q, k_new, v_new = (torch.randn(1, rows, 1, dim, generator=gen) for _ in range(3))
    caches = [torch.randn(1, 48, 1, dim, generator=gen) for _ in range(2)]
    lengths = torch.tensor([9], dtype=torch.int32)
    outs = []
    for backend in ("reference", "triton"):
        k_cache, v_cache = (c.clone() for c in caches)
        outs.append((ops.decode_attention(q, k_new, v_new, k_cache, v_cache, lengths, k, backend=backend),
                     k_cache, v_cache))
    torch.testing.assert_close(outs[1][0], outs[0][0], rtol=1e-5, atol=1e-5)
    assert torch.equal(outs[1][1], outs[0][1]) and torch.equal(outs[1][2], outs[0][2])


def test_planners_take_k32():
    """The Triton planner tiles 1,056 step rows (x 4 heads of a group); the CUDA planner's cases include k = 32."""
    plan = plan_cached(torch.bfloat16, 1, 32 + 32 * 32, 32, 8, 128, 4096, 32, roofline.H100)
    assert plan.block_m in (64, 128) and 1 <= plan.splits <= 32
    _, splits, _ = cuda_decode_plan(1, 32 + 32 * 32, 32, 32, 8, 128, 4096, roofline.H100)
    assert 1 <= splits <= 32


def test_bad_input_raises_before_any_forward(monkeypatch):
    model = tiny_with_vocab(0)
    ids, lens = pad_prompts(PROMPTS)

    def no_forward(*args, **kwargs):
        raise AssertionError("a forward ran before the argument check")

    monkeypatch.setattr(model, "forward", no_forward)
    cases = [
        (lambda: linear_spec_generate(model, ids, 4, 0, prompt_lens=lens), "block_len must be an integer >= 1"),
        (lambda: linear_spec_generate(model, ids, 4, 33, prompt_lens=lens), "block_len must be <= 32"),
        (lambda: linear_spec_generate(model, ids, 4, 4, prompt_lens=lens, temperature=0.7), "temperature must be 0"),
        (lambda: linear_spec_generate(model, ids, 4, 4, prompt_lens=lens, spec_lora="draft"), "needs adapters"),
        (lambda: tidar_generate(model, ids, 4, 4, prompt_lens=lens, spec_lora="mask_rows"), "needs adapters"),
        (lambda: tidar_generate(model, ids, 4, 4, prompt_lens=lens, spec_lora="draft"), "spec_lora must be None or"),
        (lambda: linear_spec_generate(model, ids, 4, 4, prompt_lens=lens, spec_lora="mask_rows"),
         "spec_lora must be None or 'draft'"),
    ]
    for run, match in cases:
        with pytest.raises(ValueError, match=match):
            run()
    with pytest.raises(ValueError, match="read_only"):
        AttentionContext(Layout.DECODE, 4, KVCache.for_model(model, 1, 8), read_only=True)


def test_cli_modes(tmp_path, capsys, monkeypatch):
    """``generate --mode linear|quadratic --block-len B --spec-lora DIR --ar``: same text as AR in both modes."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    from tidar_kernels.model import checkpoints
    from tidar_kernels.model.generate import main

    model = tiny_with_vocab(0, vocab_size=97)
    checkpoints.save_pretrained(model, tmp_path)
    vocab = {f"w{i}": i for i in range(95)} | {"<|endoftext|>": 95}
    tokenizer = Tokenizer(WordLevel(vocab, unk_token="w0"))
    tokenizer.pre_tokenizer = Whitespace()
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    # The checkpoint's spec LoRA is stood in for by a random one of the same shapes.
    monkeypatch.setattr(checkpoints, "load_spec_lora", lambda path, *placement: random_lora(model, targets=("o_proj",)))
    for mode, name in (("linear", "linear"), ("quadratic", "TiDAR")):
        main(["--model", str(tmp_path), "--prompt", "w1 w2 w3", "--max-new-tokens", "5", "--mode", mode,
              "--block-len", "4", "--spec-lora", str(tmp_path), "--ar"])
        out = capsys.readouterr().out
        spec_text, ar_text = (part.split("\n")[1] for part in out.split("---")[2::2])
        assert spec_text == ar_text and f"[{name}] 5 tokens" in out
    for bad in (["--block-len", "33"], ["--mode", "linear", "--temperature", "0.5"]):
        with pytest.raises(SystemExit):
            main(["--model", str(tmp_path), "--prompt", "w1", *bad])


def test_bench_decode_model_dir_smoke(tmp_path):
    """``bench/decode.py --smoke --model DIR --prompt TEXT --spec-lora DIR`` on a diffusion checkpoint in the
    released layout: AR, quadratic and linear rows."""
    from helpers.nemotron import nemotron_config, write_nemotron

    from bench import common, decode

    directory = write_nemotron(tmp_path / "ckpt", nemotron_config())
    threads = torch.get_num_threads()
    try:
        decode.main(["--smoke", "--out", str(tmp_path / "out"), "--model", str(directory),
                     "--prompt", "w1 w2 w3", "--spec-lora", str(directory / "linear_spec_lora")])
    finally:
        torch.set_num_threads(threads)
    _, rows = common.read_csv(tmp_path / "out" / common.SMOKE_DEVICE / "decode_self_spec.csv")
    assert {(r["method"], r["block_len"], r["batch"]) for r in rows} == {
        (m, b, batch) for batch in ("1", "2") for m, b in [("ar", ""), ("quadratic", "2"), ("quadratic", "4"),
                                                             ("linear", "2"), ("linear", "4")]}
    assert all(r["spec_lora"] == str(r["method"] != "ar") and float(r["tokens_per_s"]) > 0 for r in rows)
