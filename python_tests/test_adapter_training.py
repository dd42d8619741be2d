"""Adapter runs of the trainer (``--adapter lora``): the base stays bitwise frozen, only the mask-rows LoRA
(and a new mask token's embedding) trains, checkpoints are PEFT files plus the base's record, resume is
bit-identical, the loader and the harness take the run directory, and the AR path is bitwise the base's."""
import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers.hf_llama import llama_without_mask_token

from tidar_kernels.model import adapters, checkpoints
from tidar_kernels.model.generate import ar_generate, tidar_generate
from tidar_kernels.model.loading import LATEST, load_model
from tidar_kernels.model.transformer import Transformer, TransformerConfig
from tidar_kernels.training import data as tdata
from tidar_kernels.training import evaluate as E
from tidar_kernels.training.checkpointing import STATE_JSON, STATE_TENSORS, resolve_checkpoint
from tidar_kernels.training.config import TrainArgs, parse_args
from tidar_kernels.training.trainer import train

pytestmark = pytest.mark.usefixtures("one_thread")
REPO = Path(__file__).resolve().parents[1]
QUICK = TrainArgs(config="tiny", max_chars=100_000, vocab_size=320, seq_len=32, block_size=4, batch_size=4,
                  steps=2, eval_rows=2, eval_prompts=1, eval_prompt_len=8, eval_new_tokens=4, progress=False)
SMALL_EVAL = dict(prompts=2, prompt_len=16, new_tokens=12, draft_lens=(2, 4), ppl_rows=3, ppl_seq_len=48)


def adapter_args(init, **kw) -> TrainArgs:
    return dataclasses.replace(QUICK, init=str(init), adapter="lora", adapter_rank=4, lr=3e-2, **kw)


def base_tensors(model) -> dict:
    """Every tensor of the model except its adapters, copied."""
    return {name: t.detach().clone() for name, t in model.state_dict().items() if ".adapter." not in name}


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    """A tiny full (non-adapter) run with checkpoints after steps 1 and 2: the base (its own trained mask token)."""
    out = tmp_path_factory.mktemp("base")
    train(dataclasses.replace(QUICK, out_dir=str(out), save_every=1))
    return out


@pytest.fixture(scope="module")
def hf_base(tmp_path_factory):
    """A Hugging Face Llama directory whose tokenizer has no mask token: loading appends one (a new row)."""
    pytest.importorskip("transformers")
    return llama_without_mask_token(tmp_path_factory.mktemp("hf"), num_hidden_layers=2, tie_word_embeddings=True)


@pytest.fixture(scope="module")
def adapter_run(base_run, tmp_path_factory):
    """An adapter run on the base's step 2 (o_proj and q_proj), checkpoints after steps 2 and 4."""
    out = tmp_path_factory.mktemp("adapter")
    result = train(adapter_args(base_run / "step_000002", steps=4, save_every=2, out_dir=str(out),
                                adapter_targets=["o_proj", "q_proj"], micro_batch_size=2))
    return out, result


# ----------------------------------------------------------------------------
# What trains: the adapter only; the base stays bitwise
# ----------------------------------------------------------------------------


def test_new_mask_token_row_trains_and_every_base_tensor_stays_bitwise(hf_base, tmp_path):
    before = base_tensors(load_model(str(hf_base))[0])
    result = train(adapter_args(hf_base, steps=3, out_dir=str(tmp_path / "run")))
    model = result.model
    assert model.config.mask_token_id == 320 and model.config.tie_embeddings
    after = base_tensors(model)
    assert after.keys() == before.keys()
    for name, tensor in before.items():
        assert torch.equal(after[name], tensor), name
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"tok_embeddings.adapter.row"} | {
        f"layers.{i}.attention.wo.adapter.{ab}" for i in range(2) for ab in "ab"}
    row = adapters.mask_row_of(model).row
    assert not torch.equal(row, before["tok_embeddings.weight"][320])  # the mask row learned
    assert all(adapter.b.abs().max() > 0 for adapter in adapters.adapters_of(model))  # B left zero
    step = resolve_checkpoint(str(tmp_path / "run"))
    assert sorted(p.name for p in step.iterdir()) == sorted([
        "adapter_config.json", "adapter_model.safetensors", "mask_embedding.safetensors", STATE_JSON,
        STATE_TENSORS, "tokenizer.json", "tokenizer_tidar.json"])  # no copy of the base
    assert torch.equal(load_file(str(step / "mask_embedding.safetensors"))["tok_embeddings.mask_row"], row)
    settings = json.loads((step / "adapter_config.json").read_text())
    assert settings["r"] == 4 and settings["lora_alpha"] == 4 and settings["target_modules"] == ["o_proj"]
    assert settings["tidar"]["base"] == {"source": str(hf_base.resolve()),
                                         "fingerprint": checkpoints.base_fingerprint(load_model(str(hf_base))[0])}
    # generation from the run directory: the mask row is on the mask rows, and greedy TiDAR is the base's AR
    loaded, _ = load_model(str(tmp_path / "run"))
    base, tokenizer = load_model(str(hf_base))
    assert torch.equal(adapters.mask_row_of(loaded).row, row)
    ids = torch.tensor([tokenizer.encode("def main(argv):\n    return")])
    assert tidar_generate(loaded, ids, 16, 4, spec_lora="mask_rows").sequences() == \
        ar_generate(base, ids, 16).sequences()


def test_checkpoint_is_peft_layout_that_load_spec_lora_reads_back(adapter_run, base_run):
    out, result = adapter_run
    step = out / "step_000004"
    assert (out / LATEST).read_text() == "step_000004"
    settings = json.loads((step / "adapter_config.json").read_text())
    assert settings["peft_type"] == "LORA" and settings["target_modules"] == ["q_proj", "o_proj"]
    assert settings["base_model_name_or_path"] == str((base_run / "step_000002").resolve())
    assert settings["tidar"]["mask_row_file"] is None  # the base's own mask token: not trained
    names = sorted(load_file(str(step / "adapter_model.safetensors")))
    assert names == sorted(f"base_model.model.model.layers.{i}.self_attn.{m}.lora_{h}.weight"
                           for i in range(2) for m in ("q_proj", "o_proj") for h in "AB")
    weights = checkpoints.load_spec_lora(step, result.model.config)
    assert weights.rank == 4 and weights.alpha == 4.0
    for adapter_path in ("attention.wq", "attention.wo"):
        for layer in range(2):
            adapter = adapters.projection(result.model, layer, adapter_path).adapter
            a, b = weights.weights[adapter_path][layer]
            assert torch.equal(a, adapter.a) and torch.equal(b, adapter.b)
    assert torch.equal(load_file(str(step / STATE_TENSORS))["optimizer.0.exp_avg"].abs().sum() > 0,
                       torch.tensor(True))


def test_adapter_resume_is_bit_identical(adapter_run, base_run, tmp_path):
    out, full = adapter_run
    resumed = train(adapter_args(base_run / "step_000002", steps=4, save_every=2, keep_last=1,
                                 out_dir=str(tmp_path / "resumed")), resume=str(out / "step_000002"))
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in full.history]
    for a, b in zip(adapters.adapter_parameters(full.model), adapters.adapter_parameters(resumed.model)):
        assert torch.equal(a, b)
    assert sorted(p.name for p in (tmp_path / "resumed").iterdir()) == [LATEST, "step_000004"]  # --keep-last 1
    for name in ("adapter_model.safetensors", STATE_TENSORS):
        first, second = (load_file(str(d / "step_000004" / name)) for d in (out, tmp_path / "resumed"))
        assert first.keys() == second.keys()
        for key in first:
            if key != "rng.cpu":
                assert torch.equal(first[key], second[key]), (name, key)


# ----------------------------------------------------------------------------
# Loading: the AR path never sees the adapter; the wrong base is refused
# ----------------------------------------------------------------------------


def test_run_dir_loads_with_the_adapter_and_the_ar_path_is_the_base(adapter_run, base_run):
    out, _ = adapter_run
    model, tokenizer = load_model(str(out))
    base, _ = load_model(str(base_run / "step_000002"))
    assert len(adapters.adapters_of(model)) == 4
    rows = torch.tensor([tokenizer.encode("import os\nimport sys\n\ndef main(argv):\n    pass\n")])
    assert torch.equal(model.forward_causal(rows), base.forward_causal(rows))
    clean = rows[:, :16]
    layout = torch.cat([clean, torch.full_like(clean, model.config.mask_token_id)], dim=1)
    with_adapter = model.forward_training(layout, 4, mask_rows_adapter=True)
    plain = base.forward_training(layout, 4)
    assert torch.equal(with_adapter[:, :16], plain[:, :16])  # clean rows: the base
    assert not torch.equal(with_adapter[:, 16:], plain[:, 16:])  # mask rows: the adapter
    for prompt in ("def main(argv):\n    return", "class A:\n    def __init__(self):\n"):
        ids = torch.tensor([tokenizer.encode(prompt)])
        ar = ar_generate(base, ids, 20).sequences()
        assert tidar_generate(model, ids, 20, 4, spec_lora="mask_rows").sequences() == ar
        assert ar_generate(model, ids, 20).sequences() == ar


def _with_base(step: Path, target: Path, base: str) -> Path:
    shutil.copytree(step, target)
    settings = json.loads((target / "adapter_config.json").read_text())
    settings["tidar"]["base"]["source"] = base
    (target / "adapter_config.json").write_text(json.dumps(settings))
    return target


def test_adapter_on_the_wrong_base_is_refused(adapter_run, base_run, tmp_path):
    out, _ = adapter_run
    step = out / "step_000004"
    # same shapes, other weights: the fingerprint
    other = _with_base(step, tmp_path / "other", str(base_run / "step_000001"))
    with pytest.raises(ValueError, match="fingerprint"):
        load_model(str(other))
    # other shapes: the tensor is named
    config = TransformerConfig.from_name("tiny", vocab_size=320, mask_token_id=load_model(str(step))[0]
                                         .config.mask_token_id, n_heads=2, head_dim=16)
    wide = tmp_path / "wide"
    checkpoints.save_pretrained(Transformer(config), wide)
    tdata.TextTokenizer.load(step).save(wide)
    with pytest.raises(ValueError, match=r"tensor 'base_model\.model\.model\.layers\.\d\.self_attn\.[qo]_proj"
                                         r"\.lora_[AB]\.weight' has shape"):
        load_model(str(_with_base(step, tmp_path / "shapes", str(wide))))
    with pytest.raises(ValueError, match="not an adapter run's checkpoint"):
        train(adapter_args(out, steps=1))


# ----------------------------------------------------------------------------
# The harness reports the AR path's bitwise identity
# ----------------------------------------------------------------------------


def test_harness_reports_ar_bitwise_identical_to_base(adapter_run, base_run, tmp_path, capsys):
    out, _ = adapter_run
    path = tmp_path / "report.json"
    E.main([str(out), "--prompts", "2", "--prompt-len", "16", "--new-tokens", "12", "--draft-lens", "2", "4",
            "--ppl-rows", "3", "--ppl-seq-len", "48", "--json", str(path)])
    report = json.loads(path.read_text())
    assert report["ar_bitwise_identical_to_base"] is True and report["greedy_equals_ar"] is True
    assert report["model"]["adapter"]["base"]["source"] == str((base_run / "step_000002").resolve())
    assert "likelihood-mode logits bitwise identical to the base" in capsys.readouterr().out
    # the comparison can fail: another model against that base
    rows = torch.tensor([[5, 6, 7, 8, 9, 10]])
    other, _ = load_model(str(base_run / "step_000001"))
    assert E.ar_bitwise_identical(other, str(base_run / "step_000002"), rows, torch.device("cpu"),
                                  torch.float32) is False
    plain = E.evaluate(str(base_run), **SMALL_EVAL)  # not an adapter run: no such key
    assert "ar_bitwise_identical_to_base" not in plain


def test_generate_cli_runs_the_adapter_of_a_run_dir(adapter_run, capsys):
    from tidar_kernels.model.generate import main
    out, _ = adapter_run
    main(["--model", str(out), "--prompt", "def f(x):", "--max-new-tokens", "8", "--draft-len", "4", "--ar",
          "--device", "cpu"])
    printed = capsys.readouterr().out
    assert "[TiDAR]" in printed and "[AR]" in printed


# ----------------------------------------------------------------------------
# Arguments: defaults and clear errors
# ----------------------------------------------------------------------------


def test_cli_defaults_alpha_to_the_rank_and_targets_to_o_proj():
    args, _ = parse_args(["--init", "smollm2", "--adapter", "lora", "--adapter-rank", "8"])
    args.validate()
    assert (args.adapter, args.adapter_rank, args.lora_alpha, args.lora_targets) == ("lora", 8, 8.0, ["o_proj"])
    args, _ = parse_args(["--init", "smollm2", "--adapter", "lora", "--adapter-rank", "8", "--adapter-alpha", "16",
                          "--adapter-targets", "q_proj,v_proj,o_proj"])
    args.validate()
    assert (args.lora_alpha, args.lora_targets) == (16.0, ["q_proj", "v_proj", "o_proj"])


@pytest.mark.parametrize("kw, match", [
    (dict(adapter_rank=0), "adapter_rank must be an integer >= 1, got 0"),
    (dict(adapter_rank=None), "adapter_rank must be given"),
    (dict(adapter_alpha=0.0), "adapter_alpha must be a finite number > 0"),
    (dict(adapter_alpha=float("nan")), "adapter_alpha must be a finite number > 0"),
    (dict(adapter_targets=["o_proj", "w_out"]), r"adapter_targets must name projections from .* unknown \['w_out'\]"),
    (dict(adapter_targets=[]), "adapter_targets must be a non-empty list"),
    (dict(adapter_targets=["o_proj", "o_proj"]), "must not repeat"),
    (dict(init=None), "adapter needs init"),
    (dict(adapter="dora"), "adapter must be one of"),
    (dict(trainable_layers=1), "trainable_layers must be None with adapter"),
    (dict(adapter=None), "adapter_rank needs adapter='lora'"),
], ids=["rank0", "no-rank", "alpha0", "alpha-nan", "unknown-target", "no-targets", "repeat", "no-init", "dora",
        "trainable-layers", "rank-without-adapter"])
def test_bad_adapter_arguments_are_named(kw, match, tmp_path):
    args = dataclasses.replace(adapter_args("smollm2", out_dir=str(tmp_path / "out")), **kw)
    with pytest.raises(ValueError, match=match):
        train(args)
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------
# FSDP2 and torchrun: 2 gloo processes (DDP, FSDP2) train the adapter like 1 process
# ----------------------------------------------------------------------------


def test_one_process_fsdp_adapter_run_matches_the_plain_run(base_run, tmp_path):
    """FSDP2 with frozen base parameters and trainable adapters in the same blocks: the plain run's numbers."""
    import torch.distributed as dist
    args = adapter_args(base_run / "step_000002", steps=3)
    plain = train(dataclasses.replace(args, out_dir=str(tmp_path / "plain")))
    sharded = train(dataclasses.replace(args, fsdp=True, out_dir=str(tmp_path / "fsdp")))
    assert not dist.is_initialized()
    assert [h["loss"] for h in sharded.history] == pytest.approx([h["loss"] for h in plain.history], rel=1e-6)
    assert sharded.evaluation["heldout_ar_loss"] == pytest.approx(plain.evaluation["heldout_ar_loss"], rel=1e-6)
    w1, w2 = (load_file(str(tmp_path / n / "step_000003" / "adapter_model.safetensors")) for n in ("plain", "fsdp"))
    assert w1.keys() == w2.keys()
    for name in w1:
        torch.testing.assert_close(w2[name], w1[name], rtol=0, atol=1e-6)


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_torchrun_two_processes_train_the_adapter_like_one(mode, base_run, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1"}
    cli = ["--init", str(base_run / "step_000002"), "--adapter", "lora", "--adapter-rank", "4", "--lr", "0.03",
           "--max-chars", "100000", "--seq-len", "32", "--block-size", "4", "--batch-size", "8", "--steps", "3",
           "--eval-rows", "2", "--eval-prompts", "1", "--eval-prompt-len", "8", "--eval-new-tokens", "4",
           "--no-progress"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    extra = ["--fsdp"] if mode == "fsdp" else []
    two = subprocess.run(torchrun + ["-m", "tidar_kernels", "train", *cli, *extra, "--micro-batch-size", "2", "--out",
                                     str(tmp_path / "two")], env=env, cwd=REPO, capture_output=True, text=True,
                         timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    one = train(dataclasses.replace(parse_args(cli)[0], out_dir=str(tmp_path / "one")))
    history = json.loads((resolve_checkpoint(str(tmp_path / "two")) / STATE_JSON).read_text())["history"]
    assert len(history) == 3
    for a, b in zip(one.history, history):
        for key in ("loss", "ar", "diffusion"):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), (a, b)
    w1, w2 = (load_file(str(resolve_checkpoint(str(tmp_path / n)) / "adapter_model.safetensors"))
              for n in ("one", "two"))
    assert w1.keys() == w2.keys()
    for name in w1:
        torch.testing.assert_close(w2[name], w1[name], rtol=0, atol=1e-3)
