"""The roofline cost model (tidar_kernels/kernels/roofline.py) and the planners built on it, on the CPU.

Figures: H100 SXM and H200 (132 SMs, 989 TFLOP/s dense bf16, 3.35 / 4.8 TB/s), A100 SXM
80GB (108 SMs, 312 TFLOP/s, 2.039 TB/s) for sm_80.
"""
import pytest
import torch
from helpers import decode_plan_cases

from tidar_kernels.kernels import roofline
from tidar_kernels.kernels.roofline import A100, H100, H200, CachedKernel, CachedStep

QWEN25, QWEN3 = (12, 2), (32, 8)


def decode_step(k, heads, batch=1, max_len=4096, head_dim=128):
    return CachedStep(batch, k + k * k, heads[0], heads[1], head_dim, max_len, k, 2)


def test_device_figures_and_ridge():
    assert (H100.sm_count, H100.tensor_flops, H100.hbm_bytes_per_s) == (132, 989e12, 3.35e12)
    assert (H200.sm_count, H200.tensor_flops, H200.hbm_bytes_per_s) == (132, 989e12, 4.8e12)
    assert H100.ridge == pytest.approx(295.2, abs=0.1)
    assert H200.ridge == pytest.approx(206.0, abs=0.1)


def test_device_from_name_knows_only_the_sxm_parts():
    assert roofline.device_from_name("NVIDIA H100 80GB HBM3") is H100
    assert roofline.device_from_name("NVIDIA H200") is H200
    assert roofline.device_from_name("NVIDIA H100 PCIe") is None
    assert roofline.device_from_name("NVIDIA A100-SXM4-80GB") is None
    other = roofline.device_for("NVIDIA L40S", 142, 100 * 1024, 89)
    assert other.sm_count == 142 and other.ridge == pytest.approx(H100.ridge)


def test_limit_is_the_slower_of_compute_and_memory():
    assert roofline.limit_seconds(989e12, 1.0, H100) == pytest.approx(1.0)
    assert roofline.limit_seconds(1.0, 4.8e12, H200) == pytest.approx(1.0)
    assert roofline.limit_seconds(989e9, 3.35e9, H100) == pytest.approx(1e-3)


def test_step_flops_and_bytes():
    """Qwen2.5-1.5B, k = 16, cache 4096, batch 1 (~6.2 MB, ~7 us on an H100)."""
    step = decode_step(16, QWEN25)
    assert step.packed_rows == 272 * 6
    assert step.flops() == 4 * 12 * 272 * 4096 * 128
    kv, q_out, new, written = 2 * 2 * 4096, 2 * 272 * 12, 2 * 272 * 2, 2 * 16 * 2
    assert step.ideal_bytes() == 2 * 128 * (kv + q_out + new + written)
    assert step.ideal_bytes() == pytest.approx(6.16e6, rel=0.01)
    assert roofline.limit_seconds(step.flops(), step.ideal_bytes(), H100) == pytest.approx(6.9e-6, rel=0.01)
    assert step.partial_bytes(3) == 2 * 4 * 3 * 2 * 1632 * 129
    assert step.partial_bytes(3, elem_bytes=2) == 2 * 3 * 2 * 1632 * (2 * 128 + 4)  # bf16 outputs, fp32 LSEs
    # Qwen3-8B, k = 16: 1088 rows pad to 1152 with 128-row tiles, not at all with 64.
    qwen3 = decode_step(16, QWEN3)
    assert qwen3.padded_flops(128) / qwen3.padded_flops(64) == pytest.approx(1152 / 1088)


@pytest.mark.parametrize("k,heads,batch,bound", [(16, QWEN25, 1, True), (16, QWEN3, 8, True), (4, QWEN3, 1, False),
                                                 (1, QWEN25, 1, False)])
def test_compute_bound_against_the_ridge(k, heads, batch, bound):
    assert roofline.compute_bound(decode_step(k, heads, batch), H100) is bound


def test_ctas_per_sm_of_the_cuda_kernel_follow_shared_memory():
    """The hd128 CUDA kernel (85 KB of shared memory) fits once on an sm_80 SM, twice on sm_90."""
    hd128, hd64 = decode_plan_cases.decode_smem_bytes(128), decode_plan_cases.decode_smem_bytes(64)
    assert roofline.ctas_per_sm(A100, hd128, 4) == 1
    assert roofline.ctas_per_sm(H100, hd128, 4) == 2
    assert roofline.ctas_per_sm(A100, hd64, 4) == 2  # registers: 2 x 128 threads x 256
    # 8-warp CTAs at the register cap: one per SM whatever the shared memory.
    assert roofline.ctas_per_sm(H100, 1024, 8) == 1


def test_utilisation_counts_waves_and_warps():
    assert roofline.utilisation(H100, 132, 8, 1024) == 1.0
    assert roofline.utilisation(H100, 66, 8, 1024) == 0.5
    assert roofline.utilisation(H100, 133, 8, 1024) == pytest.approx(133 / 264)
    # 4-warp CTAs need two per SM for the peak; one each runs at half speed.
    assert roofline.utilisation(H100, 132, 4, 1024) == 0.5
    assert roofline.utilisation(H100, 264, 4, 1024) == 1.0
    assert roofline.utilisation(A100, 216, 4, decode_plan_cases.decode_smem_bytes(128)) == 0.5


def test_cuda_planner_prices_one_resident_cta_on_sm80():
    """Two waves of the hd128 CUDA kernel run at half rate on an A100 (one CTA per SM, 4 warps)
    and at full rate on an H100 (two resident): the plan's modelled time says so."""
    step = decode_step(8, QWEN3)  # 5 row tiles x 8 KV heads = 40 CTAs per split
    kernel = CachedKernel(64, 4, decode_plan_cases.decode_smem_bytes(128), local_split=True)
    a100, h100 = roofline.estimate(step, kernel, 6, A100), roofline.estimate(step, kernel, 6, H100)
    assert a100.ctas == h100.ctas == 240
    assert a100.utilisation == pytest.approx(240 / 324 * 0.5)
    assert h100.utilisation == pytest.approx(240 / 264)


def test_memory_bound_steps_split_to_fill_the_gpu():
    """A memory-bound step with few CTAs splits until every SM is busy (or the split limit)."""
    for step in (decode_step(4, QWEN25), decode_step(4, QWEN3), decode_step(1, QWEN25)):
        kernel = CachedKernel(64, 8, 100_000)
        _, splits, guess = roofline.plan_splits(step, [kernel], H100, 32, 128)
        assert guess.ctas >= 0.9 * H100.sm_count or splits == 32


def test_compute_bound_split_pays_for_its_partials():
    """A split is taken only when the idle SMs it fills cost more than its partials; with
    enough CTAs already (batch 8, Qwen3-8B, k = 16) the step is not split at all."""
    kernel = CachedKernel(64, 8, 100_000)
    busy = decode_step(16, QWEN3, batch=8)
    assert roofline.plan_splits(busy, [kernel], H100, 32, 128)[1] == 1
    sparse = decode_step(16, QWEN25)
    _, splits, guess = roofline.plan_splits(sparse, [kernel], H100, 32, 128)
    assert 1 < splits < 11  # 11 splits would cost 37 MB of partials
    assert guess.seconds < roofline.estimate(sparse, kernel, 1, H100).seconds
    assert guess.seconds < roofline.estimate(sparse, kernel, 11, H100).seconds


def test_partial_slack_keeps_compute_bound_partials_within_the_ideal_bytes():
    """Qwen2.5-1.5B k = 16 batch 1, bf16 partials: the fastest plan moves more partial bytes
    than the step; with slack the planner takes the fastest plan within the ideal bytes,
    still split (GPU fill), and no slower than the slack allows."""
    step = decode_step(16, QWEN25)
    kernels = [CachedKernel(m, 8, 2 * 128 * (m + 6 * 64), partial_elem_bytes=2) for m in (64, 128)]
    _, fast_splits, fast = roofline.plan_splits(step, kernels, H100, 32, 128)
    assert fast.partial_bytes > step.ideal_bytes()
    kernel, splits, lean = roofline.plan_splits(step, kernels, H100, 32, 128, partial_slack=1.25)
    assert lean.partial_bytes <= step.ideal_bytes() and 1 < splits < fast_splits
    assert fast.seconds < lean.seconds <= 1.25 * fast.seconds
    for candidate in kernels:  # the fastest of the plans within the ideal bytes
        for count in range(1, 33):
            guess = roofline.estimate(step, candidate, count, H100)
            assert guess.partial_bytes > step.ideal_bytes() or guess.seconds >= lean.seconds
    # Too little slack: the fastest plan stands. Memory-bound steps ignore the slack.
    assert roofline.plan_splits(step, kernels, H100, 32, 128, partial_slack=1.01)[1] == fast_splits
    small = decode_step(4, QWEN25)
    assert roofline.plan_splits(small, kernels, H100, 32, 128, partial_slack=1.25) == \
        roofline.plan_splits(small, kernels, H100, 32, 128)


def test_plan_splits_rejects_no_candidates():
    with pytest.raises(ValueError, match="kernels is empty"):
        roofline.plan_splits(decode_step(4, QWEN25), [], H100, 32, 128)
    with pytest.raises(ValueError, match="partial_slack must be >= 1, got 0.5"):
        roofline.plan_splits(decode_step(4, QWEN25), [CachedKernel(64, 8, 100_000)], H100, 32, 128, 0.5)


def test_cuda_planner_counts_16bit_partials_and_takes_the_slack():
    """The CUDA kernel stores split partials in its 16-bit dtype and its planner follows the
    Triton planner's slack rule: Qwen3-8B k = 16 batch 1 on an H100 (compute-bound) takes the
    fastest split count whose partials fit in the step's ideal bytes, fewer splits than least
    modelled time would, within PARTIAL_SLACK of that time."""
    step, splits, guess = decode_plan_cases.cuda_decode_plan(1, 272, 16, *QWEN3, 128, 4096, H100)
    kernel = CachedKernel(64, 4, decode_plan_cases.decode_smem_bytes(128), local_split=True, partial_elem_bytes=2)
    assert guess == roofline.estimate(step, kernel, splits, H100)
    assert guess.partial_bytes == step.partial_bytes(splits + 1, elem_bytes=2) <= step.ideal_bytes()
    _, fastest_splits, fastest = roofline.plan_splits(step, [kernel], H100, 32, 256)
    assert fastest_splits > splits and fastest.partial_bytes > step.ideal_bytes()
    assert fastest.seconds < guess.seconds <= roofline.PARTIAL_SLACK * fastest.seconds


def test_cuda_planner_cases_are_current():
    """csrc/tests/decode_plan_cases.txt (read by CTest) must be what roofline.py produces today."""
    assert decode_plan_cases.CASES_FILE.read_text() == decode_plan_cases.render(), \
        "run `python python_tests/helpers/decode_plan_cases.py` to regenerate the C++ planner cases"


def test_triton_planner_uses_the_model_and_static_sizes():
    triton_ops = pytest.importorskip("tidar_kernels.kernels.backends.triton_ops")
    plan = triton_ops.plan_cached(torch.bfloat16, 1, 272, 12, 2, 128, 4096, 16, H100)
    again = triton_ops.plan_cached(torch.bfloat16, 1, 272, 12, 2, 128, 4096, 16, H100)
    assert plan == again
    step = decode_step(16, QWEN25)
    kernel = CachedKernel(plan.block_m, plan.warps, 2 * 128 * (plan.block_m + plan.stages * 2 * plan.block_n),
                          partial_elem_bytes=2)
    assert plan.estimate == roofline.estimate(step, kernel, plan.splits, H100)
    # Compute-bound: bf16 partials within the ideal bytes, still split to fill the GPU; every
    # candidate (row tile x splits) within the ideal bytes is priced no lower than the chosen
    # one, and no candidate lower than the chosen one over PARTIAL_SLACK.
    assert plan.splits > 1 and plan.estimate.partial_bytes <= step.ideal_bytes()
    for block_m in (64, 128):
        candidate = CachedKernel(block_m, 8, 2 * 128 * (block_m + plan.stages * 2 * plan.block_n),
                                 partial_elem_bytes=2)
        for splits in range(1, triton_ops.MAX_SPLITS + 1):
            guess = roofline.estimate(step, candidate, splits, H100)
            assert guess.seconds >= plan.estimate.seconds / roofline.PARTIAL_SLACK
            assert guess.partial_bytes > step.ideal_bytes() or guess.seconds >= plan.estimate.seconds
    # A one-row AR step is one 16-row tile; fp32 tiles stop at 64 rows.
    assert triton_ops.plan_cached(torch.bfloat16, 1, 1, 12, 2, 128, 4096, 1, H100).block_m == 16
    assert triton_ops.plan_cached(torch.float32, 1, 272, 12, 2, 128, 4096, 16, H100).block_m == 64


def test_model_forward_counts_weights_cache_and_flops():
    """Qwen2.5-1.5B AR step: 1.54 G weights (bf16 3.09 GB) read once dominate; memory-bound."""
    from tidar_kernels.model.transformer import CONFIGS
    config = CONFIGS["qwen2.5-1.5b"]
    flops, hbm_bytes = roofline.model_forward(config, 1, 1, 4096, 1)
    layers = 28 * (1536 * 128 * (2 * 12 + 2 * 2) + 3 * 1536 * 8960)
    kv = 2 * 28 * 2 * 128 * (4096 + 1)
    assert hbm_bytes == 2 * (layers + 1536 * 151936 + kv)
    assert flops == 2 * layers + 4 * 12 * 128 * 4096 * 28 + 2 * 1536 * 151936
    assert flops / hbm_bytes < H100.ridge
    more, _ = roofline.model_forward(config, 1, 272, 4096, 47)
    assert more > 200 * flops


def test_bench_roofline_columns():
    from bench import common
    assert common.roofline_columns(989e9, 1.0, 2.0, H100) == {"limit_ms": pytest.approx(1.0),
                                                              "of_limit": pytest.approx(0.5)}
    assert common.roofline_columns(1.0, 4.8e9, 1.0, H200) == {"limit_ms": pytest.approx(1.0),
                                                              "of_limit": pytest.approx(1.0)}
    assert common.roofline_columns(1.0, 1.0, 1.0, None) == {}
    assert common.roofline_device(smoke=True) is None
