"""The model stack: the reference transformer, KV caches, checkpoints and the decode loops.

:mod:`.transformer` (Llama / Qwen2 / Qwen3 blocks over the tidar ops),
:mod:`.kv_cache` (contiguous and paged caches), :mod:`.checkpoints` (file formats),
:mod:`.loading` (the one loader of every model source), :mod:`.generate` (TiDAR
and AR decoding), :mod:`.tuning` (the draft length from measured step times).
"""
from .generate import ar_generate, tidar_generate
from .kv_cache import KVCache, PagedKVCache
from .loading import load_model
from .transformer import Transformer, TransformerConfig
from .tuning import tune_draft_length
