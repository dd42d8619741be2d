"""A tiny Hugging Face Llama directory whose tokenizer has no mask token: an AR checkpoint as users bring it,
so loading or training it must append a mask token (a new embedding row)."""
import json
from pathlib import Path

import torch

from tidar_kernels.training import data as tdata

VOCAB_SIZE = 320


def llama_without_mask_token(directory: Path, num_hidden_layers: int = 2, tie_word_embeddings: bool = False) -> Path:
    """Write a seeded ``VOCAB_SIZE``-token Llama (hidden 32, GQA 2:1) and its tokenizer into ``directory``.

    The tokenizer is trained on the built-in corpus like the trainer's, then its ``<|mask|>`` is renamed
    ``<|unused|>``, so the vocabulary keeps its size but has no mask token."""
    import transformers
    from tokenizers import Tokenizer
    directory.mkdir(parents=True, exist_ok=True)
    corpus = tdata.build_corpus(max_chars=100_000)
    trained = tdata.train_tokenizer((d.text for d in corpus.train), VOCAB_SIZE)
    raw = json.loads(Tokenizer.from_str(trained.tokenizer.to_str()).to_str())
    for added in raw["added_tokens"]:
        if added["content"] == tdata.MASK_TOKEN:
            added["content"] = "<|unused|>"
    raw["model"]["vocab"] = {("<|unused|>" if k == tdata.MASK_TOKEN else k): v for k, v in raw["model"]["vocab"].items()}
    (directory / "tokenizer.json").write_text(json.dumps(raw))
    config = transformers.LlamaConfig(vocab_size=VOCAB_SIZE, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=num_hidden_layers, num_attention_heads=2,
                                      num_key_value_heads=1, max_position_embeddings=256,
                                      tie_word_embeddings=tie_word_embeddings)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(directory)
    return directory
