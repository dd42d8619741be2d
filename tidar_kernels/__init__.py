"""tidar-kernels: fused attention kernels and a decode loop for TiDAR.

TiDAR (Liu, Dong et al., arXiv 2511.08923) verifies last step's drafts
autoregressively and drafts the next step by one-step masked diffusion in a
single forward pass. The package has three layers (``docs/architecture.md``):

* :mod:`tidar_kernels.kernels`: the one mask rule, the structured-mask attention
  ops (namespace ``tidar``), their backends and the planners;
* :mod:`tidar_kernels.model`: the reference transformer, KV caches, checkpoint
  loading and the decode loops;
* :mod:`tidar_kernels.training`: the dual objective, data, the trainer and the
  evaluation harness;

plus :mod:`tidar_kernels.integrations` (Hugging Face transformers). Command lines:
``python -m tidar_kernels {generate,train,evaluate,demo}``.
"""
from .kernels import (Layout, TileKind, accept_drafts, append_attention, available_backends, causal_attention,
                      causal_mask, decode_attention, decode_mask, decode_position_ids, prefill_attention, prefill_mask,
                      training_attention, training_mask, training_position_ids)
from .model import (KVCache, PagedKVCache, Transformer, TransformerConfig, ar_generate, load_model, tidar_generate,
                    tune_draft_length)

__version__ = "0.1.0"

__all__ = [
    "KVCache", "Layout", "PagedKVCache", "TileKind", "Transformer", "TransformerConfig", "accept_drafts",
    "append_attention", "ar_generate", "available_backends", "causal_attention", "causal_mask", "decode_attention",
    "decode_mask", "decode_position_ids", "load_model", "prefill_attention", "prefill_mask", "tidar_generate",
    "training_attention", "training_mask", "training_position_ids", "tune_draft_length",
]
