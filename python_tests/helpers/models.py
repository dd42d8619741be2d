"""Tiny random models of the ``tiny`` preset for the model, checkpoint, adapter, decode-loop and training tests."""
import torch

from tidar_kernels.model.transformer import Transformer, TransformerConfig


def tiny(seed: int = 0, **overrides) -> Transformer:
    """The ``tiny`` preset with config ``overrides``, weights drawn after ``torch.manual_seed(seed)``, in eval mode."""
    torch.manual_seed(seed)
    return Transformer(TransformerConfig.from_name("tiny", **overrides)).eval()


def tiny_with_vocab(seed: int, vocab_size: int = 6, **overrides) -> Transformer:
    """:func:`tiny` with ``vocab_size`` tokens, the last one the mask token (6 by default: few tokens, so drafts often match)."""
    return tiny(seed, vocab_size=vocab_size, mask_token_id=vocab_size - 1, **overrides)
