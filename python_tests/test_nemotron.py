"""Ministral-3 and the diffusion checkpoints (docs/nemotron.md) on tiny random checkpoints, CPU.

YaRN frequencies equal transformers'; likelihood logits equal transformers' native
``Ministral3ForCausalLM`` by the package's tolerance rule (fp32 and bf16, positions
past ``original_max_position_embeddings``, rows at their own positions); greedy TiDAR
equals greedy AR on the loaded checkpoint; the Hugging Face route decodes like
``model.generate``; the spec LoRA parses; bad files fail before any weight is read;
loading holds no second copy of the weights.
"""
import json
import subprocess
import sys
import textwrap

import pytest
import torch
from helpers.nemotron import (EOS_ID, MASK_ID, ROPE, TINY, as_causal_lm_state, nemotron_config, random_weights,
                              write_nemotron)
from safetensors.torch import load_file, save_file

from tidar_kernels.kernels.mask import Layout
from tidar_kernels.kernels.tolerance import assert_close_by_rule
from tidar_kernels.model import checkpoints
from tidar_kernels.model.adapters import attach_lora
from tidar_kernels.model.generate import ar_generate, linear_spec_generate, main, pad_prompts, tidar_generate
from tidar_kernels.model.loading import load_model
from tidar_kernels.model.transformer import AttentionContext, TransformerConfig, rope_inv_freq
from tidar_kernels.model.tuning import CPU_DRAFT_LENGTH, default_draft_length

transformers = pytest.importorskip("transformers")
from transformers import Ministral3Config, Ministral3ForCausalLM  # noqa: E402
from transformers.modeling_rope_utils import _compute_yarn_parameters  # noqa: E402

from tidar_kernels.integrations import transformers as tt  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def nld(tmp_path_factory):
    """A tiny checkpoint in the released layout, and its weights (fp32 values of the stored bf16)."""
    config = nemotron_config()
    weights = {name: t.to(torch.bfloat16).float() for name, t in random_weights(config).items()}
    return write_nemotron(tmp_path_factory.mktemp("nld") / "ckpt", config, weights=weights), weights


def hf_config(config: dict) -> Ministral3Config:
    return Ministral3Config(**{k: v for k, v in config.items() if k not in ("model_type", "architectures")})


@pytest.fixture(scope="module")
def plain(nld, tmp_path_factory):
    """The same weights as a plain Ministral-3 directory, written by transformers itself."""
    directory, weights = nld
    model = Ministral3ForCausalLM(hf_config(nemotron_config()))
    model.load_state_dict(as_causal_lm_state(weights), strict=True)
    path = tmp_path_factory.mktemp("plain") / "ministral3"
    model.save_pretrained(path)
    return path


def reference(path, dtype):
    model = Ministral3ForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True).eval()
    model.set_attn_implementation("sdpa")
    return model


# ----------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------


RELEASED_ROPE = dict(rope_type="yarn", rope_theta=1e6, factor=16.0, original_max_position_embeddings=16384,
                     beta_fast=32.0, beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0, llama_4_scaling_beta=0.1)


@pytest.mark.parametrize("rope", [
    RELEASED_ROPE, {**RELEASED_ROPE, "rope_theta": 1e9}, {**RELEASED_ROPE, "mscale_all_dim": 0.0},
    {**RELEASED_ROPE, "attention_factor": 0.7, "truncate": False, "beta_fast": 16.0},
], ids=["released", "theta1e9", "mscale-ratio", "attention-factor-untruncated"])
def test_yarn_frequencies_equal_transformers(rope):
    """Frequencies bit for bit and the attention scaling, at the real head_dim 128, read from config.json keys."""
    config = nemotron_config(**{**TINY, "head_dim": 128, "max_position_embeddings": 262144},
                             rope_parameters=dict(rope))
    ours = checkpoints.config_from_hf(config)
    inv_freq, scaling = _compute_yarn_parameters(hf_config(config))
    assert torch.equal(rope_inv_freq(ours), inv_freq)
    assert ours.yarn.attention_scaling == pytest.approx(scaling, rel=1e-12)
    assert (ours.query_scale_beta, ours.query_scale_length) == (0.1, 16384)


def test_real_sizes_and_plain_rope_configs():
    """The 8B shapes give 32 / 8 heads of 128; a default-rope Llama config still reads as plain RoPE."""
    ours = checkpoints.config_from_hf(nemotron_config(hidden_size=4096, num_hidden_layers=34, intermediate_size=14336,
                                                      num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                                                      vocab_size=131072, max_position_embeddings=262144))
    assert (ours.n_heads, ours.n_kv_heads, ours.head_dim, ours.tie_embeddings) == (32, 8, 128, False)
    llama = checkpoints.config_from_hf(dict(model_type="llama", vocab_size=10, hidden_size=8, num_hidden_layers=1,
                                            num_attention_heads=2, intermediate_size=8, rope_theta=500.0))
    assert llama.yarn is None and llama.query_scale_beta == 0 and llama.rope_theta == 500.0
    assert TransformerConfig.from_dict(ours.to_dict()) == ours  # our own checkpoints keep the YaRN fields


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("source", ["nemotron", "ministral3"])
def test_causal_logits_equal_transformers(nld, plain, source, dtype):
    """40 positions (original context 16: query scales 1, 1 + 0.1 ln 2, 1 + 0.1 ln 3), and rows at their own
    positions (offsets 0 and 23), against transformers in ``dtype`` (lo) and fp64 (hi)."""
    ours = checkpoints.load_hf(nld[0] if source == "nemotron" else plain, dtype=dtype)
    assert ours.dtype == dtype and ours.config.query_scale_length == 16
    vocab = TINY["vocab_size"]
    ids = torch.randint(0, vocab, (2, 40), generator=torch.Generator().manual_seed(3))
    positions = torch.arange(40).expand(2, 40) + torch.tensor([[0], [23]])
    lo, hi = reference(plain, dtype), reference(plain, torch.float64)
    with torch.no_grad():
        for pos in (None, positions):
            if pos is None:
                got = ours.forward_causal(ids)
            else:
                got = ours.lm_head(ours(ids, pos, AttentionContext(Layout.CAUSAL)))
            expected_lo = lo(ids, position_ids=pos).logits
            expected_hi = hi(ids, position_ids=pos).logits
            if source == "ministral3":  # load_hf appended a mask row to the plain model
                assert got.shape[-1] == vocab + 1
                got = got[..., :vocab]
            assert_close_by_rule(got, expected_hi, expected_lo, name=f"{source} {dtype} logits, positions {pos}")


def test_yarn_attention_factor_logits_equal_transformers(tmp_path):
    """mscale_all_dim 0 gives YaRN an attention factor 0.1 ln 4 + 1 != 1 on cos and sin (released: exactly 1)."""
    config = nemotron_config(rope_parameters={**ROPE, "mscale_all_dim": 0.0})
    weights = {name: t.to(torch.bfloat16).float() for name, t in random_weights(config, seed=5).items()}
    ours = checkpoints.load_hf(write_nemotron(tmp_path / "ckpt", config, weights=weights, lora=False))
    assert ours.config.yarn.attention_scaling > 1.1
    lo = Ministral3ForCausalLM(hf_config(config)).eval()
    lo.load_state_dict(as_causal_lm_state(weights))
    lo.set_attn_implementation("sdpa")
    hi = Ministral3ForCausalLM(hf_config(config)).eval().double()
    hi.load_state_dict(as_causal_lm_state(weights))
    hi.set_attn_implementation("sdpa")
    ids = torch.randint(0, TINY["vocab_size"], (2, 40), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        assert_close_by_rule(ours.forward_causal(ids), hi(ids).logits, lo(ids).logits, name="logits")


# ----------------------------------------------------------------------------
# Loading and decoding
# ----------------------------------------------------------------------------


def test_load_model_keeps_the_vocabulary_and_reads_the_ids(nld):
    model, tokenizer = load_model(str(nld[0]))
    assert model.config.vocab_size == TINY["vocab_size"] and model.config.mask_token_id == MASK_ID
    assert model.config.trained_block_size == 32
    assert (tokenizer.mask_id, tokenizer.eos_id, tokenizer.stop_ids, tokenizer.pad_id) == (MASK_ID, EOS_ID,
                                                                                          [EOS_ID], EOS_ID)
    assert tokenizer.mask_token == f"<SPECIAL_{MASK_ID}>" and tokenizer.vocab_size == TINY["vocab_size"]
    stored = load_file(str(next(nld[0].glob("model-00002*"))))
    assert torch.equal(model.output.weight, stored["diffusion_head.weight"].float())


PROMPTS = [[5, 17, 3, 40, 9, 12, 33], [90, 1, 2], [42, 7, 7, 8, 60]]


@pytest.mark.parametrize("batch", [1, 3])
def test_tidar_greedy_equals_ar(nld, batch):
    """Greedy TiDAR == greedy AR on the loaded checkpoint: k = 1..8 and the trained block 32, ragged prompts."""
    model, _ = load_model(str(nld[0]))
    ids, lens = pad_prompts(PROMPTS[:batch])
    ar = ar_generate(model, ids, 14, prompt_lens=lens)
    for k in (*range(1, 9), 32):
        tidar = tidar_generate(model, ids, 14, k, prompt_lens=lens)
        assert tidar.sequences() == ar.sequences(), f"batch {batch} k={k}"


def test_tidar_greedy_equals_ar_on_triton(nld, monkeypatch):
    """One case through the Triton kernels (the interpreter on the CPU)."""
    pytest.importorskip("triton")
    model, _ = load_model(str(nld[0]))
    ids, lens = pad_prompts(PROMPTS)
    ar = ar_generate(model, ids, 6, prompt_lens=lens)
    monkeypatch.setenv("TIDAR_BACKEND", "triton")
    assert tidar_generate(model, ids, 6, 3, prompt_lens=lens).sequences() == ar.sequences()


def test_generate_command_line(nld, capsys):
    main(["--model", str(nld[0]), "--prompt", "w5 w17 w3", "--max-new-tokens", "6", "--ar"])
    out = capsys.readouterr().out
    tidar_text, ar_text = (part.split("\n")[1] for part in out.split("---")[2::2])
    assert tidar_text == ar_text and tidar_text.startswith("w5 w17 w3")
    assert "[TiDAR]" in out and "[AR]" in out


@pytest.mark.parametrize("mode", ["quadratic", "linear"])
def test_generate_command_line_with_the_spec_lora(nld, capsys, mode):
    """Both self-speculative modes from the released directory, its own spec LoRA on: AR's text exactly."""
    main(["--model", str(nld[0]), "--prompt", "w5 w17 w3", "--max-new-tokens", "6", "--mode", mode,
          "--block-len", "4", "--spec-lora", str(nld[0] / "linear_spec_lora"), "--ar"])
    out = capsys.readouterr().out
    spec_text, ar_text = (part.split("\n")[1] for part in out.split("---")[2::2])
    assert spec_text == ar_text and spec_text.startswith("w5 w17 w3")


def test_spec_lora_changes_no_ar_token_in_either_mode(nld):
    """The shipped adapter, scaled up 100x, on batch 3 ragged prompts: drafts move, tokens do not."""
    model, _ = load_model(str(nld[0]))
    lora = checkpoints.load_spec_lora(nld[0], model.config)
    lora = type(lora)(lora.rank, lora.alpha * 100, lora.weights)
    attach_lora(model, lora)
    ids, lens = pad_prompts([[5, 17, 3], [9, 1, 2, 3, 4, 8, 7], [42]])
    ar = ar_generate(model, ids, 12, prompt_lens=lens)
    for block in (1, 4, 32):
        quadratic = tidar_generate(model, ids, 12, block, prompt_lens=lens, spec_lora="mask_rows")
        linear = linear_spec_generate(model, ids, 12, block, prompt_lens=lens, spec_lora="draft")
        for result in (quadratic, linear):
            assert torch.equal(result.tokens, ar.tokens) and torch.equal(result.lengths, ar.lengths), block


def test_default_draft_length_is_at_most_the_trained_block(nld):
    model, _ = load_model(str(nld[0]))
    assert default_draft_length(model) == CPU_DRAFT_LENGTH  # no GPU to time on
    # Equal step times: the longest draft wins, and the candidates stop at the trained block.
    assert default_draft_length(model, measure=lambda k: 1.0) == 32
    model.config.trained_block_size = None
    assert default_draft_length(model, measure=lambda k: 1.0) == 16


# ----------------------------------------------------------------------------
# Hugging Face route
# ----------------------------------------------------------------------------


def test_load_nemotron_generate_equals_hf_generate(nld):
    model = tt.load_nemotron(nld[0])
    assert type(model) is Ministral3ForCausalLM and model.config._attn_implementation == "tidar"
    assert tt.mask_token_id(model) == MASK_ID and model.get_input_embeddings().weight.shape[0] == 128
    assert model.generation_config.eos_token_id == EOS_ID
    ids = torch.tensor([[0, 0, 5, 17, 3, 40, 9], [90, 1, 2, 3, 4, 5, 6]])
    mask = (torch.arange(7) >= torch.tensor([[2], [0]])).long()
    previous = model.config._attn_implementation
    model.set_attn_implementation("sdpa")
    expected = model.generate(ids, attention_mask=mask, max_new_tokens=16, do_sample=False)
    model.set_attn_implementation(previous)
    for k in (1, 4, 7):
        assert torch.equal(tt.generate(model, ids, 16, k, attention_mask=mask), expected), f"k={k}"


# ----------------------------------------------------------------------------
# The spec LoRA
# ----------------------------------------------------------------------------


def test_load_spec_lora(nld):
    lora = checkpoints.load_spec_lora(nld[0])
    assert (lora.rank, lora.alpha, lora.scale) == (8, 32.0, 4.0)
    assert sorted(lora.weights) == ["attention.wo"] and sorted(lora.weights["attention.wo"]) == [0, 1]
    stored = load_file(str(nld[0] / "linear_spec_lora" / "adapter_model.safetensors"))
    a, b = lora.weights["attention.wo"][1]
    assert a.shape == (8, 128) and b.shape == (64, 8) and a.dtype == torch.float32
    assert torch.equal(a, stored["base_model.model.encoder.layers.1.self_attn.o_proj.lora_A.weight"])
    assert torch.equal(b, stored["base_model.model.encoder.layers.1.self_attn.o_proj.lora_B.weight"])
    same = checkpoints.load_spec_lora(nld[0] / "linear_spec_lora", dtype=torch.bfloat16)
    assert same.weights["attention.wo"][0][0].dtype == torch.bfloat16


# ----------------------------------------------------------------------------
# Bad input: a clear error, before any weight is read
# ----------------------------------------------------------------------------


@pytest.fixture
def no_weight_reads(monkeypatch):
    """Fail the test if any tensor data is read: every error below must come from the checks first."""
    def refuse(*args, **kwargs):
        raise AssertionError("weights were read before the error")
    monkeypatch.setattr(checkpoints, "read_tensors", refuse)


def edit_config(directory, **changes):
    config = json.loads((directory / "config.json").read_text())
    config.update(changes)
    (directory / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("changes, message", [
    ({"dlm_paradigm": "left_to_right"}, "dlm_paradigm must be one of"),
    ({"model_type": "nemotron_h"}, "model_type must be one of"),
    ({"mask_token_id": 128}, r"mask_token_id must be a token id in \[0, vocab_size=128\)"),
    ({"mask_token_id": None}, "mask_token_id must be a token id"),
    ({"sliding_window": 32}, "sliding_window must be null"),
    ({"rope_parameters": {**ROPE, "rope_type": "longrope"}}, "rope type must be"),
    ({"rope_parameters": {**ROPE, "beta_fast": 0}}, "beta_fast must be > 0"),
    ({"rope_parameters": {k: v for k, v in ROPE.items() if k != "factor"}}, "must give factor"),
    ({"hidden_size": 96}, "has shape"),
])
def test_bad_config_is_refused(nld, tmp_path, no_weight_reads, changes, message):
    directory = write_nemotron(tmp_path / "bad", lora=False)
    edit_config(directory, **changes)
    with pytest.raises(ValueError, match=message):
        checkpoints.load_hf(directory)
    with pytest.raises(ValueError, match=message):
        load_model(str(directory))


def test_missing_shard_or_tensor_is_refused(tmp_path, no_weight_reads):
    directory = write_nemotron(tmp_path / "shard", lora=False, shards=3)
    (directory / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(ValueError, match="shard 'model-00002-of-00003.safetensors' named by "
                                         "model.safetensors.index.json is missing"):
        checkpoints.load_hf(directory)
    with pytest.raises(ValueError, match="model-00002-of-00003"):
        tt.load_nemotron(directory)
    directory = write_nemotron(tmp_path / "tensor", lora=False)
    shard = directory / "model-00002-of-00002.safetensors"
    tensors = load_file(str(shard))
    del tensors["encoder.norm.weight"]
    save_file(tensors, str(shard))
    index = json.loads((directory / "model.safetensors.index.json").read_text())
    del index["weight_map"]["encoder.norm.weight"]
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="lacks tensor 'model.norm.weight'"):
        checkpoints.load_hf(directory)


def test_mask_token_argument_must_agree(nld, no_weight_reads):
    with pytest.raises(ValueError, match="mask_token_id must be None or the checkpoint's own"):
        checkpoints.load_hf(nld[0], mask_token_id=5)


def rewrite_adapter(directory, config=None, tensors=None):
    lora = directory / "linear_spec_lora"
    if config is not None:
        settings = json.loads((lora / "adapter_config.json").read_text())
        settings.update(config)
        (lora / "adapter_config.json").write_text(json.dumps(settings))
    if tensors is not None:
        stored = load_file(str(lora / "adapter_model.safetensors"))
        save_file(tensors(stored), str(lora / "adapter_model.safetensors"))


LAYER1_B = "base_model.model.encoder.layers.1.self_attn.o_proj.lora_B.weight"


@pytest.mark.parametrize("config, tensors, message", [
    ({"target_modules": ["qkv_proj"]}, None, "target module 'qkv_proj' is missing from the model"),
    ({"target_modules": "o_proj"}, None, "target_modules must be a non-empty list"),
    ({"r": 16}, None, r"lora_A.weight' has rank 8 .*r is 16"),
    ({"use_dora": True}, None, "use_dora must be False"),
    (None, lambda t: {**t, LAYER1_B: torch.zeros(65, 8)}, rf"tensor '{LAYER1_B}' has shape \[65, 8\], expected \[64, 8\]"),
    (None, lambda t: {**t, LAYER1_B: torch.zeros(64, 4)}, rf"tensor '{LAYER1_B}' has rank 4"),
    (None, lambda t: {k: v for k, v in t.items() if k != LAYER1_B}, rf"lacks tensor '{LAYER1_B}'"),
    (None, lambda t: {**t, "base_model.model.encoder.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(8, 64)},
     "adapts self_attn.q_proj of layer 0, which adapter_config.json does not target"),
    (None, lambda t: {**t, "base_model.model.encoder.layers.2.self_attn.o_proj.lora_A.weight": torch.zeros(8, 128)},
     "adapts self_attn.o_proj of layer 2"),
], ids=["target-missing", "target-string", "rank-config", "dora", "shape", "rank-tensor", "missing-tensor",
        "untargeted", "layer-out-of-range"])
def test_bad_spec_lora_is_refused(tmp_path, no_weight_reads, config, tensors, message):
    directory = write_nemotron(tmp_path / "lora")
    rewrite_adapter(directory, config, tensors)
    with pytest.raises(ValueError, match=message):
        checkpoints.load_spec_lora(directory)


def test_missing_spec_lora_files_are_refused(tmp_path, no_weight_reads):
    directory = write_nemotron(tmp_path / "nolora", lora=False)
    with pytest.raises(ValueError, match="linear_spec_lora/adapter_config.json' is missing"):
        checkpoints.load_spec_lora(directory)
    directory = write_nemotron(tmp_path / "noweights")
    (directory / "linear_spec_lora" / "adapter_model.safetensors").unlink()
    with pytest.raises(ValueError, match="adapter_model.safetensors' is missing"):
        checkpoints.load_spec_lora(directory)


# ----------------------------------------------------------------------------
# Host memory of loading
# ----------------------------------------------------------------------------

MEASURE = textwrap.dedent("""
    import json, resource, sys
    import torch
    from tidar_kernels.model import checkpoints

    def rss_kb(field):
        for line in open("/proc/self/status"):
            if line.startswith(field):
                return int(line.split()[1])

    def reset_peak():  # Linux: writing 5 to clear_refs resets VmHWM to the current RSS
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")

    results = {}
    for name in ("bfloat16", "float32"):
        reset_peak()
        before = rss_kb("VmRSS:")
        model = checkpoints.load_hf(sys.argv[1], dtype=getattr(torch, name))
        weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
        results[name] = {"growth": (rss_kb("VmHWM:") - before) * 1024, "weights": weights}
        del model
    print(json.dumps(results))
""")


def test_loading_holds_no_second_copy(tmp_path):
    """~180 MB of bf16 weights in 3 shards: peak RSS growth <= 1.2x the loaded weights, in bf16 and fp32."""
    config = nemotron_config(vocab_size=16384, hidden_size=1024, intermediate_size=4096, num_hidden_layers=4,
                             num_attention_heads=8, num_key_value_heads=2, head_dim=128)
    directory = write_nemotron(tmp_path / "big", config, shards=3, lora=False, std=0.02)
    out = subprocess.run([sys.executable, "-c", MEASURE, str(directory)], capture_output=True, text=True,
                         check=True).stdout
    results = json.loads(out.strip().splitlines()[-1])
    print(results)
    assert results["bfloat16"]["weights"] > 150e6
    for name, row in results.items():
        assert row["growth"] <= 1.2 * row["weights"], (name, row)
