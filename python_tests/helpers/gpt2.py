"""A Hugging Face GPT-2 checkpoint directory (its config and one zero tensor): an architecture the
loaders refuse, for the tests of those errors."""
import json
from pathlib import Path

import torch
from safetensors.torch import save_file


def gpt2_directory(directory: Path) -> str:
    """Create ``directory`` holding a two-layer GPT-2 ``config.json`` and ``model.safetensors``; returns its path."""
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 2, "vocab_size": 50}))
    save_file({"wte.weight": torch.zeros(50, 8)}, str(directory / "model.safetensors"))
    return str(directory)
