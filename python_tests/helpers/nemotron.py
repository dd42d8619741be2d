"""Tiny random checkpoints in the diffusion checkpoints' released layout (docs/nemotron.md), offline.

:func:`write_nemotron` writes a directory exactly as the released ones are laid
out: ``config.json`` (``model_type: nemotron_labs_diffusion``, YaRN
``rope_parameters`` with the query-scale beta, the diffusion keys), bf16 tensors
``encoder.*`` + ``diffusion_head.weight`` in shards listed by
``model.safetensors.index.json``, ``generation_config.json``, a word-level
``tokenizer.json`` and the PEFT ``linear_spec_lora/`` (fp32, ``o_proj``).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

MASK_ID, EOS_ID, BOS_ID = 100, 11, 1

TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=32, max_position_embeddings=64)
"""Shapes of the tiny fixture: 4 x 32 query features != 64 hidden, so o_proj's LoRA A and B differ."""

ROPE = dict(rope_type="yarn", rope_theta=1000000.0, factor=4.0, original_max_position_embeddings=16,
            max_position_embeddings=64, beta_fast=32.0, beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0,
            llama_4_scaling_beta=0.1)
"""The released YaRN keys with a short original context (16) so test sequences of 40 pass it."""


def nemotron_config(**overrides) -> dict:
    """``config.json`` of a diffusion checkpoint (the released keys) with the tiny shapes."""
    config = dict(
        architectures=["NemotronLabsDiffusionModel"], model_type="nemotron_labs_diffusion", **TINY,
        hidden_act="silu", rms_norm_eps=1e-5, initializer_range=0.02, attention_dropout=0.0, use_cache=True,
        bos_token_id=BOS_ID, eos_token_id=2, pad_token_id=EOS_ID, tie_word_embeddings=False, sliding_window=None,
        rope_parameters=dict(ROPE), mask_token_id=MASK_ID, block_size=32, dlm_paradigm="bidirectional",
        ar_loss_weight=1.0, dlm_loss_weight=0.3, dtype="bfloat16", transformers_version="5.0.0")
    config.update(overrides)
    return config


def random_weights(config: dict, seed: int = 0, std: float = 0.3) -> dict[str, torch.Tensor]:
    """Random tensors under the released names (``encoder.*``, ``diffusion_head.weight``), fp32.

    Norm weights are ``1 + 0.1 N(0, 1)`` so that a misnamed norm changes the logits.
    """
    g = torch.Generator().manual_seed(seed)
    dim, inner, vocab = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    q_out = config["num_attention_heads"] * config["head_dim"]
    kv_out = config["num_key_value_heads"] * config["head_dim"]

    def matrix(rows, cols):
        return torch.randn(rows, cols, generator=g) * std

    def norm():
        return 1 + 0.1 * torch.randn(dim, generator=g)

    state = {"encoder.embed_tokens.weight": matrix(vocab, dim)}
    for i in range(config["num_hidden_layers"]):
        layer = f"encoder.layers.{i}."
        state.update({
            layer + "self_attn.q_proj.weight": matrix(q_out, dim), layer + "self_attn.k_proj.weight": matrix(kv_out, dim),
            layer + "self_attn.v_proj.weight": matrix(kv_out, dim), layer + "self_attn.o_proj.weight": matrix(dim, q_out),
            layer + "mlp.gate_proj.weight": matrix(inner, dim), layer + "mlp.up_proj.weight": matrix(inner, dim),
            layer + "mlp.down_proj.weight": matrix(dim, inner), layer + "input_layernorm.weight": norm(),
            layer + "post_attention_layernorm.weight": norm()})
    state["encoder.norm.weight"] = norm()
    state["diffusion_head.weight"] = matrix(vocab, dim)
    return state


def write_tokenizer(directory: Path, vocab_size: int) -> None:
    """A word-level ``tokenizer.json``: ``<unk> <s> </s>``, ``<SPECIAL_i>`` at the EOS and mask ids, ``w<i>`` words."""
    from tokenizers import AddedToken, Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit

    special = {0: "<unk>", BOS_ID: "<s>", 2: "</s>", EOS_ID: f"<SPECIAL_{EOS_ID}>", MASK_ID: f"<SPECIAL_{MASK_ID}>"}
    vocab = {special.get(i, f"w{i}"): i for i in range(vocab_size)}
    tokenizer = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = WhitespaceSplit()
    tokenizer.add_special_tokens([AddedToken(token, special=True) for token in special.values()])
    tokenizer.save(str(directory / "tokenizer.json"))


def write_spec_lora(directory: Path, config: dict, rank: int = 8, alpha: float = 32.0, seed: int = 1) -> None:
    """``linear_spec_lora/``: PEFT's ``adapter_config.json`` and fp32 ``adapter_model.safetensors`` on o_proj."""
    lora = directory / "linear_spec_lora"
    lora.mkdir()
    g = torch.Generator().manual_seed(seed)
    features = config["num_attention_heads"] * config["head_dim"]
    tensors = {}
    for i in range(config["num_hidden_layers"]):
        name = f"base_model.model.encoder.layers.{i}.self_attn.o_proj"
        tensors[f"{name}.lora_A.weight"] = torch.randn(rank, features, generator=g) * 0.1
        tensors[f"{name}.lora_B.weight"] = torch.randn(config["hidden_size"], rank, generator=g) * 0.1
    save_file(tensors, str(lora / "adapter_model.safetensors"))
    (lora / "adapter_config.json").write_text(json.dumps(dict(
        peft_type="LORA", task_type=None, base_model_name_or_path=None, r=rank, lora_alpha=alpha,
        lora_dropout=0.0, target_modules=["o_proj"], bias="none", use_dora=False, use_rslora=False,
        fan_in_fan_out=False, modules_to_save=None, layers_to_transform=None, layers_pattern=None,
        rank_pattern={}, alpha_pattern={}, init_lora_weights=True, inference_mode=True), indent=2))


def write_nemotron(directory, config: dict | None = None, seed: int = 0, shards: int = 2, lora: bool = True,
                   std: float = 0.3, weights: dict[str, torch.Tensor] | None = None) -> Path:
    """Write a tiny diffusion checkpoint (module docstring) to ``directory``; returns it.

    ``weights`` (released names, any dtype) replaces the random ones; they are stored in bf16.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = nemotron_config() if config is None else config
    state = {name: t.to(torch.bfloat16).contiguous()
             for name, t in (weights if weights is not None else random_weights(config, seed, std)).items()}
    names = list(state)
    per_shard = -(-len(names) // shards)
    weight_map = {}
    for s in range(shards):
        shard = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        chunk = names[s * per_shard:(s + 1) * per_shard]
        save_file({name: state[name] for name in chunk}, str(directory / shard), metadata={"format": "pt"})
        weight_map.update({name: shard for name in chunk})
    total = sum(t.numel() * t.element_size() for t in state.values())
    (directory / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    (directory / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": BOS_ID, "eos_token_id": EOS_ID, "pad_token_id": EOS_ID, "transformers_version": "5.0.0"}))
    write_tokenizer(directory, config["vocab_size"])
    if lora:
        write_spec_lora(directory, config)
    return directory


def as_causal_lm_state(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The released names as ``Ministral3ForCausalLM``'s: ``encoder.`` -> ``model.``, ``diffusion_head`` -> ``lm_head``."""
    renamed = {}
    for name, tensor in weights.items():
        if name.startswith("encoder."):
            name = "model." + name[len("encoder."):]
        renamed[name.replace("diffusion_head.", "lm_head.")] = tensor
    return renamed
