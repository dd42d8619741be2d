"""Checkpoint loading and saving: our format, Hugging Face directories, the mask token, GGUF layout."""
import json

import pytest
import torch
from helpers.models import tiny

from tidar_kernels.model.checkpoints import (_unpermute_rotary, add_mask_token, load_hf, load_pretrained,
                                       save_pretrained)


def test_save_load_roundtrip(tmp_path):
    model = tiny(qkv_bias=True, qk_norm=True)
    save_pretrained(model, tmp_path / "ckpt")
    loaded = load_pretrained(tmp_path / "ckpt")
    assert loaded.config == model.config
    ids = torch.randint(0, 96, (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(loaded.forward_causal(ids), model.forward_causal(ids), rtol=0, atol=0)


def test_save_replaces_atomically(tmp_path):
    """Saving over a checkpoint replaces it whole and leaves no temporary directory behind."""
    target = tmp_path / "ckpt"
    save_pretrained(tiny(), target)
    other = tiny(tie_embeddings=True)
    save_pretrained(other, target)
    assert load_pretrained(target).config.tie_embeddings
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    assert sorted(p.name for p in target.iterdir()) == ["config.json", "model.safetensors"]


def test_load_errors(tmp_path):
    with pytest.raises(ValueError, match="config.json"):
        load_pretrained(tmp_path)
    with pytest.raises(ValueError, match="Hugging Face"):
        load_hf(tmp_path)
    save_pretrained(tiny(), tmp_path / "ours")
    with pytest.raises(ValueError, match="load_pretrained"):
        load_hf(tmp_path / "ours")
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(ValueError, match="tidar-kernels"):
        load_pretrained(tmp_path / "hf")
    (tmp_path / "ours" / "model.safetensors").unlink()
    with pytest.raises(ValueError, match="without model.safetensors"):
        load_pretrained(tmp_path / "ours")


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_add_mask_token_appends_mean_row(tie):
    model = tiny(mask_token_id=None, tie_embeddings=tie)
    embedding = model.tok_embeddings.weight.detach().clone()
    head = None if tie else model.output.weight.detach().clone()
    add_mask_token(model)
    assert (model.config.vocab_size, model.config.mask_token_id) == (98, 97)
    torch.testing.assert_close(model.tok_embeddings.weight[97], embedding.mean(0))
    torch.testing.assert_close(model.tok_embeddings.weight[:97], embedding)
    if not tie:
        torch.testing.assert_close(model.output.weight[97], head.mean(0))
    with torch.no_grad():  # the untrained mask token never wins an argmax
        logits = model.forward_causal(torch.randint(0, 97, (2, 9)))
    assert (logits.argmax(-1) != 97).all()


def test_add_mask_token_refuses_a_second_mask_token():
    model = tiny()
    with pytest.raises(ValueError, match="mask_token_id must be None"):
        add_mask_token(model)
    assert (model.config.vocab_size, model.config.mask_token_id) == (97, 96)


def test_add_mask_token_uses_spare_row():
    """A vocabulary padded past the tokenizer (Qwen) gives its first unused row to [M]."""
    model = tiny(mask_token_id=None)
    add_mask_token(model, tokenizer_size=90)
    assert (model.config.vocab_size, model.config.mask_token_id) == (97, 90)
    torch.testing.assert_close(model.tok_embeddings.weight[90], model.tok_embeddings.weight[:90].mean(0))


def test_hf_directory_with_tokenizer_and_explicit_mask(tmp_path):
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel

    config = transformers.Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2)
    transformers.Qwen2ForCausalLM(config).save_pretrained(tmp_path)
    Tokenizer(WordLevel({f"t{i}": i for i in range(50)}, unk_token="t0")).save(str(tmp_path / "tokenizer.json"))
    assert load_hf(tmp_path).config.mask_token_id == 50
    assert load_hf(tmp_path, mask_token_id=63).config.vocab_size == 64
    with pytest.raises(ValueError, match="mask_token_id"):
        load_hf(tmp_path, mask_token_id=64)


def test_unpermute_inverts_llama_cpp_permutation():
    """llama.cpp's converter: ``w.reshape(h, 2, D/2, in).swapaxes(1, 2).reshape(w.shape)``."""
    heads, head_dim, dim = 3, 8, 5
    weight = torch.randn(heads * head_dim, dim)
    permuted = weight.reshape(heads, 2, head_dim // 2, dim).transpose(1, 2).reshape(heads * head_dim, dim)
    torch.testing.assert_close(_unpermute_rotary(permuted, heads), weight, rtol=0, atol=0)
