"""Mask-gated LoRA adapters: off is bitwise the base model, on a row suffix touches only that suffix.

Clean rows never attend to mask rows in any TiDAR layout, so an adapter on the mask rows
leaves the clean rows' logits (and the K/V they write to the cache) bitwise equal too.
"""
import pytest
import torch
from helpers.lora import ALL_TARGETS, random_lora
from helpers.models import tiny

from tidar_kernels.kernels.mask import Layout, local_position_ids
from tidar_kernels.model import adapters
from tidar_kernels.model.kv_cache import KVCache
from tidar_kernels.model.transformer import AttentionContext

pytestmark = pytest.mark.usefixtures("one_thread")


def training_ids(model, seq_len=8):
    gen = torch.Generator().manual_seed(3)
    clean = torch.randint(0, 96, (2, seq_len), generator=gen)
    return torch.cat([clean, torch.full_like(clean, model.config.mask_token_id)], dim=1)


def training_logits(model, ids, block_size, adapter_from):
    seq_len = ids.shape[1] // 2
    positions = torch.arange(seq_len).repeat(2).expand(ids.shape)
    context = AttentionContext(Layout.TRAINING, block_size, adapter_from=adapter_from)
    return model.lm_head(model(ids, positions, context))


def test_attached_but_off_is_bitwise_the_base_model():
    model = tiny()
    ids = training_ids(model)
    base_training = model.forward_training(ids, 4)
    base_causal = model.forward_causal(ids)
    attached = adapters.attach_lora(model, random_lora(model))
    assert len(attached) == len(ALL_TARGETS) * 2
    assert torch.equal(model.forward_training(ids, 4), base_training)  # default context: off
    assert torch.equal(model.forward_causal(ids), base_causal)
    assert torch.equal(training_logits(model, ids, 4, None), base_training)
    # Switched on past the last row: no row is on.
    assert torch.equal(training_logits(model, ids, 4, ids.shape[1]), base_training)
    adapters.detach_lora(model)
    assert not adapters.adapters_of(model) and torch.equal(model.forward_training(ids, 4), base_training)


def test_training_layout_mask_suffix_leaves_clean_rows_bitwise():
    model = tiny()
    ids = training_ids(model)
    base = model.forward_training(ids, 4)
    adapters.attach_lora(model, random_lora(model))
    seq_len = ids.shape[1] // 2
    gated = training_logits(model, ids, 4, seq_len)
    assert torch.equal(gated[:, :seq_len], base[:, :seq_len])
    assert (gated[:, seq_len:] - base[:, seq_len:]).abs().amax(-1).min() > 0  # every mask row changed


def test_whole_forward_equals_merged_weights():
    model = tiny()
    ids = training_ids(model)[:, :8]
    lora = random_lora(model, targets=("q_proj", "o_proj", "down_proj"), scale=0.5, layers=[1])
    merged = tiny()
    with torch.no_grad():
        for name, layers in lora.weights.items():
            for layer, (a, b) in layers.items():
                adapters.projection(merged, layer, name).weight += lora.scale * b @ a
    adapters.attach_lora(model, lora)
    positions = torch.arange(8).expand(ids.shape)
    out = model(ids, positions, AttentionContext(Layout.CAUSAL, adapter_from=0))
    torch.testing.assert_close(out, merged(ids, positions), rtol=1e-4, atol=1e-4)


def test_decode_step_mask_rows_leave_clean_rows_and_cache_bitwise():
    model = tiny()
    k, prefix = 3, 5
    gen = torch.Generator().manual_seed(4)
    prompt = torch.randint(0, 96, (2, prefix), generator=gen)
    drafts = torch.randint(0, 96, (2, k), generator=gen)
    ids = torch.cat([drafts, torch.full((2, k * k), model.config.mask_token_id)], dim=1)

    def step(adapter_from):
        cache = KVCache.for_model(model, 2, prefix + k)
        model(prompt, torch.arange(prefix).expand(2, prefix), AttentionContext(Layout.CAUSAL, cache=cache))
        cache.reset([prefix, prefix])
        positions = local_position_ids(Layout.DECODE, k + k * k, k, k, start=cache.seqlens)
        hidden = model(ids, positions, AttentionContext(Layout.DECODE, k, cache, adapter_from=adapter_from))
        return model.lm_head(hidden), cache

    base, base_cache = step(None)
    adapters.attach_lora(model, random_lora(model))
    gated, cache = step(k)
    assert torch.equal(gated[:, :k], base[:, :k])
    assert all(torch.equal(a, b) for a, b in zip(cache.k + cache.v, base_cache.k + base_cache.v))
    assert (gated[:, k:] - base[:, k:]).abs().amax(-1).min() > 0


def test_trainable_adapters_with_frozen_base():
    model = tiny()
    adapters.attach_lora(model, random_lora(model, targets=("v_proj", "gate_proj"), scale=0.1))
    adapters.freeze_base(model)
    params = adapters.lora_parameters(model)
    assert len(params) == 2 * 2 * 2 and all(isinstance(p, torch.nn.Parameter) and p.requires_grad for p in params)
    assert not any(p.requires_grad for p in model.parameters() if all(p is not q for q in params))
    ids = training_ids(model)
    logits = training_logits(model, ids, 4, ids.shape[1] // 2)
    logits[:, ids.shape[1] // 2:].float().logsumexp(-1).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)


@pytest.mark.parametrize("change, match", [
    (lambda lora: lora.weights.update(w_proj=lora.weights.pop("attention.wo")), "'w_proj' does not exist"),
    (lambda lora: setattr(lora, "rank", 5), "rank 5"),
    (lambda lora: lora.weights["attention.wo"].update({2: lora.weights["attention.wo"][0]}),
     r"layer must be .* \[0, 2\)"),
    (lambda lora: setattr(lora, "rank", 0), "rank must be an integer >= 1"),
    (lambda lora: lora.weights.clear(), "at least one projection"),
    (lambda lora: setattr(lora, "alpha", float("nan")), "scale must be finite"),
])
def test_bad_weights_raise_before_anything_is_attached(change, match):
    model = tiny()
    lora = random_lora(model, targets=("q_proj", "o_proj"))
    change(lora)
    with pytest.raises(ValueError, match=match):
        adapters.attach_lora(model, lora)
    assert not adapters.adapters_of(model)


def test_bad_adapter_from():
    with pytest.raises(ValueError, match="adapter_from"):
        AttentionContext(Layout.CAUSAL, adapter_from=-1)
