"""The trainer: it learns (TiDAR drafts are accepted), resumes bit-identically, agrees with torchrun,
and fails cleanly on bad input without leaving a partial checkpoint."""
import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers.hf_llama import llama_without_mask_token

from tidar_kernels.training import data as tdata
from tidar_kernels.model.loading import LATEST, load_model
from tidar_kernels.training.checkpointing import STATE_JSON, resolve_checkpoint, save_checkpoint
from tidar_kernels.training.config import TrainArgs, parse_args
from tidar_kernels.training.trainer import make_optimizer, make_scheduler, train
from tidar_kernels.model.checkpoints import save_pretrained
from tidar_kernels.model.transformer import Transformer, TransformerConfig

REPO = Path(__file__).resolve().parents[1]

# A few seconds of training on a 100k-character slice of the stdlib: the fast runs below.
QUICK = TrainArgs(config="tiny", max_chars=100_000, vocab_size=320, seq_len=32, block_size=4, batch_size=4,
                    steps=4, eval_rows=2, eval_prompts=1, eval_prompt_len=8, eval_new_tokens=4, progress=False)


def checkpoint_dirs(out: Path) -> list:
    """Everything the trainer left in ``out`` except the ``latest`` pointer."""
    return sorted(p.name for p in out.iterdir() if p.name != LATEST) if out.exists() else []


# ----------------------------------------------------------------------------
# It learns: a tiny model on the stdlib drafts well enough to matter
# ----------------------------------------------------------------------------


@pytest.fixture(scope="session")
def trained():
    """A tiny TiDAR model trained for a bounded number of steps (~60 s of CPU) on the stdlib.

    A near-byte-level vocabulary (320) makes code's whitespace runs and common
    identifiers several predictable tokens, which a 0.1 M-parameter model learns
    to draft within 200 steps (measured 1.7 tokens per forward at k = 4).
    """
    args = TrainArgs(config="tiny", max_chars=1_000_000, vocab_size=320, seq_len=64, block_size=4,
                       batch_size=16, steps=200, lr=5e-3, eval_rows=32, eval_prompts=6, eval_prompt_len=32,
                       eval_new_tokens=48, progress=False, seed=0)
    return train(args)


def test_trained_tiny_model_drafts_and_beats_unigram(trained):
    ev = trained.evaluation
    unigram = tdata.unigram_cross_entropy(trained.datasets.train, trained.datasets.heldout,
                                          trained.tokenizer.vocab_size)
    print(f"held-out AR loss {ev['heldout_ar_loss']:.3f} vs unigram {unigram:.3f}; "
          f"TiDAR tokens per forward {ev['tidar_tokens_per_forward']:.2f} at k={ev['draft_len']}")
    assert ev["draft_len"] == 4 and ev["eval_prompts"] == 6
    assert ev["tidar_tokens_per_forward"] > 1.3
    assert ev["heldout_ar_loss"] < unigram
    first, last = trained.history[0], trained.history[-1]
    assert last["ar"] < first["ar"] and last["diffusion"] < first["diffusion"]


def test_trained_model_tidar_equals_ar(trained):
    from tidar_kernels.model.generate import ar_generate, tidar_generate
    for prompt in trained.datasets.heldout_prompts[:2]:
        ids = torch.tensor([prompt])
        ar = ar_generate(trained.model, ids, 24)
        td = tidar_generate(trained.model, ids, 24, draft_len=4, beta=1.0)
        assert td.sequences() == ar.sequences()


# ----------------------------------------------------------------------------
# Checkpoints: resume is bit-identical, writes are atomic
# ----------------------------------------------------------------------------


def test_resume_is_bit_identical(tmp_path):
    args = dataclasses.replace(QUICK, steps=6, save_every=3, micro_batch_size=2)  # accumulation too
    full = train(dataclasses.replace(args, out_dir=str(tmp_path / "full")))
    assert checkpoint_dirs(tmp_path / "full") == ["step_000003", "step_000006"]
    resumed = train(dataclasses.replace(args, out_dir=str(tmp_path / "resumed")),
                      resume=str(tmp_path / "full" / "step_000003"))
    for (name, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in full.history]
    # a run directory resumes from its latest checkpoint
    assert resolve_checkpoint(str(tmp_path / "full")).name == "step_000006"


def test_failed_save_leaves_no_partial_checkpoint(tmp_path, monkeypatch):
    result = train(dataclasses.replace(QUICK, steps=1))

    def broken_save(self, directory):
        (Path(directory) / "tokenizer.json").write_text("half")
        raise OSError("disk full")

    monkeypatch.setattr(tdata.TextTokenizer, "save", broken_save)
    model = result.model
    opt = make_optimizer(model, QUICK)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tmp_path, 1, model, result.tokenizer, opt, make_scheduler(opt, QUICK),
                          tdata.BatchSampler(3, 0), QUICK)
    assert checkpoint_dirs(tmp_path) == []
    assert not (tmp_path / LATEST).exists()


def test_rewriting_a_step_keeps_the_old_checkpoint_when_the_rename_fails(tmp_path, monkeypatch):
    result = train(dataclasses.replace(QUICK, steps=1))
    opt = make_optimizer(result.model, QUICK)
    save = lambda: save_checkpoint(tmp_path, 1, result.model, result.tokenizer, opt,  # noqa: E731
                                     make_scheduler(opt, QUICK), tdata.BatchSampler(3, 0), QUICK)
    first = save()
    before = sorted(p.name for p in first.iterdir())
    real_replace = os.replace

    def failing_replace(src, dst):
        if Path(src).name.startswith(".tmp-"):  # the new checkpoint's rename into place
            raise OSError("rename failed")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="rename failed"):
        save()
    monkeypatch.setattr(os, "replace", real_replace)
    assert checkpoint_dirs(tmp_path) == ["step_000001"]  # the old one, back in place; no temp dirs left
    assert sorted(p.name for p in first.iterdir()) == before
    assert resolve_checkpoint(str(tmp_path)) == first
    save()  # a working rewrite replaces it and leaves nothing else behind
    assert checkpoint_dirs(tmp_path) == ["step_000001"]


@pytest.mark.parametrize("mode", ["soft", "hard"])
def test_self_distillation_trains_and_logs_its_term(mode):
    result = train(dataclasses.replace(QUICK, steps=2, distill=mode, distill_weight=0.5))
    for h in result.history:
        assert h["distill"] > 0 and torch.isfinite(torch.tensor(h["loss"]))


def test_keep_last_leaves_the_newest_checkpoints_and_resumes(tmp_path):
    out = tmp_path / "run"
    args = dataclasses.replace(QUICK, steps=5, save_every=1, keep_last=2, out_dir=str(out))
    train(args)
    assert checkpoint_dirs(out) == ["step_000004", "step_000005"]
    assert resolve_checkpoint(str(out)).name == "step_000005"
    resumed = train(dataclasses.replace(args, steps=6), resume=str(out))
    assert [h["step"] for h in resumed.history] == [1, 2, 3, 4, 5, 6]
    assert checkpoint_dirs(out) == ["step_000005", "step_000006"]


@pytest.mark.parametrize("fault", ["latest pointer", "deletion"])
def test_keep_last_never_leaves_a_run_without_a_loadable_latest(fault, tmp_path, monkeypatch):
    """A failure while moving ``latest`` deletes nothing; one during deletion leaves the new latest intact."""
    out = tmp_path / "run"
    args = dataclasses.replace(QUICK, steps=3, save_every=1, keep_last=1, out_dir=str(out))
    real_replace, real_rmtree = os.replace, shutil.rmtree

    def failing_replace(src, dst):
        if Path(dst).name == LATEST and Path(src).read_text() == "step_000003":
            raise OSError("killed")
        return real_replace(src, dst)

    def failing_rmtree(path, *a, **k):
        if ".deleting-" in Path(path).name:
            raise OSError("killed")
        return real_rmtree(path, *a, **k)

    if fault == "latest pointer":
        monkeypatch.setattr(os, "replace", failing_replace)
    else:
        monkeypatch.setattr(shutil, "rmtree", failing_rmtree)
    with pytest.raises(OSError, match="killed"):
        train(args)
    monkeypatch.undo()
    # latest pointer: step 3 is in place but not named, so step 2 stays; deletion: step 2's save dies
    # removing step 1, after latest named step 2
    assert resolve_checkpoint(str(out)).name == "step_000002"
    assert load_model(str(out))[0] is not None
    step_dirs = [name for name in checkpoint_dirs(out) if name.startswith("step_")]
    assert step_dirs == (["step_000002", "step_000003"] if fault == "latest pointer" else ["step_000002"])


# ----------------------------------------------------------------------------
# torch.distributed: 2 gloo processes give the loss of 1 process with the same global batch
# ----------------------------------------------------------------------------


def _cli(tmp_path, name, extra):
    return ["--config", "tiny", "--max-chars", "100000", "--vocab-size", "320", "--seq-len", "32", "--block-size",
            "4", "--batch-size", "8", "--steps", "3", "--eval-rows", "2", "--eval-prompts", "1",
            "--eval-prompt-len", "8", "--eval-new-tokens", "4", "--no-progress", "--out", str(tmp_path / name),
            *extra]


def test_torchrun_two_processes_match_one(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1",
           "PYTHONFAULTHANDLER": "1"}  # a crashed rank prints every thread's Python stack
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                "-m", "tidar_kernels", "train"]
    two = subprocess.run(torchrun + _cli(tmp_path, "two", ["--micro-batch-size", "2"]), env=env, cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    one = subprocess.run([sys.executable, "-m", "tidar_kernels", "train"] + _cli(tmp_path, "one", []), env=env,
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    states = [json.loads((resolve_checkpoint(str(tmp_path / n)) / STATE_JSON).read_text()) for n in ("one", "two")]
    for a, b in zip(states[0]["history"], states[1]["history"]):
        for key in ("loss", "ar", "diffusion"):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), (a, b)
    assert len(states[1]["history"]) == 3
    from safetensors.torch import load_file
    w1, w2 = (load_file(str(resolve_checkpoint(str(tmp_path / n)) / "model.safetensors")) for n in ("one", "two"))
    for name in w1:
        torch.testing.assert_close(w2[name], w1[name], rtol=0, atol=1e-3)  # Adam amplifies rounding of ~0 grads


# ----------------------------------------------------------------------------
# Continual pre-training of a Hugging Face directory (mask token added)
# ----------------------------------------------------------------------------


def test_continual_pretraining_from_hf_directory(tmp_path):
    pytest.importorskip("transformers")
    hf_dir = llama_without_mask_token(tmp_path / "hf", num_hidden_layers=1)
    result = train(dataclasses.replace(QUICK, init=str(hf_dir), steps=2))
    assert result.model.config.mask_token_id == 320 == result.tokenizer.mask_id
    assert result.model.config.vocab_size == 321
    assert all(torch.isfinite(torch.tensor([h["loss"] for h in result.history])))


# ----------------------------------------------------------------------------
# Bad input: clear errors, nothing written
# ----------------------------------------------------------------------------


def _checkpoint_without_mask(directory: Path) -> str:
    config = TransformerConfig.from_name("tiny", mask_token_id=None)
    save_pretrained(Transformer(config), directory)
    return str(directory)


@pytest.mark.parametrize("case", ["empty corpus", "seq_len not a multiple of block_size", "unknown config",
                                  "missing mask token", "unreadable checkpoint", "resume from nothing",
                                  "batch not divisible", "distill weight out of range"])
def test_bad_input_is_a_clear_error_and_writes_nothing(case, tmp_path):
    out = tmp_path / "out"
    args = dataclasses.replace(QUICK, out_dir=str(out))
    resume = None
    if case == "empty corpus":
        (tmp_path / "empty").mkdir()
        args, match = dataclasses.replace(args, data=[str(tmp_path / "empty")]), "empty training corpus"
    elif case == "seq_len not a multiple of block_size":
        args, match = dataclasses.replace(args, seq_len=30), "multiple of block_size"
    elif case == "unknown config":
        args, match = dataclasses.replace(args, config="huge"), "must be one of"
    elif case == "missing mask token":
        args, match = dataclasses.replace(args, init=_checkpoint_without_mask(tmp_path / "ar")), "mask token"
    elif case == "unreadable checkpoint":
        bad = tmp_path / "bad"
        bad.mkdir()
        (bad / "config.json").write_text('{"format": "tidar-kernels", "config": {"dim": ')
        args, match = dataclasses.replace(args, init=str(bad)), "unreadable"
    elif case == "resume from nothing":
        resume, match = str(tmp_path), "missing"
    elif case == "batch not divisible":
        args, match = dataclasses.replace(args, batch_size=4, micro_batch_size=3), "batch_size must be a multiple"
    else:
        args, match = dataclasses.replace(args, distill="soft", distill_weight=1.5), "distill_weight must lie in"
    with pytest.raises(ValueError, match=match):
        train(args, resume=resume)
    assert checkpoint_dirs(out) == []


@pytest.mark.parametrize("field, value", [("micro_batch_size", 0), ("micro_batch_size", -2), ("eval_rows", 0)],
                         ids=["micro0", "micro-negative", "eval_rows0"])
def test_bad_counts_are_named_in_the_error(field, value):
    with pytest.raises(ValueError, match=f"{field} must be an integer >= 1, got {value}"):
        dataclasses.replace(QUICK, **{field: value}).validate()


def test_cli_parses_overrides_and_types():
    args, resume = parse_args(["--config", "small", "--override", "dim=128", "qk_norm=True", "--steps", "7",
                                 "--lr", "1e-3", "--max-chars", "5000", "--resume", "runs/x"])
    assert (args.config, args.overrides, args.steps, args.lr, args.max_chars, resume) == \
        ("small", {"dim": 128, "qk_norm": True}, 7, 1e-3, 5000, "runs/x")
    with pytest.raises(ValueError, match="FIELD=VALUE"):
        parse_args(["--override", "dim"])
    assert parse_args(["--keep-last", "3"])[0].keep_last == 3 and parse_args([])[0].keep_last is None
    with pytest.raises(ValueError, match="keep_last must be an integer >= 1 or None"):
        parse_args(["--keep-last", "0"])[0].validate()
