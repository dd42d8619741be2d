"""tidar-kernels: fused attention kernels and a decode loop for TiDAR.

TiDAR (Liu, Dong et al., arXiv 2511.08923) verifies last step's drafts
autoregressively and drafts the next step by one-step masked diffusion in a
single forward pass. This package gives the structured-mask attention ops
(namespace ``tidar``), the one definition of the mask rule, a reference model,
the decode loop and training.
"""
from .backends import available as available_backends
from .mask import (Layout, TileKind, causal_mask, decode_mask, decode_position_ids, prefill_mask,
                   training_mask, training_position_ids)
from .ops import (accept_drafts, append_attention, causal_attention, decode_attention, prefill_attention,
                  training_attention)
from .tuning import tune_draft_length

__version__ = "0.1.0"

__all__ = [
    "Layout", "TileKind", "accept_drafts", "append_attention", "available_backends", "causal_attention",
    "causal_mask", "decode_attention", "decode_mask", "decode_position_ids", "prefill_attention",
    "prefill_mask", "training_attention", "training_mask", "training_position_ids", "tune_draft_length",
]
