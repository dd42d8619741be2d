"""Recipes and run planning of the trainer: --recipe defaults, --budget-minutes (steps from measured step
time, an LR schedule consistent with the final count), --trainable-layers, and bad input that writes nothing."""
import dataclasses
import json
from pathlib import Path

import pytest
import torch
from helpers.gpt2 import gpt2_directory
from safetensors.torch import load_file

from tidar_kernels.training.checkpointing import STATE_JSON
from tidar_kernels.training.config import TrainArgs, parse_args, recipe_args
from tidar_kernels.training.trainer import WarmupCosine, train

QUICK = TrainArgs(config="tiny", max_chars=100_000, vocab_size=320, seq_len=32, block_size=4, batch_size=4,
                    steps=2, eval_rows=2, eval_prompts=1, eval_prompt_len=8, eval_new_tokens=4, progress=False)


def written(out: Path) -> list:
    return sorted(p.name for p in out.rglob("*")) if out.exists() else []


def test_recipe_sets_defaults_and_explicit_options_win():
    args, resume = parse_args(["--recipe", "smollm2-tidar", "--seq-len", "128", "--budget-minutes", "5",
                                 "--trainable-layers", "10", "--fsdp"])
    assert resume is None
    assert (args.recipe, args.init, args.block_size, args.lr, args.min_lr) == ("smollm2-tidar", "smollm2", 8, 1e-4,
                                                                               3e-5)
    assert (args.seq_len, args.budget_minutes, args.trainable_layers, args.fsdp) == (128, 5.0, 10, True)
    assert recipe_args("smollm2-tidar", seq_len=64) == dataclasses.replace(args, seq_len=64, budget_minutes=None,
                                                                            trainable_layers=None, fsdp=False)


def test_budget_sets_the_steps_and_the_schedule_ends_at_them(tmp_path):
    """A 15-second budget: steps follow from the measured step time, the cosine reaches min_lr exactly then."""
    corpus = _corpus(tmp_path / "corpus", [f"f{i}.py" for i in range(40)])  # fast to read: the budget is for steps
    args = dataclasses.replace(QUICK, data=[corpus], budget_minutes=0.25, warmup_steps=4, lr=1e-3, min_lr=1e-4,
                               out_dir=str(tmp_path / "run"))
    result = train(args)
    saved = json.loads((result.checkpoint / STATE_JSON).read_text())
    steps = saved["args"]["steps"]
    assert steps == len(result.history) == saved["step"] > 4  # planned after the 4 warmup (probe) steps
    schedule = WarmupCosine(steps, 4, 0.1)
    assert [h["lr"] for h in result.history] == pytest.approx([1e-3 * schedule(i) for i in range(steps)], rel=1e-9)
    assert result.history[-1]["lr"] == pytest.approx(1e-4 + 0.9e-3 * 0.5 * (1 + torch.cos(torch.tensor(
        torch.pi * (steps - 5) / (steps - 4))).item()), rel=1e-6)
    # extending the run: the given steps count, the saved budget plans nothing
    extended = train(dataclasses.replace(QUICK, steps=steps + 2), resume=str(result.checkpoint))
    assert len(extended.history) == steps + 2


def test_trainable_layers_train_only_the_top_blocks(tmp_path):
    start = train(dataclasses.replace(QUICK, steps=1, out_dir=str(tmp_path / "start"))).checkpoint
    before = load_file(str(start / "model.safetensors"))
    result = train(dataclasses.replace(QUICK, init=str(start), trainable_layers=1, lr=1e-2))
    after = {k: v.detach() for k, v in result.model.state_dict().items()}
    top = f"layers.{result.model.config.n_layers - 1}."
    for name, weight in before.items():
        changed = not torch.equal(after[name], weight)
        assert changed == (name.startswith(top) or name == "norm.weight"), name


# ----------------------------------------------------------------------------
# Bad input: a clear ValueError, nothing written
# ----------------------------------------------------------------------------


def _corpus(directory: Path, names) -> str:
    directory.mkdir()
    for name in names:
        (directory / name).write_text("def f(x):\n    return x + 1\n" * 40)
    return str(directory)


@pytest.mark.parametrize("case", ["unknown recipe", "another architecture", "no held-out file",
                                  "budget too small for one step", "budget with resume",
                                  "more trainable layers than the model has", "non-positive budget"])
def test_bad_input_is_a_clear_error_and_writes_nothing(case, tmp_path):
    out = tmp_path / "out"
    corpus = _corpus(tmp_path / "corpus", [f"f{i}.py" for i in range(40)])  # some hash into held-out
    small = dict(seq_len=32, batch_size=2, eval_rows=2, eval_prompts=1, eval_prompt_len=8, eval_new_tokens=4,
                 progress=False, out_dir=str(out), data=[corpus])
    resume = None
    if case == "unknown recipe":
        with pytest.raises(ValueError, match=r"recipe must be one of \['smollm2-tidar'\], got 'smollm2-tdar'"):
            parse_args(["--recipe", "smollm2-tdar", "--out", str(out)])
        assert written(out) == []
        return
    if case == "another architecture":
        args = recipe_args("smollm2-tidar", init=gpt2_directory(tmp_path / "gpt2"), **small)
        match = "model_type must be one of"
    elif case == "no held-out file":
        only = _corpus(tmp_path / "one-file", ["only.py"])  # its name hashes into the training split
        args, match = recipe_args("smollm2-tidar", **{**small, "data": [only]}), "no held-out document"
    elif case == "budget too small for one step":
        args = recipe_args("smollm2-tidar", init=None, config="tiny", vocab_size=320, budget_minutes=1e-4, **small)
        match = "budget_minutes=0.0001 is too small for one step"
    elif case == "budget with resume":
        args, resume = dataclasses.replace(QUICK, budget_minutes=1.0, out_dir=str(out)), str(tmp_path)
        match = "budget_minutes must be None when resuming"
    elif case == "more trainable layers than the model has":
        args = dataclasses.replace(QUICK, trainable_layers=3, out_dir=str(out))
        match = "trainable_layers must be <= the model's 2 layers, got 3"
    else:
        args, match = dataclasses.replace(QUICK, budget_minutes=0.0, out_dir=str(out)), "budget_minutes must be > 0"
    with pytest.raises(ValueError, match=match):
        train(args, resume=resume)
    assert written(out) == []


def test_corpus_adds_installed_package_docs_to_the_stdlib():
    """``--data stdlib docs:NAME``: the default corpus plus a package's README and doc files, split by name."""
    from tidar_kernels.training import data as tdata
    docs = tdata.read_source("docs:torch")
    assert docs and docs[0].name == "docs:torch/DESCRIPTION" and "PyTorch" in docs[0].text
    assert not any(".dist-info" in d.name for d in docs[1:])
    corpus = tdata.build_corpus(["stdlib", "docs:torch"], 0.05, require_heldout=True)
    names = {d.name for d in corpus.train + corpus.heldout}
    assert {d.name for d in tdata.stdlib_documents()} | {d.name for d in docs} == names
    with pytest.raises(ValueError, match="no installed distribution named 'no-such-package-xyz'"):
        tdata.read_source("docs:no-such-package-xyz")
