"""The reference transformer: parity with transformers' Llama / Qwen2 / Qwen3, TiDAR layouts, bad input."""
import pytest
import torch
from helpers.models import tiny

from tidar_kernels.model.checkpoints import load_hf
from tidar_kernels.model.transformer import CONFIGS, TransformerConfig

transformers = pytest.importorskip("transformers")

HF_COMMON = dict(vocab_size=101, hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=6,
                 num_key_value_heads=2, rope_theta=5000.0, rms_norm_eps=1e-5, max_position_embeddings=256)
HF_MODELS = {
    "llama": (transformers.LlamaForCausalLM, transformers.LlamaConfig, {}),
    "qwen2": (transformers.Qwen2ForCausalLM, transformers.Qwen2Config, {}),
    "qwen3": (transformers.Qwen3ForCausalLM, transformers.Qwen3Config, dict(head_dim=16)),
}


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("arch", sorted(HF_MODELS))
def test_causal_logits_match_transformers(arch, tie, tmp_path):
    model_cls, config_cls, extra = HF_MODELS[arch]
    torch.manual_seed(0)
    hf = model_cls(config_cls(**HF_COMMON, **extra, tie_word_embeddings=tie)).eval()
    with torch.no_grad():  # random norms and biases too, so a missed or misnamed weight shows
        for param in hf.parameters():
            param.normal_(0, 0.2)
    hf.save_pretrained(tmp_path)
    ours = load_hf(tmp_path)
    assert ours.config.qkv_bias == (arch == "qwen2") and ours.config.qk_norm == (arch == "qwen3")
    ids = torch.randint(0, HF_COMMON["vocab_size"], (2, 13))
    with torch.no_grad():
        expected = hf(ids).logits
        got = ours.forward_causal(ids)
    assert got.shape == (2, 13, HF_COMMON["vocab_size"] + 1)  # + the added mask token
    torch.testing.assert_close(got[..., :-1], expected, rtol=1e-5, atol=1e-5)


def training_ids(clean):
    return torch.cat([clean, torch.full_like(clean, 96)], dim=1)


def test_training_clean_half_is_causal():
    """Clean rows never see mask rows: their logits are the causal logits of the clean tokens."""
    model = tiny(qk_norm=True)
    clean = torch.randint(0, 96, (2, 12))
    with torch.no_grad():
        logits = model.forward_training(training_ids(clean), block_size=4)
        torch.testing.assert_close(logits[:, :12], model.forward_causal(clean), rtol=1e-5, atol=1e-5)


def test_training_mask_block_sees_only_its_context():
    """Mask block J depends on clean tokens before J*B only; changing a later clean token leaves it."""
    model = tiny()
    clean = torch.randint(0, 96, (1, 12))
    changed = clean.clone()
    changed[0, 5] = (changed[0, 5] + 1) % 96  # clean token 5 lies in block 1's span (4..7)
    with torch.no_grad():
        a = model.forward_training(training_ids(clean), block_size=4)
        b = model.forward_training(training_ids(changed), block_size=4)
    torch.testing.assert_close(a[:, 12:20], b[:, 12:20])  # blocks 0 and 1: context ends at 0 and 4
    assert not torch.allclose(a[:, 20:], b[:, 20:])  # block 2 sees clean tokens 0..7
    changed_before = clean.clone()
    changed_before[0, 3] = (changed_before[0, 3] + 1) % 96
    with torch.no_grad():
        c = model.forward_training(training_ids(changed_before), block_size=4)
    torch.testing.assert_close(a[:, 12:16], c[:, 12:16])  # ... block 0 sees none
    assert not torch.allclose(a[:, 16:20], c[:, 16:20])


def test_training_is_differentiable():
    model = tiny()
    model.train()
    logits = model.forward_training(training_ids(torch.randint(0, 96, (2, 8))), block_size=4)
    logits.logsumexp(-1).mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_lm_head_rows_equal_full_logits():
    model = tiny(tie_embeddings=True)
    ids = torch.randint(0, 96, (2, 9))
    positions = torch.arange(9).expand(2, 9)
    with torch.no_grad():
        hidden = model(ids, positions)
        torch.testing.assert_close(model.lm_head(hidden[:, [2, 5]]), model.forward_causal(ids)[:, [2, 5]])


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_named_configs(name):
    config = TransformerConfig.from_name(name)
    assert config.mask_token_id is not None and config.mask_token_id < config.vocab_size
    assert TransformerConfig.from_dict(config.to_dict()) == config


def test_bad_input():
    model = tiny()
    with pytest.raises(ValueError, match="input_ids must be an int64"):
        model.forward_causal(torch.zeros(1, 4, dtype=torch.int32))
    with pytest.raises(ValueError, match="input_ids must be an int64"):
        model.forward_causal(torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="at least one token"):
        model.forward_causal(torch.zeros(1, 0, dtype=torch.long))
    with pytest.raises(ValueError, match="2\\*S"):
        model.forward_training(torch.zeros(1, 7, dtype=torch.long), block_size=1)
    with pytest.raises(ValueError, match="multiple of block_size"):
        model.forward_training(torch.zeros(1, 12, dtype=torch.long), block_size=4)
    with pytest.raises(ValueError, match="position_ids"):
        model(torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="name must be one of"):
        TransformerConfig.from_name("gpt-5")
    with pytest.raises(ValueError, match="n_kv_heads"):
        TransformerConfig.from_name("tiny", n_kv_heads=3)
    with pytest.raises(ValueError, match="mask_token_id"):
        TransformerConfig.from_name("tiny", mask_token_id=97)
    for name in ("rope_theta", "norm_eps"):
        with pytest.raises(ValueError, match=f"{name} must be > 0"):
            TransformerConfig.from_name("tiny", **{name: 0.0})


def test_attention_context_errors():
    from tidar_kernels.model.kv_cache import KVCache
    from tidar_kernels.kernels.mask import Layout
    from tidar_kernels.model.transformer import AttentionContext

    cache = KVCache(n_layers=1, batch=1, max_len=8, n_kv_heads=2, head_dim=16)
    with pytest.raises(ValueError, match="cache must be a KVCache"):
        AttentionContext(Layout.DECODE, 2)
    with pytest.raises(ValueError, match="cache must be None"):
        AttentionContext(Layout.TRAINING, 2, cache)
    with pytest.raises(ValueError, match="prompt_lens"):
        AttentionContext(Layout.PREFILL, 2, cache)
