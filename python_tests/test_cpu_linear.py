"""The prepacked oneDNN linears of the CPU decode loops (tidar_kernels/model/cpu_linear.py).

Against ``F.linear`` in float64 with the worst-case bound of an fp32 dot product of length
``n`` (``gamma_n = n u / (1 - n u)`` times the sum of absolute products, any summation order);
when the switch is on and when it must fall back; cache invalidation; greedy decoding unchanged.
"""
import pytest
import torch
import torch.nn.functional as F

from tidar_kernels.model import cpu_linear
from tidar_kernels.model.generate import ar_generate, tidar_generate
from tidar_kernels.model.transformer import Transformer, TransformerConfig

pytestmark = pytest.mark.skipif(not cpu_linear.available(), reason="torch built without oneDNN")


def dot_product_bound(x, weight, bias):
    """Worst-case forward error of fp32 ``x @ weight.T + bias`` (Higham, ch. 3)."""
    n = weight.shape[1] + (bias is not None)
    unit = torch.finfo(torch.float32).eps / 2
    magnitude = x.double().abs() @ weight.double().abs().T + (0 if bias is None else bias.double().abs())
    return n * unit / (1 - n * unit) * magnitude


@pytest.mark.parametrize("rows, out_features, in_features, with_bias", [
    (1, 37, 19, False), (2, 64, 33, True), (7, 130, 65, False), (72, 96, 48, True)])
def test_packed_linear_matches_float64_within_the_fp32_bound(rows, out_features, in_features, with_bias):
    x = torch.randn(2, rows, in_features)
    weight = torch.randn(out_features, in_features)
    bias = torch.randn(out_features) if with_bias else None
    with torch.no_grad(), cpu_linear.packed_linears():
        assert cpu_linear.packs(x, weight)
        got = cpu_linear.linear(x, weight, bias)
    exact = F.linear(x.double(), weight.double(), None if bias is None else bias.double())
    assert got.shape == exact.shape and got.dtype == torch.float32
    assert ((got.double() - exact).abs() <= dot_product_bound(x, weight, bias)).all()


def test_falls_back_outside_the_switch_under_autograd_and_off_fp32():
    x, weight = torch.randn(3, 8), torch.randn(5, 8)
    assert not cpu_linear.packs(x, weight)  # switch off: F.linear, bitwise
    with cpu_linear.packed_linears():
        assert not cpu_linear.packs(x.requires_grad_(), weight)  # autograd needs F.linear's backward
        assert torch.equal(cpu_linear.linear(x, weight), F.linear(x, weight))
        assert not cpu_linear.packs(x.detach().half(), weight.half())
        with torch.inference_mode():
            inference_weight = torch.randn(5, 8)
        assert not cpu_linear.packs(x.detach(), inference_weight)  # no version counter to trust
    with cpu_linear.packed_linears(enabled=False):
        assert not cpu_linear.packs(x.detach(), weight)


def test_in_place_update_repacks():
    x, weight = torch.randn(4, 16), torch.randn(8, 16)
    with torch.no_grad(), cpu_linear.packed_linears():
        cpu_linear.linear(x, weight)
        weight.mul_(-2.0)
        got = cpu_linear.linear(x, weight)
    exact = F.linear(x.double(), weight.double())
    assert ((got.double() - exact).abs() <= dot_product_bound(x, weight, None)).all()


def test_environment_switch(monkeypatch):
    monkeypatch.setenv(cpu_linear.CPU_LINEAR_ENV, "plain")
    assert not cpu_linear.requested()
    monkeypatch.setenv(cpu_linear.CPU_LINEAR_ENV, "fast")
    with pytest.raises(ValueError, match="TIDAR_CPU_LINEAR"):
        cpu_linear.requested()


@pytest.mark.parametrize("draft_len", [None, 3])
def test_decode_loops_pack_and_greedy_tokens_stay_those_of_plain_linears(monkeypatch, draft_len):
    config = TransformerConfig(vocab_size=97, dim=48, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=12,
                               intermediate_size=96, max_seq_len=128, mask_token_id=96)
    model = Transformer(config).eval()
    prompts = torch.randint(0, 96, (3, 9))

    def generate():
        if draft_len is None:
            return ar_generate(model, prompts, 12).sequences()
        return tidar_generate(model, prompts, 12, draft_len).sequences()

    calls = []
    real = cpu_linear._packed
    monkeypatch.setattr(cpu_linear, "_packed", lambda weight: calls.append(1) or real(weight))
    packed = generate()
    assert calls  # the loops took the packed path
    monkeypatch.setenv(cpu_linear.CPU_LINEAR_ENV, "plain")
    calls.clear()
    assert generate() == packed and not calls
