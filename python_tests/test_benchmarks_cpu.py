"""pytest-benchmark timings of the CPU-side pieces whose speed matters without a GPU.

Mask and layout building, position ids, and the reference decode / AR step of
a tiny model: regressions show up in CI's benchmark table. Each runs a few
rounds only (``pedantic``), so the file also passes quickly in a plain
``pytest`` run; each also checks its result, so a fast wrong answer fails.
"""
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("pytest_benchmark")

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # bench/ lives beside the package, not inside it
    sys.path.insert(0, str(ROOT))

from bench.common import random_model  # noqa: E402
from tidar_kernels.kernels import mask  # noqa: E402
from tidar_kernels.model.kv_cache import KVCache  # noqa: E402
from tidar_kernels.kernels.mask import Layout  # noqa: E402
from tidar_kernels.training.objective import build_training_batch  # noqa: E402
from tidar_kernels.model.tuning import ARStep, DecodeStep  # noqa: E402

ROUNDS = 5


def run(benchmark, fn, *args):
    """A few timed rounds after one warm-up round; returns ``fn``'s result."""
    return benchmark.pedantic(fn, args=args, rounds=ROUNDS, iterations=1, warmup_rounds=1)


@pytest.mark.benchmark(group="mask")
def test_decode_mask_dense_k16_cache1k(benchmark):
    result = run(benchmark, mask.decode_mask, 1024, 16)
    assert result.shape == (272, 1024 + 272)


@pytest.mark.benchmark(group="mask")
def test_training_mask_dense_2s1024_block16(benchmark):
    result = run(benchmark, mask.training_mask, 512, 16)
    assert result.shape == (1024, 1024) and int(result[:512].sum()) == 512 * 513 // 2


@pytest.mark.benchmark(group="mask")
def test_compact_rule_decode_k16(benchmark):
    result = run(benchmark, mask.local_mask, Layout.DECODE, 272, 16, 16)
    assert torch.equal(result, mask.decode_mask(0, 16))


@pytest.mark.benchmark(group="mask")
def test_tile_classification_training_2s1024(benchmark):
    def classify_all():
        return [mask.classify_tile(Layout.TRAINING, r, r + 64, c, c + 64, 512, 16)
                for r in range(0, 1024, 64) for c in range(0, 1024, 64)]

    kinds = run(benchmark, classify_all)
    assert kinds.count(mask.TileKind.EMPTY) > len(kinds) // 3


@pytest.mark.benchmark(group="layout")
def test_decode_position_ids_batch4_k16(benchmark):
    start = torch.tensor([0, 17, 1000, 4096])
    result = run(benchmark, mask.local_position_ids, Layout.DECODE, 272, 16, 16, 0, start)
    assert result.shape == (4, 272) and torch.equal(result[1], mask.decode_position_ids(17, 16))


@pytest.mark.benchmark(group="layout")
def test_training_batch_4x512_block16(benchmark):
    tokens = torch.randint(0, 1000, (4, 512))
    result = run(benchmark, build_training_batch, tokens, 1000, 16)
    assert result.input_ids.shape == (4, 1024) and bool((result.input_ids[:, 512:] == 1000).all())


@pytest.fixture(scope="module")
def tiny():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # steady timings on small shared CI machines
    yield random_model("tiny", torch.device("cpu"), torch.float32)
    torch.set_num_threads(threads)


@pytest.mark.benchmark(group="reference-step")
def test_reference_tidar_step_tiny_k4_cache64(benchmark, tiny):
    cache = KVCache.for_model(tiny, 1, 64 + 4)
    cache.reset([64])
    step = DecodeStep(tiny, cache, 4)
    with torch.inference_mode():
        next_drafts = run(benchmark, step)
    assert next_drafts.shape == (1, 3)


@pytest.mark.benchmark(group="reference-step")
def test_reference_ar_step_tiny_cache64(benchmark, tiny):
    cache = KVCache.for_model(tiny, 1, 64 + 1)
    cache.reset([64])
    step = ARStep(tiny, cache)
    with torch.inference_mode():
        token = run(benchmark, step)
    assert token.shape == (1, 1) and int(cache.seqlens[0]) == 65
