"""FSDP2 (``--fsdp``) on CPU with gloo: 2 sharded processes train like 1 unsharded process, a sharded
run resumes bit-identically from its gathered checkpoint, and that checkpoint is an ordinary one."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tidar_kernels.model.loading import load_model
from tidar_kernels.training.checkpointing import STATE_JSON, STATE_TENSORS
from tidar_kernels.training.config import TrainArgs
from tidar_kernels.training.trainer import train

REPO = Path(__file__).resolve().parents[1]
ARGS = ["--config", "tiny", "--max-chars", "100000", "--vocab-size", "320", "--seq-len", "32", "--block-size", "4",
        "--batch-size", "8", "--steps", "4", "--eval-rows", "2", "--eval-prompts", "1", "--eval-prompt-len", "8",
        "--eval-new-tokens", "4", "--no-progress"]


def _run(nproc: int, out: Path, extra: list) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1",
           "PYTHONFAULTHANDLER": "1"}  # a crashed rank prints every thread's Python stack
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
                if nproc > 1 else [sys.executable])
    done = subprocess.run(launcher + ["-m", "tidar_kernels", "train", *ARGS, "--out", str(out), *extra], env=env,
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


def _files(out: Path, step: int):
    directory = out / f"step_{step:06d}"
    history = json.loads((directory / STATE_JSON).read_text())["history"]
    return history, load_file(str(directory / "model.safetensors")), load_file(str(directory / STATE_TENSORS))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """1 unsharded process; 1 FSDP process (its own group); 2 FSDP processes (with accumulation) saving at
    steps 2 and 4; a resume of step 2. Each run must exit with status 0."""
    root = tmp_path_factory.mktemp("fsdp")
    _run(1, root / "one", [])
    _run(1, root / "one-fsdp", ["--fsdp"])
    _run(2, root / "two", ["--fsdp", "--micro-batch-size", "2", "--save-every", "2"])
    _run(2, root / "resumed", ["--fsdp", "--resume", str(root / "two" / "step_000002")])
    return root


def test_two_sharded_processes_match_one_process(runs):
    one, one_weights, one_state = _files(runs / "one", 4)
    two, two_weights, two_state = _files(runs / "two", 4)
    assert len(one) == len(two) == 4
    for a, b in zip(one, two):
        for key in ("loss", "ar", "diffusion", "lr"):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=0), (key, a, b)
    # the gathered checkpoint holds the full (unsharded) tensors under the same names
    assert {k: v.shape for k, v in two_weights.items()} == {k: v.shape for k, v in one_weights.items()}
    assert {k: v.shape for k, v in two_state.items() if k.startswith("optimizer.")} == \
        {k: v.shape for k, v in one_state.items() if k.startswith("optimizer.")}
    for name in one_weights:  # Adam amplifies the rounding of ~0 gradients; losses above are the tight check
        torch.testing.assert_close(two_weights[name], one_weights[name], rtol=0, atol=1e-3)


def test_one_fsdp_process_from_the_command_line_trains_like_the_unsharded_run(runs):
    """Without torchrun the CLI makes (and ends) a one-process group and exits without finalization."""
    one, _, _ = _files(runs / "one", 4)
    sharded, _, _ = _files(runs / "one-fsdp", 4)
    for a, b in zip(one, sharded):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-6, abs=0), (a, b)


def test_sharded_resume_is_bit_identical(runs):
    full, full_weights, full_state = _files(runs / "two", 4)
    resumed, resumed_weights, resumed_state = _files(runs / "resumed", 4)
    assert resumed == full  # the earlier steps are kept, the later ones recomputed identically
    for name in full_weights:
        assert torch.equal(resumed_weights[name], full_weights[name]), name
    for name in full_state:
        if name.startswith("optimizer."):
            assert torch.equal(resumed_state[name], full_state[name]), name


def test_sharded_checkpoint_loads_as_a_plain_model(runs):
    model, tokenizer = load_model(str(runs / "two" / "step_000004"))
    assert model.config.mask_token_id == tokenizer.mask_id
    assert torch.isfinite(model.forward_causal(torch.tensor([[5, 6, 7]]))).all()


def test_one_process_fsdp_matches_the_unsharded_run():
    """``fsdp=True`` without torchrun: a one-process group is made (and ended); the losses are the plain run's."""
    import dataclasses
    import torch.distributed as dist
    args = TrainArgs(config="tiny", max_chars=100_000, vocab_size=320, seq_len=32, block_size=4, batch_size=4,
                       steps=3, eval_rows=2, eval_prompts=1, eval_prompt_len=8, eval_new_tokens=4, progress=False)
    plain = train(args)
    sharded = train(dataclasses.replace(args, fsdp=True))
    assert not dist.is_initialized()
    for a, b in zip(plain.history, sharded.history):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-6, abs=0)
    assert sharded.evaluation["heldout_ar_loss"] == pytest.approx(plain.evaluation["heldout_ar_loss"], rel=1e-5)


@pytest.mark.gpu
@pytest.mark.gpu_quick
def test_fsdp_bf16_mixed_precision_on_cuda_trains_like_autocast():
    """On CUDA FSDP2 computes in bf16 (fp32 master weights and reductions): losses track bf16 autocast's."""
    import dataclasses
    args = TrainArgs(config="tiny", max_chars=100_000, vocab_size=320, seq_len=32, block_size=4, batch_size=4,
                       steps=5, eval_rows=2, eval_prompts=1, eval_prompt_len=8, eval_new_tokens=4, progress=False,
                       device="cuda")
    autocast = train(args)
    sharded = train(dataclasses.replace(args, fsdp=True))
    assert all(p.dtype == torch.float32 for p in sharded.model.parameters())  # master weights
    for a, b in zip(autocast.history, sharded.history):
        assert b["loss"] == pytest.approx(a["loss"], rel=2e-2), (a, b)
